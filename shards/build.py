"""ImageFolder -> WebDataset shards: `python -m shards.build --imagefolder DIR --out shards/NAME`.

A sample's key is its path under the split folder without the extension (`<class>/<stem>`). Files and folders
whose names start with a dot are hidden, not images, and left out. A key that would not survive WebDataset's
member names (a dot before the extension) or is unsafe as a path (shards.manifest.check_key), and two files
of one key, are refused by file name. Every image (and mask) is decoded once while building, on all CPUs, by
the reader's own rules (rgb_image, mask_image): a file that does not decode is refused, named, or with
`--on-error skip` left out and reported. `--overwrite` replaces only a shard folder tokenlabel wrote, and only
the files a build writes.
"""

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from common.errors import UserError, cli
from common.files import MARKER, atomic_output, read_marker, refuse_overlap, write_marker
from shards.manifest import (
    FORMAT,
    MANIFEST,
    Digesting,
    check_key,
    content_digest,
    keys_digest,
    write_manifest,
)
from shards.reader import DECODE_ERRORS, ON_ERROR, describe, mask_image, rgb_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".mask.png"
SPLITS = ("train", "val")
MARKER_KIND = "shards-build"  # the marker of an unfinished build: the folder is ours before its manifest exists
# what a build writes: shards, the manifest, the marker, and their temporaries (common.files.temporary_sibling)
BUILD_FILES = re.compile(rf"(({'|'.join(SPLITS)})-\d{{6}}\.tar|{re.escape(MANIFEST)}|{re.escape(MARKER)})(\.partial.*)?")


@dataclass(frozen=True)
class Sample:
    key: str
    image_ext: str  # "jpg", "jpeg" or "png": the original file's format, bytes kept as they are
    image: bytes
    cls: int
    mask: bytes | None = None


@dataclass(frozen=True)
class Item:
    """An image file found in the ImageFolder, with its mask file where there is one."""

    key: str
    path: Path
    cls: int
    mask: Path | None


def is_ours(out: Path) -> bool:
    """Whether `out` is a shard folder tokenlabel wrote: it holds a tokenlabel manifest.json (of any version), or
    the marker an unfinished build leaves."""
    marker = read_marker(out)
    if marker is not None and marker.get("kind") == MARKER_KIND:
        return True
    try:
        return json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a build and mark it as one: a new or empty folder, or with `overwrite` a shard folder
    of ours, from which only the files a build writes are removed (labels/ and any other file stay: label stores
    made from an older build are refused later by their digests). A non-empty folder that is not ours is refused
    even with `overwrite`."""
    if out.is_dir() and any(out.iterdir()):
        if not is_ours(out):
            raise UserError(f"{out}: not empty and not a shard folder tokenlabel wrote (no {MANIFEST}); --overwrite "
                            "replaces only tokenlabel's own output: choose a new or empty --out")
        if not overwrite:
            raise UserError(f"{out}: output folder is not empty; pass --overwrite to replace it or choose another --out")
    elif out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, MARKER_KIND)  # first: an interrupted build, or one interrupted while clearing, stays ours
    for path in out.iterdir():
        if path.name != MARKER and BUILD_FILES.fullmatch(path.name) and path.is_file():
            path.unlink()


def write_split(out: Path, split: str, samples: Iterable[Sample], total: int, per_shard: int) -> dict:
    """Write one split as `<split>-NNNNNN.tar` shards, each published whole, with the sha256 of its bytes hashed
    as they are written; byte-identical for the same samples (fixed mtime/owner). Returns its manifest entry."""
    samples = iter(tqdm(samples, total=total, desc=f"{split} shards", unit="img"))
    shards, keys, masks = [], [], 0
    while (first := next(samples, None)) is not None:
        shard = {"file": f"{split}-{len(shards):06d}.tar", "count": 0}
        with atomic_output(out / shard["file"]) as tmp, open(tmp, "wb") as file:
            stream = Digesting(file)
            with wds.TarWriter(stream, mtime=0.0, encoder=False) as writer:
                for sample in itertools.chain([first], itertools.islice(samples, per_shard - 1)):
                    record = {"__key__": sample.key, sample.image_ext: sample.image, "cls": str(sample.cls).encode()}
                    if sample.mask is not None:
                        record["mask.png"] = sample.mask
                    try:
                        writer.write(record)
                    except ValueError as e:  # e.g. a name too long for a tar header
                        raise UserError(f"{sample.key}: cannot be stored in a tar ({e}); rename the file") from e
                    keys.append(sample.key)
                    masks += sample.mask is not None
                    shard["count"] += 1
        shards.append({**shard, "sha256": stream.sha256.hexdigest()})
    return {"shards": shards, "count": len(keys), "digest": keys_digest(keys), "content_digest": content_digest(shards),
            "masks": masks}


def write_dataset(out: Path, classes: list[str], splits: dict[str, tuple[Iterable[Sample], int]],
                  per_shard: int, hflip: bool = True) -> dict[str, dict]:
    """Write every split, then the manifest last (a folder without manifest.json is an unfinished build), then
    drop the unfinished-build marker. Returns each split's manifest entry."""
    manifest_splits = {split: write_split(out, split, samples, total, per_shard)
                       for split, (samples, total) in splits.items()}
    empty = [split for split, written in manifest_splits.items() if not written["count"]]
    if empty:
        raise UserError(f"{out}: split '{empty[0]}' has no decodable image left; check the ImageFolder")
    write_manifest(out, classes, manifest_splits, hflip)
    (out / MARKER).unlink(missing_ok=True)
    return manifest_splits


def mask_path(image: Path) -> Path:
    return image.with_name(image.name[: -len(image.suffix)] + MASK_SUFFIX)


def scan_imagefolder(root: Path, split: str) -> tuple[list[str], list[Item]]:
    """Class folders (sorted) and every image of one split, each key checked and found once."""
    split_dir = root / split
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    items, files = [], {}
    for index, name in enumerate(classes):
        for path in sorted((split_dir / name).iterdir()):
            if path.name.startswith(".") or path.name.endswith(MASK_SUFFIX) or path.suffix.lower() not in IMAGE_EXTS:
                continue
            key = f"{name}/{path.name[: -len(path.suffix)]}"
            check_key(key, path)
            if key in files:
                raise UserError(f"{files[key]} and {path}: both make the key {key!r} (a file name without its "
                                "extension); rename or remove one")
            files[key] = path
            mask = mask_path(path)
            items.append(Item(key, path, index, mask if os.path.lexists(mask) else None))
    return classes, items


def load_sample(item: Item, num_classes: int) -> Sample | str:
    """One image (and its mask) read and checked as the reader decodes them: the sample, or why a file is not
    usable (unreadable, not a decodable image, a mask not of mode P/L, not its image's size, or naming a class
    past the last)."""
    data = {}
    for file in filter(None, (item.path, item.mask)):
        try:
            data[file] = file.read_bytes()
        except OSError as e:  # a folder, a broken link, an unreadable file
            return f"{file}: cannot be read ({e.strerror or e})"
    try:
        size = rgb_image(data[item.path]).size
    except DECODE_ERRORS as e:
        return f"{item.path}: not a decodable image ({describe(e)})"
    if item.mask is not None:
        try:
            top = mask_image(data[item.mask], size).getextrema()[1]
        except DECODE_ERRORS as e:
            return f"{item.mask}: not a usable mask ({describe(e)})"
        if top > num_classes:
            return (f"{item.mask}: not a usable mask (value {top}, but a mask holds class + 1 and there are "
                    f"{num_classes} classes)")
    return Sample(item.key, item.path.suffix.lower()[1:], data[item.path], item.cls, data.get(item.mask))


def read_samples(items: list[Item], num_classes: int, on_error: str, skipped: list[str]) -> Iterator[Sample]:
    """The samples in order, every image decoded once on all CPUs to check it; a bad one raises or is skipped."""
    workers = min(os.cpu_count() or 1, max(1, len(items) // 64))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    load = functools.partial(load_sample, num_classes=num_classes)
    try:
        for sample in pool.imap(load, items, chunksize=16) if pool else map(load, items):
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
    """Write the shards; returns the files skipped as unusable (on_error="skip")."""
    if not imagefolder.is_dir():
        raise UserError(f"{imagefolder}: no such folder; pass an ImageFolder root holding train/ and val/")
    refuse_overlap(out, {"--imagefolder": imagefolder})
    refuse_overlap(out, {f"--imagefolder's {split}/": imagefolder / split for split in SPLITS}, inside=True)
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
    prepare_out(out, overwrite)
    skipped: list[str] = []
    splits = {s: (read_samples(items, len(classes), on_error, skipped), len(items)) for s, (_, items) in scans.items()}
    written = write_dataset(out, classes, splits, per_shard, hflip)
    masks, images = (sum(split[field] for split in written.values()) for field in ("masks", "count"))
    print(f"wrote {out}: " + ", ".join(f"{s} {split['count']} images" for s, split in written.items())
          + (f"; masks on {masks} of {images} images only: the dataset counts as without masks (token-label "
             "quality needs one for every image)" if 0 < masks < images else "")
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
    parser.add_argument("--overwrite", action="store_true", help="replace a shard folder tokenlabel wrote (only the files a build writes)")
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
