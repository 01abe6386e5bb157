"""Cost of token labels in the student data path, and the data path rendered in the workers (PIL) or on the device.

    python -m benchmarks.bench_datapath [--geometries demo imagenet --images 512 --repeats 3 --threads 1]

Two geometries, each built into a temporary folder: "demo" (the demo set's 64x64 images, 8x8 maps, K=10, k=5,
a 64 px student with 8 px patches) and "imagenet" (generated JPEGs of mixed sizes around 320x256 by default,
landscape and portrait, in an ImageFolder of 1000 classes through shards.build, 18x18 maps, K=1000, k=5 as LV-ViT's
NFNet-F6 files, a 224 px student with 16 px patches). Maps are random top-k .pt files imported with
dump.lvvit.import_lvvit; the trainer's augmentation (RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1,
RandomErasing 0.25).

Table 1, per sample, in one process (CPU time; wall time on CUDA), in shard order as a worker sees it: the
image path (tar read and decode, the seeded augmentation, collating the image) against what labels add (the
store read, whole-shard chunk reads and the store's opening amortised; the footprint box and collating the
label fields; then per batch token_label_targets at points=1 and 2: resampling the stored top-k through each
mapping onto the token grid and the Gumbel draw, kept as class ids). The mapping the labels are resampled
through is the one the augmentation draws to warp the image; its cost, timed apart, is shown as part of the
image path. Goal: label < 10% of image.

Table 2, the whole loader as the trainer builds it (DataLoader over StudentData, batch, drop_last, workers
restarted per pass), in both --augment-on modes: "workers" (PIL in the workers) and "device" (the workers read
bytes and draw; train.device_augment decodes, warps, colours and erases each batch in this process, on --device),
each without a store and with one plus token_label_targets (points=2) on every batch: wall samples/s and CPU
time per sample of this process and of its workers. The variants alternate in rotating order; medians over the
repeats. On a machine with fewer free cores than workers + 1, the wall figures are noisy; CPU is steadier.

Table 3, training (--train-steps > 0): the same student (--train-model, by geometry) built by train.student from
flags, its steps fed by each mode's loader with token labels (a fresh loader per pass, --warmup untimed steps),
against its steps on one batch already on the device ("synthetic"): steps/s and their ratio (goal on a GPU node,
DeiT-S: >= 0.9 with --augment-on device).
"""

import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from common.errors import UserError, cli
from core.engine import train_step
from core.seeding import seed_all
from dump.lvvit import import_lvvit
from dump.store.reader import LabelStore
from dump.store.schema import footprint_box
from shards.build import build
from shards.demo import build_demo
from shards.manifest import load_manifest
from shards.reader import read_shard, split_keys
from train.augment import LabelAwareTransform
from train.data import AUGMENT_ON, StoreJoin, StudentData, token_label_targets
from train.student import Run, build_parser


@dataclass(frozen=True)
class Geometry:
    name: str
    image: tuple[int, int]  # original images (width, height)
    img_size: int           # student input side
    patch: int              # student pixels per token
    map_grid: int           # stored map side
    k: int
    num_classes: int
    labeler_input: int      # recorded in the store's footprint
    size_jitter: float = 0.0  # images vary in size by up to this share, half of them portrait

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size // self.patch, self.img_size // self.patch


TRAIN_MODELS = {"demo": "fan_demo_tiny_p8", "imagenet": "deit_small_patch16_224"}  # table 3's students
GEOMETRIES = {
    "demo": Geometry("demo", (64, 64), 64, 8, 8, 5, 10, 64),
    "imagenet": Geometry("imagenet", (320, 256), 224, 16, 18, 5, 1000, 576, size_jitter=0.2),
}


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG (quality 90) of a smooth random colour field with grain: decodes like a small photograph."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, 10, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_imagefolder(folder: Path, geo: Geometry, images: int, per_shard: int) -> Path:
    """Shards of `images` training photos spread over num_classes class folders (most classes may stay empty), and
    a val split of one in eight as many (which train.student requires)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(1, images // 8))):
        for c in range(geo.num_classes):
            (folder / "images" / split / f"c{c:04d}").mkdir(parents=True)
        for i in range(count):
            width, height = (round(side * rng.uniform(1 - geo.size_jitter, 1 + geo.size_jitter)) for side in geo.image)
            size = (height, width) if geo.size_jitter and rng.random() < 0.5 else (width, height)
            (folder / "images" / split / f"c{i * geo.num_classes // count:04d}" / f"img_{i:06d}.jpg").write_bytes(
                photo(rng, *size))
    with contextlib.redirect_stdout(sys.stderr):
        build(folder / "images", folder / "shards", per_shard, seed=0, overwrite=False)
    return folder / "shards"


def write_maps(root: Path, out: Path, geo: Geometry) -> None:
    """One LV-ViT file [2, k, H, W] float16 per key: descending random logits over a few classes per image."""
    rng = np.random.default_rng(1)
    cells = geo.map_grid * geo.map_grid
    for key in split_keys(root, "train"):
        candidates = rng.choice(geo.num_classes, size=min(3 * geo.k, geo.num_classes), replace=False)
        classes = rng.permuted(np.tile(candidates, (cells, 1)), axis=1)[:, :geo.k].T
        scores = -np.sort(-rng.normal(0, 3, (geo.k, cells)), axis=0)
        maps = np.stack([scores, classes]).reshape(2, geo.k, geo.map_grid, geo.map_grid)
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(maps.astype(np.float16)), out / f"{key}.pt")


def build_dataset(folder: Path, geo: Geometry, images: int, per_shard: int) -> tuple[Path, Path]:
    """(shard folder, label store) of `geo` under `folder`."""
    if geo.name == "demo":
        root = folder / "shards"
        build_demo(root, train=images, val=max(1, images // 8), size=geo.image[0], per_shard=per_shard)
    else:
        root = build_imagefolder(folder, geo, images, per_shard)
    write_maps(root, folder / "maps", geo)
    store = root / "labels" / "bench.zarr"
    import_lvvit(folder / "maps", store, root, input_size=geo.labeler_input)
    return root, store


def trainer_transform(img_size: int) -> LabelAwareTransform:
    """train.student's training view with its default flags."""
    return LabelAwareTransform(img_size, scale=(0.08, 1.0), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1",
                               re_prob=0.25)


class Clock:
    """Accumulated seconds per named section: process CPU time (steadier on a shared machine), or with CUDA
    wall time read after synchronising."""

    def __init__(self, device: torch.device):
        self.device, self.totals = device, defaultdict(float)
        self.now = time.perf_counter if device.type == "cuda" else time.process_time

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self.now()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name] += self.now() - start


def breakdown_pass(root: Path, store: Path, geo: Geometry, batch: int, device: torch.device) -> dict[str, float]:
    """Seconds per sample of each section, over one pass of the split in shard order."""
    manifest = load_manifest(root)
    transform = trainer_transform(geo.img_size)
    join = StoreJoin(LabelStore(store), manifest.offsets("train"))  # a fresh store, as a new worker gets it
    footprint = LabelStore(store).footprint
    generator = torch.Generator(device).manual_seed(0)
    clock, pending, samples, batched = Clock(device), [], 0, 0
    for name, _ in manifest.shards("train"):
        shard = read_shard(root, "train", name, manifest=manifest)
        while True:
            with clock("read + decode"):
                sample = next(shard, None)
            if sample is None:
                break
            with clock("store read"):
                sample = join(sample)
            image, samples = sample["image"], samples + 1
            with clock("augment"):
                seed_all(0, 0, sample["index"])
                tensor, mapping = transform(image)
            with clock("mapping (in augment)"):
                transform.draw(image)
            with clock("footprint"):
                box = np.asarray(footprint_box(footprint, *image.size), np.float32)
            pending.append(({"image": tensor, "cls": sample["cls"], "index": sample["index"]},
                            {"mapping": mapping, "footprint": box, "scores": sample["scores"],
                             "classes": sample["classes"]}))
            if len(pending) < batch:
                continue
            images, labels = zip(*pending)
            pending, batched = [], batched + batch
            with clock("collate image"):
                default_collate(list(images))
            with clock("collate labels"):
                b = {k: v.to(device) for k, v in default_collate(list(labels)).items()}
            for points in (1, 2):
                with clock(f"token targets p={points}"):
                    token_label_targets(b, geo.num_classes, geo.img_size, geo.grid, points=points,
                                        generator=generator)
    per_batch = ("collate image", "collate labels", "token targets p=1", "token targets p=2")
    return {k: v / (batched if k in per_batch else samples) for k, v in clock.totals.items()}


IMAGE_PARTS = ("read + decode", "augment", "collate image")
LABEL_PARTS = ("store read", "footprint", "collate labels", "token targets p=1", "token targets p=2")


def breakdown_rows(geo: Geometry, root: Path, store: Path, args: argparse.Namespace,
                   device: torch.device) -> list[dict]:
    passes = [breakdown_pass(root, store, geo, args.batch, device) for _ in range(args.repeats)]
    ms = {k: 1e3 * statistics.median(p[k] for p in passes) for k in passes[0]}
    image = sum(ms[k] for k in IMAGE_PARTS)

    def row(path: str, part: str, value: float, bold: bool = False) -> dict:
        share = f"{100 * value / image:.1f}"
        return {"geometry": geo.name, "path": path, "part": part, "ms/sample": f"{value:.3f}",
                "% of image": f"**{share}**" if bold else share}

    rows = [row("image", k, ms[k]) for k in IMAGE_PARTS] + [row("image", "**total**", image)]
    rows.append(row("image", "of which: drawing the mapping (reused by the labels)", ms["mapping (in augment)"]))
    rows += [row("label", k, ms[k]) for k in LABEL_PARTS]
    for points in (2, 1):
        label = sum(ms[k] for k in LABEL_PARTS if not k.startswith("token targets")) + ms[f"token targets p={points}"]
        rows.append(row("label", f"**total, points={points}**", label, bold=True))
    return rows


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process and of its reaped children (DataLoader workers, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def batches(data: StudentData, workers: int, batch: int, device: torch.device) -> Iterator[dict]:
    """One epoch of batches as train.student.Run.loader makes them, everything moved to `device`."""
    loader = DataLoader(data, batch_size=batch, num_workers=min(workers, len(data.rank_shards())), drop_last=True,
                        collate_fn=data.collate, pin_memory=device.type == "cuda")
    stage = data.device_stage(device) if data.collate is not None else None
    for b in stage.batches(loader) if stage else loader:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


def loader_pass(data: StudentData, geo: Geometry, workers: int, points: int | None, batch: int,
                device: torch.device) -> tuple[float, float, float]:
    """(wall, CPU of this process, CPU of its workers) seconds per sample of one epoch through the trainer's
    DataLoader (and, in device mode, the device stage), plus the token targets of every batch when `points` is
    given."""
    generator = torch.Generator(device).manual_seed(0)
    wall, (main_cpu, worker_cpu), seen = time.perf_counter(), cpu_seconds(), 0
    for b in batches(data, workers, batch, device):  # workers are shut down (and reaped) when the epoch ends
        if points is not None:
            token_label_targets(b, geo.num_classes, geo.img_size, geo.grid, points=points, generator=generator)
        seen += len(b["cls"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    main_now, workers_now = cpu_seconds()
    return (time.perf_counter() - wall) / seen, (main_now - main_cpu) / seen, (workers_now - worker_cpu) / seen


def loader_rows(geo: Geometry, root: Path, store: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    transform = trainer_transform(geo.img_size)
    variants = {(mode, labels): (StudentData(root, store if labels else None, transform, augment_on=mode),
                                 2 if labels else None)
                for mode in AUGMENT_ON for labels in (False, True)}
    names = list(variants)
    rows = []
    for workers in args.workers:
        times = defaultdict(list)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                data, points = variants[name]
                times[name].append(loader_pass(data, geo, workers, points, args.batch, device))
        median = {name: [statistics.median(t) for t in zip(*times[name])] for name in names}
        wall0, main0, workers0 = median[names[0]]
        for (mode, labels) in names:
            wall, main_cpu, worker_cpu = median[mode, labels]
            rows.append({"geometry": geo.name, "workers": workers, "--augment-on": mode,
                         "token labels": "points=2" if labels else "no", "samples/s": f"{1 / wall:.0f}",
                         "wall vs workers, no labels": f"{wall / wall0:.3f}",
                         "CPU ms/sample: main + workers": f"{1e3 * main_cpu:.2f} + {1e3 * worker_cpu:.2f}",
                         "CPU vs workers, no labels": f"{(main_cpu + worker_cpu) / (main0 + workers0):.3f}"})
    return rows


def training_rows(geo: Geometry, root: Path, store: Path, args: argparse.Namespace, device: torch.device,
                  tmp: Path) -> list[dict]:
    """Table 3: the student's steps/s fed by each mode's loader against steps on one batch already on the device."""
    model = args.train_model or TRAIN_MODELS[geo.name]
    rows, synthetic = [], None
    for mode in AUGMENT_ON:
        flags = ["--labels", str(store), "--shards", str(root), "--model", model, "--epochs", "1",
                 "--out", str(tmp / f"run-{mode}"), "--img-size", str(geo.img_size), "--batch-size", str(args.batch),
                 "--workers", str(max(args.workers)), "--augment-on", mode, "--device", str(device),
                 "--max-steps", str(args.warmup + args.train_steps)]
        if not model.startswith("fan"):
            flags += ["--patch-size", str(geo.patch)]
        with contextlib.redirect_stdout(sys.stderr):
            run = Run(build_parser().parse_args(flags))
        if run.steps < args.warmup + args.train_steps:
            raise UserError(f"{args.images} images make {run.steps} batches of {args.batch} per epoch, fewer than "
                            f"--warmup + --train-steps ({args.warmup + args.train_steps}); pass more --images")
        fed = statistics.median(steps_pass(run, args, r) for r in range(args.repeats))
        if synthetic is None:  # the same student on one batch on the device: the step rate without a data path
            batch = next(iter(batches(run.train_data, 0, args.batch, device)))
            synthetic = statistics.median(steps_pass(run, args, r, batch) for r in range(args.repeats))
            rows.append({"geometry": geo.name, "model": model, "data": "synthetic (one batch on the device)",
                         "steps/s": f"{1 / synthetic:.2f}", "samples/s": f"{args.batch / synthetic:.0f}",
                         "vs synthetic": "1"})
        rows.append({"geometry": geo.name, "model": model, "data": f"--augment-on {mode}, token labels",
                     "steps/s": f"{1 / fed:.2f}", "samples/s": f"{args.batch / fed:.0f}",
                     "vs synthetic": f"**{synthetic / fed:.3f}**"})
    return rows


def steps_pass(run: Run, args: argparse.Namespace, epoch: int, batch: dict | None = None) -> float:
    """Wall seconds per training step (core.engine.train_step) after --warmup steps: fed by a fresh loader, or
    by `batch` again and again."""
    run.train_data.set_epoch(epoch)
    fed = run.loader() if batch is None else itertools.repeat(batch)
    stream = iter(fed)
    for step in range(args.warmup):
        train_step(run.objective, run.optim, next(stream), epoch, step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.train_steps):
        train_step(run.objective, run.optim, next(stream), epoch, step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    del stream, fed  # stops the workers, as the end of an epoch does
    return seconds / args.train_steps


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--geometries", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES))
    parser.add_argument("--images", type=int, default=512, help="training images per geometry")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"),
                        help="the imagenet geometry's typical image (default 320 256; ImageNet's: 500 375)")
    parser.add_argument("--per-shard", type=int, default=256, help="images per tar shard (= rows per store chunk)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers of table 2")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tables", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--train-geometries", nargs="+", choices=list(GEOMETRIES),
                        default=["imagenet" if cuda else "demo"], help="geometries of table 3")
    parser.add_argument("--train-model", help=f"table 3's student (default by geometry: {TRAIN_MODELS})")
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps per pass in table 3")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per pass in table 3")
    parser.add_argument("--dir", type=Path, help="build the data here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    breakdown, loaders, training = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.geometries:
            geo = GEOMETRIES[name]
            if args.image_size and name == "imagenet":
                geo = dataclasses.replace(geo, image=tuple(args.image_size))
            root, store = build_dataset(Path(tmp) / name, geo, args.images, args.per_shard)
            if 1 in args.tables:
                breakdown += breakdown_rows(geo, root, store, args, device)
            if 2 in args.tables:
                loaders += loader_rows(geo, root, store, args, device)
            if 3 in args.tables and name in args.train_geometries:
                training += training_rows(geo, root, store, args, device, Path(tmp))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
    print(f"{args.images} images per geometry in shards of {args.per_shard}, batch {args.batch}, {args.repeats} "
          f"repeats, {args.threads} torch thread(s) on {device} ({where}), load average "
          f"{load:.2f} -> {os.getloadavg()[0]:.2f}, torch {torch.__version__}\n")
    for title, rows in (("Per sample: image path vs label path (goal: label total < 10% of image total)", breakdown),
                        ("Whole loader (StudentData + DataLoader as in train.student, with --augment-on device its "
                         "device stage; with labels: + token_label_targets)", loaders),
                        ("Training steps fed by each data path against one batch already on the device", training)):
        if rows:
            print(f"{title}\n\n{markdown(rows)}\n")


if __name__ == "__main__":
    main()
