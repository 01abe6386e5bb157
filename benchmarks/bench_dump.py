"""Benchmark the label dump: throughput against the bare labeler, store size against LV-ViT's `.pt` files.

    python benchmarks/bench_dump.py [--images 512 --batch-size 64 --threads 1 --checkpoint last.pt]

For each input size (64: the demo's 8x8 grid; 144: an 18x18 grid, the shape of LV-ViT's NFNet-F6 maps) it
times, in this one command:
  (a) the labeler's bare batched `forward_dense` + top-k on ready-made tensors, at the same batch size and
      torch threads, as a Ray task holding the actor's CPUs (so it runs in the same environment: Ray sets
      OMP_NUM_THREADS); the mean of one run before and one after (b), as the shared machine's load drifts;
  (b) the whole dump with one actor (tar reading, decoding, resampling, forward, top-k, Zarr writes), timed
      from when the actor has loaded its model. Goal: (b) >= 0.9 x (a).
Then it exports each store to LV-ViT files and compares bytes per image (goal <= 0.5 x), both apparent sizes
and space on disk (every small file takes at least one file-system block).
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import timm
import torch

from core.checkpoint import save_checkpoint
from dump.dump_labels import dump, top_k_maps
from dump.lvvit import export_lvvit
from labeler.load import load_labeler
from shards.demo import build_demo


def random_checkpoint(path: Path) -> Path:
    import labeler  # noqa: F401  (registers the demo FAN)

    torch.manual_seed(0)
    model = timm.create_model("fan_demo_tiny_p8", num_classes=10)
    save_checkpoint(path, model_name="fan_demo_tiny_p8", num_classes=10, img_size=64, model=model, ema=model)
    return path


def bare_forward(checkpoint: Path, size: int, batch_size: int, threads: int, images: int, topk: int) -> float:
    """Images per second of forward_dense + top-k alone, on random inputs already in memory."""
    torch.set_num_threads(threads)
    model, _ = load_labeler(checkpoint)
    x = torch.randn(batch_size, 3, size, size)
    batches = max(1, images // batch_size)
    with torch.inference_mode():
        top_k_maps(model, x, topk)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            top_k_maps(model, x, topk)
    return batches * batch_size / (time.perf_counter() - started)


def tree_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes, bytes on disk) of every file under root."""
    sizes = [os.stat(p) for p in root.rglob("*") if p.is_file()]
    return sum(s.st_size for s in sizes), sum(s.st_blocks * 512 for s in sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 144])
    parser.add_argument("--checkpoint", type=Path, default=None, help="labeler to use (default: a random demo FAN)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_dump_"))
    shards = work / "demo"
    build_demo(shards, train=args.images, val=1, per_shard=args.samples_per_shard)
    checkpoint = args.checkpoint or random_checkpoint(work / "last.pt")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    bare_task = ray.remote(num_cpus=args.threads)(bare_forward)
    rows = []
    for size in args.sizes:
        bare_args = (checkpoint, size, args.batch_size, args.threads, args.images, args.topk)
        before = ray.get(bare_task.remote(*bare_args))
        store = shards / "labels" / f"s{size}.zarr"
        summary = dump(shards, checkpoint, store, topk=args.topk, input_size=size, batch_size=args.batch_size,
                       threads=args.threads, actors=1)
        bare = (before + ray.get(bare_task.remote(*bare_args))) / 2
        export_lvvit(store, work / f"lvvit{size}")
        (store_b, store_disk), (pt_b, pt_disk) = tree_bytes(store), tree_bytes(work / f"lvvit{size}")
        n = args.images
        rows.append((f"{size}px", "x".join(map(str, summary["grid"])), f"{bare:.1f}",
                     f"{summary['images_per_second']:.1f}", f"{summary['images_per_second'] / bare:.2f}",
                     f"{store_b / n:.0f}", f"{pt_b / n:.0f}", f"{store_b / pt_b:.2f}",
                     f"{store_disk / n:.0f}", f"{pt_disk / n:.0f}", f"{store_disk / pt_disk:.2f}"))
    header = ("input", "grid", "bare img/s", "dump img/s", "dump/bare", "store B/img", ".pt B/img", "ratio",
              "store disk/img", ".pt disk/img", "disk ratio")
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    print(f"\n{args.images} images, batch {args.batch_size}, {args.threads} thread(s), top-{args.topk}, "
          f"one actor; data in {work}")
    for line in (header, *rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))


if __name__ == "__main__":
    main()
