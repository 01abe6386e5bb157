"""ImageFolder -> WebDataset shards: `python -m shards.build --imagefolder DIR --out shards/NAME`."""

import argparse
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from shards.errors import UserError, cli
from shards.manifest import keys_digest, write_manifest

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
                  has_masks: bool, per_shard: int) -> None:
    """Write every split, then the manifest last: a folder without manifest.json is an unfinished build."""
    manifest_splits = {split: write_split(out, split, samples, total, per_shard)
                       for split, (samples, total) in splits.items()}
    write_manifest(out, classes, has_masks, manifest_splits)


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


def read_samples(items: list[tuple[str, Path, int]]) -> Iterator[Sample]:
    for key, path, cls in items:
        mask = mask_path(path).read_bytes() if mask_path(path).is_file() else None
        yield Sample(key, path.suffix.lower()[1:], path.read_bytes(), cls, mask)


def build(imagefolder: Path, out: Path, per_shard: int, seed: int | None, overwrite: bool) -> None:
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
    write_dataset(out, classes, {s: (read_samples(items), len(items)) for s, (_, items) in scans.items()},
                  has_masks, per_shard)
    print(f"wrote {out}: " + ", ".join(f"{s} {len(items)} images" for s, (_, items) in scans.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--imagefolder", type=Path, required=True, help="root holding train/<class>/* and val/<class>/*")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/NAME")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--shuffle-seed", type=int, default=0, help="seed of the train split's fixed order")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the train split in folder order")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.samples_per_shard < 1:
        raise UserError("--samples-per-shard must be at least 1")
    build(args.imagefolder, args.out, args.samples_per_shard, None if args.no_shuffle else args.shuffle_seed,
          args.overwrite)


if __name__ == "__main__":
    main()
