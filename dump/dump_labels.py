"""The Ray label dump: run a labeler over every tar shard of a split and write its top-k token maps to a store.

    python -m dump.dump_labels --shards shards/demo --checkpoint runs/labeler/last.pt --out shards/demo/labels/fan.zarr

Also runs as `ray job submit --working-dir . -- python -m dump.dump_labels ...` and as
`ray submit CLUSTER.yaml dump/dump_labels.py -- ...` (there the repo must be installed on the cluster). On a
multi-node cluster the shards, checkpoint and store paths must be on storage every node sees.

One Ray actor holds one labeler (a GPU each when the cluster has GPUs). The unit of work is one tar shard: an
actor decodes it in a prefetch thread, labels it in fixed batches and writes its rows (whole chunks, by it
alone), then the shard's `done` flag. Killed at any moment, the same command resumes: finished shards are
skipped and the result is bitwise equal to an uninterrupted dump (eval mode, fixed threads per actor, the same
batches per shard; the store records all of these and refuses to resume with different ones).
"""

import argparse
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path (`python dump/dump_labels.py`): make the repo importable, here and in workers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))

import numpy as np
import ray
import torch
import zarr
from PIL import Image
from timm.data import resolve_model_data_config
from tqdm import tqdm

from core.eval_view import centre_view
from dump.store import (
    create_store,
    dataset_attrs,
    identity_differences,
    make_footprint,
    mark_complete,
    open_store,
    publish,
    store_attrs,
    store_lock,
    temporary_path,
)
from labeler.load import load_labeler
from shards.errors import UserError, cli
from shards.manifest import Manifest, load_manifest
from shards.reader import ON_ERROR, SkipLog, read_shard, shard_keys

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
MAX_RETRIES = 3  # actor restarts and task retries when a worker process dies


def labeler_input(image: Image.Image, footprint: dict[str, Any], mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """The labeler's normalised [3, S, S] input: the eval view (core.eval_view) of `image` its footprint describes."""
    pixels = centre_view(image, footprint["input_size"], footprint["crop_pct"], RESAMPLE[footprint["interpolation"]])
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def top_k_maps(model: torch.nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-k logits (descending) and class ids, as float16 / int64 [B, k, H, W] on the CPU."""
    _, tokens, (h, w) = model.forward_dense(x)
    values, ids = (t.transpose(1, 2).reshape(len(x), k, h, w).cpu() for t in tokens.float().topk(k, dim=-1))
    return values.half(), ids


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce `items` in a background thread, at most `depth` ahead; its exceptions surface here."""
    done = object()
    slots: queue.Queue = queue.Queue(depth)

    def produce() -> None:
        try:
            for item in items:
                slots.put(item)
            slots.put(done)
        except BaseException as e:  # handed to the consumer, re-raised there
            slots.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while (item := slots.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


@dataclass(frozen=True)
class DumpJob:
    """Everything an actor needs; identical for every actor so any of them produces the same bytes."""

    manifest: Manifest
    split: str
    checkpoint: str
    store: str
    topk: int
    footprint: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    threads: int
    on_error: str
    use_gpu: bool


class ShardLabeler:
    """A Ray actor: one labeler model; labels whole tar shards and writes their rows and done flags."""

    def __init__(self, job: DumpJob):
        torch.set_num_threads(job.threads)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        self.job = job
        self.device = torch.device("cuda" if job.use_gpu else "cpu")
        self.model, _ = load_labeler(job.checkpoint, self.device)
        self.group = zarr.open_group(job.store, mode="r+", zarr_format=3)
        self.forward_lock = threading.Lock()  # two shards in flight share the model; one forward at a time

    def batches(self, filename: str, skips: SkipLog) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        job, rows, inputs = self.job, [], []
        for sample in read_shard(job.manifest.root, job.split, filename, job.on_error, skips, job.manifest):
            rows.append(sample["index"])
            inputs.append(labeler_input(sample["image"], job.footprint, job.mean, job.std))
            if len(rows) == job.batch_size:
                yield np.array(rows), torch.stack(inputs)
                rows, inputs = [], []
        if rows:
            yield np.array(rows), torch.stack(inputs)

    def label_shard(self, position: int) -> dict[str, Any]:
        """Label tar shard `position` of the split, write its rows, then its done flag; return its report."""
        job, started = self.job, time.perf_counter()
        filename, count = job.manifest.shards(job.split)[position]
        first = job.manifest.offsets(job.split)[position]
        scores, classes = self.group["scores"], self.group["classes"]
        shape = (count, *scores.shape[1:])
        out_scores, out_classes = np.full(shape, np.nan, np.float16), np.full(shape, -1, classes.dtype)
        valid = np.zeros(count, np.uint8)
        keys = shard_keys(job.manifest.root / filename)
        skips = SkipLog()
        with torch.inference_mode():
            for rows, x in prefetch(self.batches(filename, skips)):
                with self.forward_lock:
                    values, ids = top_k_maps(self.model, x.to(self.device), job.topk)
                out_scores[rows - first], out_classes[rows - first] = values.numpy(), ids.numpy()
                valid[rows - first] = 1
        rows = slice(first, first + count)
        scores[rows], classes[rows], self.group["valid"][rows] = out_scores, out_classes, valid
        self.group["keys"][rows] = np.array(keys + [""] * (count - len(keys)), dtype=str)
        self.group["done"][position] = 1
        return {"shard": filename, "rows": count, "labelled": int(valid.sum()),
                "skipped": [f"{key}: {reason}" for _, key, reason in skips.skipped],
                "seconds": time.perf_counter() - started}


def start_ray(address: str | None) -> bool:
    """Connect to --address / RAY_ADDRESS, reuse an initialised Ray, or start a local one; True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    return True


def probe_labeler(checkpoint: Path, input_size: int | None) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
    """Load the labeler once in the driver: (its identity, its data config, the token grid at the input size)."""
    model, meta = load_labeler(checkpoint, "cpu")
    config = resolve_model_data_config(model)
    size = input_size or meta["img_size"]
    try:
        with torch.inference_mode():
            _, _, grid = model.forward_dense(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"--input-size {size} does not suit labeler {meta['model']} ({e}); use a multiple of its stride") from e
    return {**meta, "input_size": size}, config, tuple(grid)


def open_or_create(path: Path, attrs: dict[str, Any], overwrite: bool) -> zarr.Group:
    """The store to fill: resumed if it has exactly these attributes, else created (replacing only with --overwrite)."""
    if path.exists():
        try:
            differences = identity_differences(open_store(path).attrs, attrs)
        except UserError:
            if not overwrite:
                raise
            differences = ["not a readable label store"]
        if not differences:
            return zarr.open_group(path, mode="r+", zarr_format=3)
        if not overwrite:
            raise UserError(f"{path}: an existing store made differently ({'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''}); pass --overwrite to replace it or choose another --out")
    tmp = temporary_path(path)
    create_store(tmp, attrs)
    publish(tmp, path)
    return zarr.open_group(path, mode="r+", zarr_format=3)


def run_actors(job: DumpJob, pending: list[int], actors: int, gpus_per_actor: float, in_flight: int,
               total: int) -> tuple[list[dict[str, Any]], float]:
    """Label the pending shards on a pool of actors, `in_flight` shards each at a time.

    Returns one report per shard and the labelling time, counted once every actor has loaded its model.
    """
    actor_class = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                             max_concurrency=in_flight)(ShardLabeler)
    pool = [actor_class.options(num_cpus=job.threads, num_gpus=gpus_per_actor).remote(job)
            for _ in range(min(actors, len(pending)))]
    todo, running, reports = deque(pending), {}, []
    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool])
    except ray.exceptions.RayActorError as e:
        cause = str(e).strip().splitlines()[-1]  # the creation task's exception, last line of its traceback
        raise UserError(f"{job.checkpoint}: the labeler actors failed to start ({cause})") from None
    started = time.perf_counter()

    def submit(actor: Any) -> None:
        if todo:
            position = todo.popleft()
            running[actor.label_shard.remote(position)] = (actor, position)

    for actor in pool:
        for _ in range(in_flight):
            submit(actor)
    bar = tqdm(total=total, initial=total - len(pending), unit="shard", desc="label shards")
    try:
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            actor, position = running.pop(ready)
            reports.append(task_result(ready, job.manifest.shards(job.split)[position][0]))
            bar.update(1)
            submit(actor)
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor)
    return reports, time.perf_counter() - started


def task_result(ref: ray.ObjectRef, shard: str) -> dict[str, Any]:
    """A shard's report; a bad-input error or a worker that kept dying becomes one line (finished shards stay)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise UserError(str(e.cause)) from None
        raise
    except ray.exceptions.RayActorError as e:
        raise UserError(f"{shard}: the labeler actor was lost after {MAX_RETRIES} restarts ({type(e).__name__}); "
                        f"finished shards are kept: run the same command again to resume") from None


def dump(shards: Path, checkpoint: Path, out: Path, *, split: str = "train", topk: int = 5,
         input_size: int | None = None, crop_pct: float = 1.0, batch_size: int = 64, threads: int = 1,
         address: str | None = None, gpus_per_actor: float | None = None, actors: int | None = None,
         in_flight: int = 2, on_error: str = "raise", overwrite: bool = False) -> dict[str, Any]:
    """Fill (or resume) the store at `out`; returns a summary with the labelling throughput."""
    manifest = load_manifest(shards)
    manifest.split(split)
    if min(topk, batch_size, threads, in_flight) < 1:
        raise UserError("--topk, --batch-size, --threads-per-actor and --shards-in-flight must be at least 1")
    if on_error not in ON_ERROR:
        raise UserError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if out.exists() and not (out / "zarr.json").is_file():
        raise UserError(f"{out}: exists and is not a label store; not replacing it (even with --overwrite): "
                        f"remove it yourself or choose another --out")
    with store_lock(out):
        meta, config, grid = probe_labeler(checkpoint, input_size)
        if meta["num_classes"] != manifest.num_classes:
            raise UserError(f"{checkpoint}: labeler has {meta['num_classes']} classes, {shards} has {manifest.num_classes}")
        if topk > meta["num_classes"]:
            raise UserError(f"--topk {topk} exceeds the labeler's {meta['num_classes']} classes")
        started_ray = start_ray(address)
        try:
            if gpus_per_actor is None:
                gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            footprint = make_footprint(meta["input_size"], crop_pct, config["interpolation"])
            attrs = store_attrs(
                num_classes=meta["num_classes"], k=topk, grid=grid, footprint=footprint,
                labeler={"model": meta["model"], "sha256": meta["sha256"], "input_size": meta["input_size"],
                         "epoch": meta["epoch"], "mean": list(config["mean"]), "std": list(config["std"])},
                dataset=dataset_attrs(manifest, split),
                producer={"tool": "dump.dump_labels", "batch_size": batch_size, "threads_per_actor": threads,
                          "device": "cuda" if gpus_per_actor > 0 else "cpu"})
            group = open_or_create(out, attrs, overwrite)
            pending = [int(i) for i in np.flatnonzero(group["done"][:] == 0)]
            job = DumpJob(manifest, split, str(checkpoint.resolve()), str(out.resolve()), topk, footprint,
                          tuple(config["mean"]), tuple(config["std"]), batch_size, threads, on_error,
                          gpus_per_actor > 0)
            if actors is None:
                resources = ray.cluster_resources()
                actors = int(resources.get("GPU", 0) // gpus_per_actor if gpus_per_actor else resources["CPU"] // threads)
            reports, seconds = run_actors(job, pending, max(1, actors), gpus_per_actor, in_flight,
                                          len(manifest.shards(split))) if pending else ([], 0.0)
        finally:
            if started_ray:
                ray.shutdown()
        skipped = mark_complete(group)
    labelled = sum(r["labelled"] for r in reports)
    for report in reports:
        for line in report["skipped"]:
            print(f"skipped {report['shard']}: {line}", file=sys.stderr)
    return {"rows": manifest.count(split), "shards": len(manifest.shards(split)), "dumped_shards": len(reports),
            "labelled": labelled, "skipped": skipped, "seconds": seconds,
            "images_per_second": labelled / seconds if reports else 0.0, "grid": grid}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json (shards/NAME)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="labeler checkpoint (last.pt); its EMA weights are used")
    parser.add_argument("--out", type=Path, required=True, help="label store to write, e.g. shards/NAME/labels/fan.zarr")
    parser.add_argument("--split", default="train")
    parser.add_argument("--topk", type=int, default=5, help="labels kept per token")
    parser.add_argument("--input-size", type=int, default=None, help="labeler input side S (default: its training size)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="centre crop share of the shorter side, in (0, 1]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads-per-actor", type=int, default=1, help="torch threads (and CPUs reserved) per actor")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--actors", type=int, default=None, help="default: one per GPU, or per threads-per-actor CPUs")
    parser.add_argument("--shards-in-flight", type=int, default=2, help="shards each actor decodes/writes concurrently")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise",
                        help="corrupt samples: stop naming shard and key, or record them in the store and go on")
    parser.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    summary = dump(args.shards, args.checkpoint, args.out, split=args.split, topk=args.topk,
                   input_size=args.input_size, crop_pct=args.crop_pct, batch_size=args.batch_size,
                   threads=args.threads_per_actor, address=args.address, gpus_per_actor=args.num_gpus_per_actor,
                   actors=args.actors, in_flight=args.shards_in_flight, on_error=args.on_error,
                   overwrite=args.overwrite)
    if not summary["dumped_shards"]:
        print(f"{args.out}: already complete ({summary['rows']} rows); nothing to do")
        return
    skipped = summary["skipped"]
    print(f"wrote {args.out}: {summary['rows']} rows, grid {summary['grid'][0]}x{summary['grid'][1]}, top-{args.topk}; "
          f"{summary['dumped_shards']} of {summary['shards']} shards labelled now at "
          f"{summary['images_per_second']:.1f} img/s"
          + (f"; {len(skipped)} corrupt sample(s) skipped and recorded (rows {[s['row'] for s in skipped][:10]})"
             if skipped else ""))


if __name__ == "__main__":  # run main from the imported module: Ray ships actor classes of __main__ by value
    from dump.dump_labels import main as imported_main

    imported_main()
