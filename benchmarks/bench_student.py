"""Training-step cost of offline token labels against the --no-token-labels baseline and STL's online teacher.

    python -m benchmarks.bench_student                      # demo geometry, loader included (the CPU goal)
    python -m benchmarks.bench_student --geometry imagenet  # DeiT-S and FAN-S at ImageNet geometry, the step only

One train.student `Run` per variant, made from parsed command-line flags, on the device it finds (--device to
choose), each step `core.engine.train_step` on the run's objective and optimisation (AdamW, schedule, EMA; bf16
autocast on CUDA, fp32 on CPU):

| variant | flags |
|---|---|
| baseline | --no-token-labels |
| gumbel | (the default: Gumbel draws from the stored maps) |
| softmax | --target softmax |
| MixToken | --mix mixtoken |
| CutMix | --mix cutmix |
| CutMix + TL-Align dense | --mix cutmix --tl-align dense |
| online teacher | --online-labeler CKPT (the labeler runs on the clean view inside every step, STL's design) |

Geometries (data generated into a temporary folder; maps are random top-5 files imported with dump.lvvit):
- demo: the demo set (64x64 images, 8x8 maps, K=10), students vit_tiny_patch16_224 (--patch-size 8) and
  fan_demo_tiny_p8 at 64 px (8x8 tokens), teacher fan_demo_tiny_p8. A timed pass is what an epoch does: a fresh
  DataLoader iterator over the run's StudentData, --warmup untimed and --steps timed batches, loading included.
- imagenet: 320x256 JPEGs over 1000 classes, stored 18x18 top-5 maps, students deit_small_patch16_224 and
  fan_small_12_p4_hybrid at 224 px (14x14 tokens), teacher fan_small_12_p4_hybrid (FAN-S-Hybrid), batch 128.
  Each variant's first loader batch is moved to the device once and every step reuses it, so the timing is the
  step alone (targets from the maps, mixing, forward, loss, backward, optimizer, EMA), not the loader.

Untrained weights (they do not change the cost). Variants run in rotating order each repeat; the table gives
the median per-step wall time (synchronised once per pass on CUDA: steps never wait for the device inside) and
main-process CPU time, and both as ratios to the baseline of the same student in the same run. Goals: offline
token labels <= 1.05x the baseline on the CPU (demo geometry); on a GPU (imagenet geometry) gumbel, softmax,
MixToken and CutMix <= 1.02x and TL-Align dense <= 1.05x. "FLOPs" is the online teacher's expected ratio,
1 + labeler forward / (3 x student forward).
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_datapath import GEOMETRIES, Geometry, build_dataset, markdown, photo
from common.errors import cli
from core.checkpoint import save_checkpoint
from core.engine import train_step
from train.student import Run, build_parser

VARIANTS = {
    "baseline (--no-token-labels)": ["--no-token-labels"],
    "gumbel": [],
    "softmax": ["--target", "softmax"],
    "MixToken": ["--mix", "mixtoken"],
    "CutMix": ["--mix", "cutmix"],
    "CutMix + TL-Align dense": ["--mix", "cutmix", "--tl-align", "dense"],
    "online teacher": ["--online-labeler"],
}
SETUPS = {  # geometry -> (students, teacher, batch size, images to generate)
    "demo": (["vit_tiny_patch16_224", "fan_demo_tiny_p8"], "fan_demo_tiny_p8", 32, 1024),
    "imagenet": (["deit_small_patch16_224", "fan_small_12_p4_hybrid"], "fan_small_12_p4_hybrid", 128, None),
}


def make_labeler(path: Path, model: str, num_classes: int, img_size: int) -> Path:
    net = timm.create_model(model, num_classes=num_classes)
    save_checkpoint(path, model_name=model, num_classes=num_classes, img_size=img_size, model=net, ema=net)
    return path


def make_dataset(folder: Path, geo: Geometry, images: int) -> tuple[Path, Path]:
    """bench_datapath's data of `geo` (one tar shard, one store chunk), with the val image train.student needs."""
    if geo.name != "demo":
        for c in range(geo.num_classes):  # val must hold the same class folders as train
            (folder / "images" / "val" / f"c{c:04d}").mkdir(parents=True)
        (folder / "images" / "val" / "c0000" / "val.jpg").write_bytes(photo(np.random.default_rng(3), *geo.image))
    return build_dataset(folder, geo, images, per_shard=images)


def run_args(model: str, variant: list[str], data: dict[str, Path], geo: Geometry, args: argparse.Namespace,
             steps: int) -> list[str]:
    """train.student flags of one variant; the online teacher reads the shard folder, the others the store."""
    online = variant == ["--online-labeler"]
    flags = ["--labels", str(data["root" if online else "store"]), "--model", model, "--epochs", "1",
             "--out", str(data["out"]), "--img-size", str(geo.img_size), "--batch-size", str(args.batch_size),
             "--workers", str(args.workers), "--seed", "0", "--max-steps", str(steps), *variant]
    if online:
        flags.append(str(data["labeler"]))
    if model.startswith(("vit", "deit")) and geo.patch != 16:
        flags += ["--patch-size", str(geo.patch)]
    if args.device:
        flags += ["--device", args.device]
    if args.compile:
        flags += ["--compile", args.compile]
    return flags


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batch(run: Run) -> dict[str, Any]:
    """The run's first loader batch, on its device, reused by every step."""
    batch = next(iter(run.loader()))
    return {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def timed_pass(run: Run, epoch: int, warmup: int, steps: int, batch: dict[str, Any] | None
               ) -> tuple[float, float]:
    """(wall, main-process CPU) seconds per step over `steps` steps after `warmup`: on `batch` when given (the
    step alone), else on a fresh loader's batches (loading included)."""
    if batch is None:
        run.train_data.set_epoch(epoch)
        batches = iter(run.loader())
    for step in range(warmup):
        train_step(run.objective, run.optim, batch or next(batches), epoch, step)
    synchronize(run.device)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(warmup, warmup + steps):
        train_step(run.objective, run.optim, batch or next(batches), epoch, step)
    synchronize(run.device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def flops(fn, *inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def online_flops_ratio(run: Run) -> float:
    """1 + labeler forward / (3 x student dense forward): the online teacher's cost by FLOPs, per image (the
    teacher's checkpoint is made at the student's input size)."""
    x = torch.randn(1, 3, run.img_size, run.img_size, device=run.device)
    with torch.no_grad():
        student, labeler = flops(run.student.forward_dense, x), flops(run.labeler.forward_dense, x)
    return 1 + labeler / (3 * student)


def bench_model(model: str, data: dict[str, Path], geo: Geometry, args: argparse.Namespace) -> list[dict]:
    on_device = geo.name != "demo"
    steps = args.warmup + args.steps
    runs = {name: Run(build_parser().parse_args(run_args(model, flags, data, geo, args, steps)))
            for name, flags in VARIANTS.items() if name in args.variants}
    batches = {name: device_batch(run) if on_device else None for name, run in runs.items()}
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed_pass(runs[name], r, args.warmup, args.steps, batches[name]))
    median = {name: [statistics.median(t) for t in zip(*times[name])] for name in names}
    (wall0, cpu0), rows = median[names[0]], []
    for name in names:
        wall, cpu = median[name]
        by_flops = f"{online_flops_ratio(runs[name]):.3f}" if runs[name].labeler is not None else ""
        rows.append({"model": model, "variant": name, "wall ms/step": f"{1e3 * wall:.1f}",
                     "wall ratio": f"{wall / wall0:.3f}", "main CPU ms/step": f"{1e3 * cpu:.1f}",
                     "CPU ratio": f"{cpu / cpu0:.3f}", "FLOPs": by_flops})
    return rows


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--geometry", choices=list(SETUPS), default="demo")
    parser.add_argument("--models", nargs="+", help="students (default: the geometry's); timm ViTs get --patch-size "
                                                    "to tile the geometry's token grid")
    parser.add_argument("--teacher", help="the online teacher's model (default: the geometry's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help="a subset of the variants (the baseline always runs first)")
    parser.add_argument("--batch-size", type=int, help="per step (default: 32 demo, 128 imagenet)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant (median)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (demo: they load every step)")
    parser.add_argument("--threads", type=int, help="torch threads of the training process (default: torch's)")
    parser.add_argument("--images", type=int, help="training images to generate (default: 1024 demo, 2 batches "
                                                   "imagenet)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--compile", help="train.student --compile MODE for every variant")
    parser.add_argument("--dir", type=Path, help="build the data here (default: a temporary folder)")
    args = parser.parse_args()
    models, teacher, batch_size, images = SETUPS[args.geometry]
    args.models, args.teacher = args.models or models, args.teacher or teacher
    args.batch_size = args.batch_size or batch_size
    args.variants = [name for name in VARIANTS if name in args.variants or name == next(iter(VARIANTS))]
    if args.threads:
        torch.set_num_threads(args.threads)
    geo = GEOMETRIES[args.geometry]
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        root, store = make_dataset(tmp / "data", geo, args.images or images or 2 * args.batch_size)
        labeler = make_labeler(tmp / "labeler.pt", args.teacher, geo.num_classes, geo.img_size)
        data = {"root": root, "store": store, "labeler": labeler, "out": tmp / "run"}
        with contextlib.redirect_stdout(sys.stderr):
            for model in args.models:
                rows += bench_model(model, data, geo, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"{args.geometry} geometry ({geo.img_size} px, K={geo.num_classes}, {geo.map_grid}x{geo.map_grid} maps, "
          f"{'the step on device batches' if geo.name != 'demo' else 'loader included'}), batch {args.batch_size}, "
          f"{args.warmup}+{args.steps} steps x {args.repeats} repeats, {device} ({name}), "
          f"{'bf16 autocast' if device.startswith('cuda') else 'fp32'}, compile {args.compile or 'off'}, "
          f"{torch.get_num_threads()} torch thread(s), {args.workers} workers, load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}, timm {timm.__version__}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
