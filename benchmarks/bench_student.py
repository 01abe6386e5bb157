"""Training-step cost of offline token labels against the --no-token-labels baseline and STL's online teacher.

    python -m benchmarks.bench_student [--models vit_tiny_patch16_224 fan_demo_tiny_p8 --batch 32 --steps 5 --repeats 3]

Builds the demo set (64x64 images, K=10) with a store of random 8x8 top-5 maps (dump.lvvit.import_lvvit) and
an untrained fan_demo_tiny_p8 labeler checkpoint (weights do not change the cost), then makes one
train.student `Run` per variant from parsed command-line flags: the baseline (--no-token-labels), offline
token labels, offline with --tl-align dense, offline with --mix mixtoken, and the online labeler
(--online-labeler CKPT: the labeler runs on the clean view inside every step, STL's design). Every variant
uses the same batch, workers and torch threads, at 64 px (ViTs with --patch-size 8: an 8x8 token grid).

A timed pass is what an epoch does (core.engine.train_one_epoch): a fresh DataLoader iterator over the run's
StudentData, then `core.engine.train_step` on the run's objective for --warmup untimed and --steps timed
batches, data loading included. Variants run in rotating order each repeat; the table gives the median
per-step wall time and main-process CPU time and their ratios to the baseline (goal: offline <= 1.05x).
"FLOPs" is the online teacher's expected ratio, 1 + labeler forward / (3 x student forward).
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_datapath import GEOMETRIES, build_dataset, markdown
from core.checkpoint import save_checkpoint
from core.engine import train_step
from shards.errors import cli
from train.student import Run, build_parser

LABELER = "fan_demo_tiny_p8"
VARIANTS = {
    "baseline (--no-token-labels)": ["--no-token-labels"],
    "offline token labels": [],
    "offline + --tl-align dense": ["--tl-align", "dense"],
    "offline + --mix mixtoken": ["--mix", "mixtoken"],
    "online labeler": ["--online-labeler"],
}


def make_labeler(path: Path, num_classes: int, img_size: int) -> Path:
    model = timm.create_model(LABELER, num_classes=num_classes)
    save_checkpoint(path, model_name=LABELER, num_classes=num_classes, img_size=img_size, model=model, ema=model)
    return path


def run_args(model: str, variant: list[str], root: Path, store: Path, labeler: Path, out: Path,
             args: argparse.Namespace) -> list[str]:
    """train.student flags of one variant; the online labeler reads the shard folder, the rest the store."""
    online = variant == ["--online-labeler"]
    flags = ["--labels", str(root if online else store), "--model", model, "--epochs", "1", "--out", str(out),
             "--img-size", "64", "--batch-size", str(args.batch), "--workers", str(args.workers), "--seed", "0",
             "--max-steps", str(args.warmup + args.steps), *variant]
    if online:
        flags.append(str(labeler))
    if not model.startswith("fan"):
        flags += ["--patch-size", "8"]
    return flags


def timed_pass(run: Run, epoch: int, warmup: int, steps: int) -> tuple[float, float]:
    """(wall, main-process CPU) seconds per step over `steps` steps after `warmup`, loading included."""
    run.train_data.set_epoch(epoch)
    batches = iter(run.loader())
    for step in range(warmup):
        train_step(run.objective, run.optim, next(batches), epoch, step)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(warmup, warmup + steps):
        train_step(run.objective, run.optim, next(batches), epoch, step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del batches  # stops the workers, as the end of an epoch does
    return wall / steps, cpu / steps


def flops(fn, *inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def online_flops_ratio(run: Run) -> float:
    """1 + labeler forward / (3 x student dense forward): the online teacher's cost by FLOPs, per image."""
    x = torch.randn(1, 3, run.img_size, run.img_size, device=run.device)
    with torch.no_grad():
        student, labeler = flops(run.student.forward_dense, x), flops(run.labeler.forward_dense, x)
    return 1 + labeler / (3 * student)


def bench_model(model: str, root: Path, store: Path, labeler: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    runs = {name: Run(build_parser().parse_args(run_args(model, flags, root, store, labeler, tmp / "run", args)))
            for name, flags in VARIANTS.items()}
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed_pass(runs[name], r, args.warmup, args.steps))
    median = {name: [statistics.median(t) for t in zip(*times[name])] for name in names}
    (wall0, cpu0), rows = median[names[0]], []
    for name in names:
        wall, cpu = median[name]
        by_flops = f"{online_flops_ratio(runs[name]):.3f}" if runs[name].labeler is not None else ""
        rows.append({"model": model, "variant": name, "wall ms/step": f"{1e3 * wall:.0f}",
                     "wall ratio": f"{wall / wall0:.3f}", "main CPU ms/step": f"{1e3 * cpu:.0f}",
                     "CPU ratio": f"{cpu / cpu0:.3f}", "FLOPs": by_flops})
    return rows


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "fan_demo_tiny_p8"],
                        help="students; timm ViTs get --patch-size 8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per pass (fresh loader)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant (median)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--images", type=int, default=1024, help="demo training images")
    parser.add_argument("--dir", type=Path, help="build the data here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    geo = GEOMETRIES["demo"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        root, store = build_dataset(tmp / "data", geo, args.images, per_shard=args.images // 4)
        labeler = make_labeler(tmp / "labeler.pt", geo.num_classes, geo.img_size)
        with contextlib.redirect_stdout(sys.stderr):
            for model in args.models:
                rows += bench_model(model, root, store, labeler, tmp, args)
    print(f"demo set ({args.images} train images, 64x64, K={geo.num_classes}), batch {args.batch}, "
          f"{args.workers} workers, {args.threads} torch thread(s), {args.warmup}+{args.steps} steps x "
          f"{args.repeats} repeats, {os.cpu_count()} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}, "
          f"torch {torch.__version__}, timm {timm.__version__}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
