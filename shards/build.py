"""ImageFolder -> WebDataset shards: `python -m shards.build --imagefolder DIR --out shards/NAME`.

Every image (and mask) is decoded once while building, on all CPUs: a file that does not decode is refused,
named, or with `--on-error skip` left out and reported.
"""

import argparse
import io
import multiprocessing
import os
import random
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from common.errors import UserError, cli
from shards.manifest import keys_digest, write_manifest
from shards.reader import ON_ERROR

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".mask.png"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Sample:
    key: str
    image_ext: str  # "jpg", "jpeg" or "png": the original file's format, bytes kept as they are
    image: bytes
    cls: int
    mask: bytes | None = None


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless asked; with --overwrite clear only what a build writes."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output folder is not empty; pass --overwrite to replace it or choose another --out")
        for path in out.iterdir():
            if path.name == "labels":
                continue  # label stores made from an older build are refused later by their manifest digest
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_split(out: Path, split: str, samples: Iterable[Sample], total: int, per_shard: int) -> dict:
    """Write one split as `<split>-NNNNNN.tar` shards; byte-identical for the same samples (fixed mtime/owner)."""
    shards, keys, writer = [], [], None
    for sample in tqdm(samples, total=total, desc=f"{split} shards", unit="img"):
        if len(keys) % per_shard == 0:
            if writer is not None:
                writer.close()
            shards.append({"file": f"{split}-{len(shards):06d}.tar", "count": 0})
            writer = wds.TarWriter(str(out / (shards[-1]["file"] + ".partial")), mtime=0.0, encoder=False)
        record = {"__key__": sample.key, sample.image_ext: sample.image, "cls": str(sample.cls).encode()}
        if sample.mask is not None:
            record["mask.png"] = sample.mask
        writer.write(record)
        keys.append(sample.key)
        shards[-1]["count"] += 1
    if writer is not None:
        writer.close()
    for shard in shards:
        (out / (shard["file"] + ".partial")).replace(out / shard["file"])
    return {"shards": shards, "count": len(keys), "digest": keys_digest(keys)}


def write_dataset(out: Path, classes: list[str], splits: dict[str, tuple[Iterable[Sample], int]],
                  has_masks: bool, per_shard: int, hflip: bool = True) -> dict[str, int]:
    """Write every split, then the manifest last: a folder without manifest.json is an unfinished build.

    Returns the samples written per split.
    """
    manifest_splits = {split: write_split(out, split, samples, total, per_shard)
                       for split, (samples, total) in splits.items()}
    empty = [split for split, written in manifest_splits.items() if not written["count"]]
    if empty:
        raise UserError(f"{out}: split '{empty[0]}' has no decodable image left; check the ImageFolder")
    write_manifest(out, classes, has_masks, manifest_splits, hflip)
    return {split: written["count"] for split, written in manifest_splits.items()}


def scan_imagefolder(root: Path, split: str) -> tuple[list[str], list[tuple[str, Path, int]]]:
    """Class folders (sorted) and (key, image path, class) of every image of one split."""
    split_dir = root / split
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    items = []
    for index, name in enumerate(classes):
        for path in sorted((split_dir / name).iterdir()):
            if path.name.endswith(MASK_SUFFIX) or path.suffix.lower() not in IMAGE_EXTS:
                continue
            items.append((f"{name}/{path.name[: -len(path.suffix)]}", path, index))
    return classes, items


def mask_path(image: Path) -> Path:
    return image.with_name(image.name[: -len(image.suffix)] + MASK_SUFFIX)


def load_sample(item: tuple[str, Path, int]) -> Sample | str:
    """One image (and its mask) read and decode-checked: the sample, or why a file is not a decodable image."""
    key, path, cls = item
    files = [path] + ([mask_path(path)] if mask_path(path).is_file() else [])
    data = []
    for file in files:
        data.append(file.read_bytes())
        try:
            with Image.open(io.BytesIO(data[-1])) as image:
                image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return f"{file}: not a decodable image ({type(e).__name__}: {str(e)[:120]})"
    return Sample(key, path.suffix.lower()[1:], data[0], cls, data[1] if len(data) > 1 else None)


def read_samples(items: list[tuple[str, Path, int]], on_error: str, skipped: list[str]) -> Iterator[Sample]:
    """The samples in order, every image decoded once on all CPUs to check it; a bad one raises or is skipped."""
    workers = min(os.cpu_count() or 1, max(1, len(items) // 64))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for sample in pool.imap(load_sample, items, chunksize=16) if pool else map(load_sample, items):
            if isinstance(sample, Sample):
                yield sample
            elif on_error == "raise":
                raise UserError(f"{sample}; remove or replace it, or pass --on-error skip to leave it out")
            else:
                skipped.append(sample)
                print(f"warning: skipped {sample}", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()


def build(imagefolder: Path, out: Path, per_shard: int, seed: int | None, overwrite: bool,
          on_error: str = "raise", hflip: bool = True) -> list[str]:
    """Write the shards; returns the files skipped as undecodable (on_error="skip")."""
    if not imagefolder.is_dir():
        raise UserError(f"{imagefolder}: no such folder; pass an ImageFolder root holding train/ and val/")
    present = [s for s in SPLITS if (imagefolder / s).is_dir()]
    if not present:
        raise UserError(f"{imagefolder}: has no train/ or val/ subfolder; expected DIR/<split>/<class>/<image>")
    scans = {split: scan_imagefolder(imagefolder, split) for split in present}
    classes = scans[present[0]][0]
    for split, (split_classes, items) in scans.items():
        if split_classes != classes:
            raise UserError(f"{imagefolder / split}: class folders differ from {imagefolder / present[0]}'s; they must match")
        if not items:
            raise UserError(f"{imagefolder / split}: no .jpg/.jpeg/.png images found")
        if split == "train" and seed is not None:
            random.Random(seed).shuffle(items)  # mix classes across shards; the order is fixed by the seed
    has_masks = any(mask_path(path).is_file() for _, items in scans.values() for _, path, _ in items)
    prepare_out(out, overwrite)
    skipped: list[str] = []
    splits = {s: (read_samples(items, on_error, skipped), len(items)) for s, (_, items) in scans.items()}
    counts = write_dataset(out, classes, splits, has_masks, per_shard, hflip)
    print(f"wrote {out}: " + ", ".join(f"{s} {n} images" for s, n in counts.items())
          + (f"; skipped {len(skipped)} undecodable file(s): " + "; ".join(skipped[:5])
             + ("; ..." if len(skipped) > 5 else "") if skipped else ""))
    return skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--imagefolder", type=Path, required=True, help="root holding train/<class>/* and val/<class>/*")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/NAME")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--shuffle-seed", type=int, default=0, help="seed of the train split's fixed order")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the train split in folder order")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise",
                        help="an image (or mask) that does not decode: stop naming the file, or leave it out and report it")
    parser.add_argument("--no-hflip", action="store_true", help="mark the data as mirror-sensitive (text, digits): "
                                                               "trainers then do not flip it by default")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.samples_per_shard < 1:
        raise UserError("--samples-per-shard must be at least 1")
    build(args.imagefolder, args.out, args.samples_per_shard, None if args.no_shuffle else args.shuffle_seed,
          args.overwrite, args.on_error, hflip=not args.no_hflip)


if __name__ == "__main__":
    main()
