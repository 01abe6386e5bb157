"""Cost of the label-aware data path: per-sample transform vs timm's, and the batched map resampling per sample.

python benchmarks/bench_label_transform.py [--threads 1]
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reference.py: the dense path measured here

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from core.posterize import POSTERIZE_OPS, posterize
from tests.reference import densify, resample_maps
from train.augment import LabelAwareTransform
from train.targets import token_targets


def per_call_ms(repeats: int, fn, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats * 1e3


def transform_rows(repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    rng = np.random.default_rng(0)
    for (w, h), size in [((64, 64), 64), ((250, 190), 224), ((500, 375), 224)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = LabelAwareTransform(size)
        timm_t = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                  interpolation="bicubic", re_prob=0.25, re_mode="pixel")
        for op in timm_t.transforms[2].ops:  # timm's posterize raises at 0 bits under Pillow 13
            if op.name in POSTERIZE_OPS:
                op.aug_fn = posterize
        rows.append((f"{w}x{h} -> {size}", per_call_ms(repeats, ours, img),
                     per_call_ms(repeats, timm_t, img)))
    return rows


def resample_rows(batch: int, repeats: int) -> list[tuple[str, float]]:
    rows = []
    for num_classes, k, map_hw, grid, size in [(1000, 5, (14, 14), (14, 14), 224), (1000, 5, (18, 18), (14, 14), 224),
                                               (10, 5, (8, 8), (8, 8), 64)]:
        scores = torch.randn(batch, k, *map_hw).sort(1, descending=True).values.half()
        classes = torch.stack([torch.randperm(num_classes)[:k] for _ in range(batch)])[:, :, None, None]
        classes = classes.expand(batch, k, *map_hw).to(torch.int16)
        transform = LabelAwareTransform(size)
        img = Image.new("RGB", (300, 240))
        mappings = torch.tensor(np.stack([transform.draw(img).mapping for _ in range(batch)]))
        footprints = torch.tensor([30.0, 0.0, 270.0, 240.0])
        probs = densify(scores, classes, num_classes)
        name = f"K={num_classes} map {map_hw[0]}x{map_hw[1]} -> tokens {grid[0]}x{grid[1]}"
        rows.append((f"{name}: densify", per_call_ms(repeats, densify, scores, classes, num_classes) / batch))
        for mode, points in [("nearest", 1), ("nearest", 2), ("bilinear", 1)]:
            ms = per_call_ms(repeats, resample_maps, probs, mappings, footprints, size, grid, points, mode)
            rows.append((f"{name}: resample {mode} points={points}", ms / batch))
        tokens, _ = resample_maps(probs, mappings, footprints, size, grid)
        rows.append((f"{name}: gumbel targets", per_call_ms(repeats, token_targets, tokens) / batch))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    print(f"per-sample transform, ms (1 process, {args.repeats} calls)")
    print(f"{'image -> output':<22}{'LabelAwareTransform':>22}{'timm create_transform':>24}")
    for name, ours, theirs in transform_rows(args.repeats):
        print(f"{name:<22}{ours:>22.2f}{theirs:>24.2f}")
    print(f"\nbatched label path on CPU, {args.threads} thread(s), batch {args.batch}: ms per sample")
    for name, ms in resample_rows(args.batch, max(args.repeats // 10, 3)):
        print(f"{name:<62}{ms:>8.3f}")


if __name__ == "__main__":
    main()
