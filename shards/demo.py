"""The built-in demo dataset: scikit-learn's handwritten digits on textured canvases, with per-pixel masks.

Each image shows one target digit, the largest (its class is the image's label; side 31-59% of the canvas), and
one or two distractor digits of other classes at 55-85% of the target's side, drawn almost as strongly: real
second objects that a good labeler can name (at their own scale they are as recognisable as targets), so that
token labels have something to say that the image label does not. The `.mask.png` holds class + 1 over each
digit's region (its glyph's upsampled coverage above 0.15, strokes and the space between them), 0 elsewhere.
Glyphs come from `load_digits` (1,797 real 8x8 glyphs, no download); train and val draw from disjoint contiguous
blocks of that file. Digits are mirror-sensitive, so the manifest marks the data as not to be flipped.
`python -m shards.demo --out shards/demo [--train N --val M]`.
"""

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from common.errors import UserError, cli
from shards.build import Sample, prepare_out, write_dataset

CLASSES = [str(d) for d in range(10)]
VAL_GLYPH_SHARE = 0.2


def glyph_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Glyphs (float in [0,1], 8x8) and their digits, split into disjoint train/val blocks."""
    digits = load_digits()
    images, targets = digits.images / 16.0, digits.target
    cut = int(len(images) * (1 - VAL_GLYPH_SHARE))
    return {"train": (images[:cut], targets[:cut]), "val": (images[cut:], targets[cut:])}


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus fine grain: background that is not trivially flat."""
    coarse = rng.uniform(0.25, 0.75, size=(4, 4, 3))
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    grain = rng.normal(0, 5, size=(size, size, 1))
    stripes = 6 * np.sin(np.arange(size)[:, None, None] * rng.uniform(0.3, 1.2) + rng.uniform(0, 6.3))
    return field + grain + stripes


def stamp(glyph: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The glyph at side x side: ink coverage in [0, 1] with crisp strokes, and the digit's region (bool)."""
    img = Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    coverage = np.asarray(img, np.float32) / 255.0
    return np.clip((coverage - 0.25) * 2.0, 0.0, 1.0), coverage > 0.15


def place(rng: np.random.Generator, side: int, size: int, taken: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """A top-left corner for a side x side digit that overlaps no box already taken, or None if none was found."""
    for _ in range(200):
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(y + side <= ty or ty + ts <= y or x + side <= tx or tx + ts <= x for ty, tx, ts in taken):
            return y, x
    return None


def compose(rng: np.random.Generator, glyphs: np.ndarray, by_digit: list[np.ndarray],
            size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One canvas with its mask and class: the target first, then distractors where they fit beside it."""
    canvas = texture(rng, size)
    mask = np.zeros((size, size), np.uint8)
    target = int(rng.integers(10))
    target_side = int(round(size * rng.uniform(0.31, 0.59)))
    taken = [(*place(rng, target_side, size, []), target_side)]
    layers = [(target, taken[0], 1.0)]
    for digit in rng.choice([d for d in range(10) if d != target], size=int(rng.integers(1, 3)), replace=False):
        side = int(round(target_side * rng.uniform(0.55, 0.85)))
        spot = place(rng, side, size, taken)
        if spot is not None:
            taken.append((*spot, side))
            layers.append((int(digit), taken[-1], rng.uniform(0.8, 1.0)))
    for digit, (y, x, side), strength in layers[::-1]:  # the target last, on top
        cover, region = stamp(glyphs[rng.choice(by_digit[digit])], side)
        colour = rng.uniform(0, 255, size=3)
        while abs(colour.mean() - canvas[y:y + side, x:x + side].mean()) < 80:  # keep digits visible
            colour = rng.uniform(0, 255, size=3)
        alpha = (cover * strength)[..., None]
        canvas[y:y + side, x:x + side] = canvas[y:y + side, x:x + side] * (1 - alpha) + colour * alpha
        mask[y:y + side, x:x + side][region] = digit + 1
    return np.clip(canvas, 0, 255).astype(np.uint8), mask, target


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def demo_samples(split: str, count: int, size: int, seed: int) -> Iterator[Sample]:
    glyphs, digits = glyph_split()[split]
    by_digit = [np.flatnonzero(digits == d) for d in range(10)]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for index in range(count):
        image, mask, target = compose(rng, glyphs, by_digit, size)
        yield Sample(f"{target}/{split}_{index:06d}", "jpg", encode(image, "JPEG"), target, encode(mask, "PNG"))


def build_demo(out: Path, train: int = 10_000, val: int = 2_000, size: int = 64, per_shard: int = 1000,
               seed: int = 0, overwrite: bool = False) -> None:
    """Write the demo dataset to `out` (deterministic for the same arguments)."""
    if min(train, val) < 1 or size < 32:
        raise UserError("--train and --val must be at least 1 and --size at least 32")
    prepare_out(out, overwrite)
    splits = {"train": (demo_samples("train", train, size, seed), train),
              "val": (demo_samples("val", val, size, seed), val)}
    write_dataset(out, CLASSES, splits, per_shard=per_shard, hflip=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build the demo dataset (handwritten digits on textured canvases).")
    parser.add_argument("--out", type=Path, default=Path("shards/demo"))
    parser.add_argument("--train", type=int, default=10_000, help="train images")
    parser.add_argument("--val", type=int, default=2_000, help="val images")
    parser.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a shard folder tokenlabel wrote (only the files a build writes)")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    build_demo(args.out, args.train, args.val, args.size, args.samples_per_shard, args.seed, args.overwrite)
    print(f"wrote {args.out}: train {args.train}, val {args.val} images of {args.size}x{args.size}")


if __name__ == "__main__":
    main()
