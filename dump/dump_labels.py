"""The label dump: run a labeler over every tar shard of a split and write its top-k token maps to a store.

    python -m dump.dump_labels --shards shards/demo --checkpoint runs/labeler/last.pt --out shards/demo/labels/fan.zarr

Also runs as `ray job submit --working-dir . -- python -m dump.dump_labels ...` and as
`ray submit CLUSTER.yaml dump/dump_labels.py -- ...` (examples/cluster-local.yaml; `ray submit` copies this file
alone to the head's home folder, so tokenlabel must be installed there, and relative paths are read from there:
give absolute paths or URLs). Without
--address it joins the cluster a `ray start` on this machine runs, else starts a local Ray (`--address local`
always starts a private one). On a multi-node cluster the shards, checkpoint and store must be on storage every
node sees.

The engine is Ray Data (dump/ray_engine.py): decode tasks on every CPU of the cluster, an actor pool of labelers
(one per GPU), the writer here. `--engine local` runs the same decoders and labeler on this machine without Ray.
On GPUs the forward runs in bfloat16 and the JPEGs are decoded on the device (nvJPEG) by default; on CPUs in
float32 with PIL decode. Killed at any moment, the same command resumes: finished shards are skipped and the
result is bitwise equal to an uninterrupted dump, since every batch is a fixed run of rows of one tar shard (the
store records batch size, device, precision and decoder, and refuses to resume with different ones).
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: `python dump/dump_labels.py`, or a copy of it alone (`ray submit`)
    CHECKOUT = Path(__file__).resolve().parents[1]
    if (CHECKOUT / "dump" / "__init__.py").is_file():  # in a checkout: import it, here and in Ray's workers
        sys.path.insert(0, str(CHECKOUT))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))
    elif importlib.util.find_spec("dump") is None:
        print(f"error: {__file__} runs alone here and tokenlabel is not installed for {sys.executable}; install "
              "it on this node (pip install -e CHECKOUT; a cluster config's setup_commands)", file=sys.stderr)
        sys.exit(2)

import numpy as np
import torch
import zarr
from timm.data import resolve_model_data_config

from common.errors import UserError, cli
from common.files import refuse_overlap
from core.imaging.pil import RESAMPLE
from dump.job import DECODERS, PRECISIONS, DumpJob
from dump.store.reader import open_store
from dump.store.schema import create_store, dataset_attrs, identity_differences, make_footprint, store_attrs
from dump.store.write import mark_complete, publishing, refuse_foreign, store_lock
from dump.writer import ShardWriter
from labeler.load import load_labeler
from labeler.receptive import input_shift, token_geometry
from shards.manifest import load_manifest
from shards.reader import ON_ERROR

ENGINES = ("ray", "local")


def probe_labeler(checkpoint: Path, input_size: int | None) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
    """Load the labeler once in the driver: (its identity and token geometry, its data config, the token grid at
    the input size).

    The input size must be a multiple of the labeler's stride (labeler.receptive.token_geometry), so that the
    grid's cells tile the labeler's tokens exactly.
    """
    model, meta = load_labeler(checkpoint, "cpu")
    config = resolve_model_data_config(model)
    size = input_size or meta["img_size"]
    geometry = token_geometry(model, meta["img_size"])
    stride = geometry["stride"]
    if size < stride or size % stride:
        raise UserError(f"--input-size {size} is not a multiple of labeler {meta['model']}'s stride {stride}; "
                        f"use e.g. {max(stride, size // stride * stride)} or {(size // stride + 1) * stride}")
    try:
        with torch.inference_mode():
            _, _, grid = model.forward_dense(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"--input-size {size} does not suit labeler {meta['model']} ({e})") from e
    if tuple(grid) != (size // stride, size // stride):
        raise UserError(f"--input-size {size}: labeler {meta['model']} gives a {grid[0]}x{grid[1]} grid, not "
                        f"{size // stride}x{size // stride}; use its training size {meta['img_size']}")
    if config["interpolation"] not in RESAMPLE:
        raise UserError(f"labeler interpolation {config['interpolation']!r} is not supported by the dump; "
                        f"use one of {', '.join(RESAMPLE)}")
    return {**meta, **geometry, "input_size": size}, config, tuple(grid)


def open_or_create(path: Path, attrs: dict[str, Any], overwrite: bool) -> zarr.Group:
    """The store to fill: resumed if it has exactly these attributes, else created (replacing, only with
    --overwrite, the store of ours the caller found there: `refuse_foreign`)."""
    if path.exists():
        try:
            differences = identity_differences(open_store(path).attrs, attrs)
        except UserError:  # ours, but of another version or unreadable
            if not overwrite:
                raise
            differences = ["not a store this version reads"]
        if not differences:
            return zarr.open_group(path, mode="r+", zarr_format=3)
        if not overwrite:
            raise UserError(f"{path}: an existing store made differently ({'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''}); pass --overwrite to replace it or choose another --out")
    with publishing(path) as tmp:
        create_store(tmp, attrs)
    return zarr.open_group(path, mode="r+", zarr_format=3)


def placement(engine: str, gpus_per_actor: float | None, actors: int | None,
              threads: int) -> tuple[str, float, int, float]:
    """(device, GPUs per actor, actors, CPUs per actor) for the engine, from the cluster (or this machine)."""
    if engine == "local":
        return ("cuda" if torch.cuda.is_available() else "cpu"), 0.0, 1, 0.0
    import ray

    resources = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if gpus_per_actor > 0:
        return "cuda", gpus_per_actor, actors or max(1, int(resources.get("GPU", 0) // gpus_per_actor)), 1.0
    cpus = int(resources.get("CPU", 1))
    actors = actors or max(1, cpus // 2 // threads)  # about half the CPUs label, the rest decode
    if actors * threads >= cpus:
        raise UserError(f"{actors} labeler actor(s) x {threads} thread(s) take all {cpus} CPUs of the Ray cluster, "
                        f"none is left to decode; pass fewer --actors or --threads-per-actor")
    return "cpu", 0.0, actors, float(threads)


def dump(shards: Path, checkpoint: Path, out: Path, *, split: str = "train", topk: int = 5,
         input_size: int | None = None, crop_pct: float = 1.0, batch_size: int = 256, threads: int = 1,
         precision: str = "auto", decode: str = "auto", engine: str = "ray", address: str | None = None,
         gpus_per_actor: float | None = None, actors: int | None = None, workers: int | None = None,
         on_error: str = "raise", overwrite: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Fill (or resume) the store at `out`; returns a summary with the labelling throughput. `verbose`: Ray's own
    reports (warnings, workers' output, its tracebacks of a failure) on stderr too."""
    manifest = load_manifest(shards)
    manifest.split(split)
    if min(topk, batch_size, threads) < 1 or (actors is not None and actors < 1):
        raise UserError("--topk, --batch-size, --threads-per-actor and --actors must be at least 1")
    for name, value, choices in (("--on-error", on_error, ON_ERROR), ("--engine", engine, ENGINES),
                                 ("--precision", precision, ("auto", *PRECISIONS)),
                                 ("--decode", decode, ("auto", *DECODERS))):
        if value not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    refuse_overlap(out, {"--shards": shards, "--checkpoint": checkpoint})
    refuse_foreign(out, "--out")
    with store_lock(out):
        meta, config, grid = probe_labeler(checkpoint, input_size)
        if meta["num_classes"] != manifest.num_classes:
            raise UserError(f"{checkpoint}: labeler has {meta['num_classes']} classes, {shards} has {manifest.num_classes}")
        if topk > meta["num_classes"]:
            raise UserError(f"--topk {topk} exceeds the labeler's {meta['num_classes']} classes")
        started_ray = False
        if engine == "ray":
            from dump.ray_engine import start_ray

            started_ray = start_ray(address, verbose)
        try:
            device, gpus_per_actor, actors, cpus_per_actor = placement(engine, gpus_per_actor, actors, threads)
            precision = precision if precision != "auto" else "bf16" if device == "cuda" else "fp32"
            decode = decode if decode != "auto" else "device" if device == "cuda" else "cpu"
            footprint = make_footprint(meta["input_size"], crop_pct, config["interpolation"],
                                       shift=input_shift(meta))
            attrs = store_attrs(
                num_classes=meta["num_classes"], k=topk, grid=grid, footprint=footprint,
                labeler={"model": meta["model"], "sha256": meta["sha256"], "input_size": meta["input_size"],
                         "epoch": meta["epoch"], "mean": list(config["mean"]), "std": list(config["std"]),
                         "stride": meta["stride"], "token_centre": meta["centre"]},
                dataset=dataset_attrs(manifest, split),
                producer={"tool": "dump.dump_labels", "batch_size": batch_size, "device": device,
                          "precision": precision, "decode": decode,
                          **({"threads_per_actor": threads} if device == "cpu" else {})})
            group = open_or_create(out, attrs, overwrite)
            pending = [int(i) for i in np.flatnonzero(group["done"][:] == 0)]
            job = DumpJob(manifest, split, str(checkpoint.resolve()), str(out.resolve()), topk, footprint,
                          tuple(config["mean"]), tuple(config["std"]), batch_size, threads, on_error, device,
                          precision, decode, meta["sha256"])
            writer = ShardWriter(job)
            try:
                if pending and engine == "ray":
                    from dump.ray_engine import run_ray

                    run_ray(job, pending, writer, actors, gpus_per_actor, cpus_per_actor, verbose)
                elif pending:
                    from dump.local_engine import run_local

                    run_local(job, pending, writer, workers)
            except BaseException:
                writer.stop()  # the shards complete so far are still written: a resume skips them
                raise
            reports, rate = writer.finish()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        skipped = mark_complete(group)
    for report in reports:
        for line in report["skipped"]:
            print(f"skipped {report['shard']}: {line}", file=sys.stderr)
    return {"rows": manifest.count(split), "shards": len(manifest.shards(split)), "dumped_shards": len(reports),
            "labelled": sum(r["labelled"] for r in reports), "skipped": skipped, "images_per_second": rate,
            "grid": grid, "device": device, "precision": precision, "decode": decode,
            "decoded_on": sorted({n for r in reports for n in r["decoded_on"]}),
            "labelled_on": sorted({n for r in reports for n in r["labelled_on"]})}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json (shards/NAME)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="labeler checkpoint (last.pt); its EMA weights are used")
    parser.add_argument("--out", type=Path, required=True, help="label store to write, e.g. shards/NAME/labels/fan.zarr")
    parser.add_argument("--split", default="train")
    parser.add_argument("--topk", type=int, default=5, help="labels kept per token")
    parser.add_argument("--input-size", type=int, default=None,
                        help="labeler input side S, a multiple of its stride (default: its training size)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="centre crop share of the shorter side, in (0, 1]")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per forward, cut from one tar shard (lower it if it does not fit the GPU)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="forward precision (autocast): auto is bf16 on GPUs, fp32 on CPUs")
    parser.add_argument("--decode", choices=("auto", *DECODERS), default="auto",
                        help="where JPEGs are decoded and resampled: cpu (PIL, on every CPU of the cluster) or device "
                             "(torchvision/nvJPEG on the labeler's GPU); auto: device on GPUs, else cpu")
    parser.add_argument("--engine", choices=ENGINES, default="ray",
                        help="ray: Ray Data over the cluster; local: this machine only, without Ray")
    parser.add_argument("--threads-per-actor", type=int, default=1, help="CPU labelers: torch threads (and CPUs reserved) each")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a running `ray start` cluster of this "
                             "machine, else a local Ray); `local` always starts a private local Ray")
    parser.add_argument("--num-gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--actors", type=int, default=None,
                        help="labeler actors (default: one per GPU; on CPUs, half the CPUs over --threads-per-actor)")
    parser.add_argument("--workers", type=int, default=None, help="--engine local: decode processes (default: every CPU)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise",
                        help="corrupt samples: stop naming shard and key, or record them in the store and go on")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a label store made with other settings (nothing but a label store)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own reports on stderr too: its warnings, its workers' output and its tracebacks of "
                             "a failure (else a failure is one line, and Ray's reports stay in its log files)")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    summary = dump(args.shards, args.checkpoint, args.out, split=args.split, topk=args.topk,
                   input_size=args.input_size, crop_pct=args.crop_pct, batch_size=args.batch_size,
                   threads=args.threads_per_actor, precision=args.precision, decode=args.decode, engine=args.engine,
                   address=args.address, gpus_per_actor=args.num_gpus_per_actor, actors=args.actors,
                   workers=args.workers, on_error=args.on_error, overwrite=args.overwrite, verbose=args.verbose)
    if not summary["dumped_shards"]:
        print(f"{args.out}: already complete ({summary['rows']} rows); nothing to do")
        return
    skipped = summary["skipped"]
    print(f"wrote {args.out}: {summary['rows']} rows, grid {summary['grid'][0]}x{summary['grid'][1]}, top-{args.topk}; "
          f"{summary['dumped_shards']} of {summary['shards']} shards labelled now at "
          f"{summary['images_per_second']:.1f} img/s ({summary['device']}, {summary['precision']}, "
          f"{summary['decode']} decode)"
          + (f"; {len(skipped)} corrupt sample(s) skipped and recorded (rows {[s['row'] for s in skipped][:10]})"
             if skipped else ""))


if __name__ == "__main__":  # run main from the imported module: Ray ships functions of __main__ by value
    from dump.dump_labels import main as imported_main

    imported_main()
