"""Per-image `.pt` label files, LV-ViT's and ReLabel's: reading, checking, importing and exporting them exactly.

Both layouts hold one file per training image, `<class_dir>/<stem>.pt`: a tensor [2, k, H, W], the top-k scores,
then their class ids in the same float dtype (their trainers `torch.load` it). They differ only in their `Layout`:
- LV-ViT (TokenLabeling's generate_label.py; NFNet-F6 at 576): float16 files; a map covers the centred square of
  the shorter side (crop_pct 1.0).
- ReLabel (naver-ai/relabel_imagenet; EfficientNet-L2 at 475, [2, 5, 15, 15]): float16 or float32 files; a map
  covers the whole image, resized to a square with its aspect ratio not kept, so on a W x H image a cell is
  W/15 x H/15 pixels (footprint crop "whole").
A file's path without `.pt` is our sample key; a key that is not a plain relative path (absolute, `..`, a
backslash or NUL) is refused both ways. A file is read with torch.load(weights_only=True): one that would need
code to load is refused.

Scores: a store keeps float16. float16 files move bit for bit; float32 scores are rounded to float16 on import
(it says by how much) and exported as float16, value for value. Class ids: a float dtype holds every integer only
up to 2048 (float16) or 2**24 (float32), and an id above that in a file may have been rounded by its producer
(2049 is stored as 2048 in float16), so import refuses it, as it refuses an id that is not an integer or not in
[0, K), naming the file. Export writes the first of the layout's dtypes that holds every id of K classes
exactly (ReLabel: float16 up to K = 2049, else float32; LV-ViT: float16 only, and it refuses a store holding an
id above 2048: for more classes LV-ViT's layout is lossy, use the Zarr store).

Export writes only a store that fits its shards (dump.store.checks) and whose footprint is the layout's region
(a file says nothing of its geometry), into a folder marked as our export of that layout (`.tokenlabel.json`):
`--overwrite` replaces such a folder (or an empty one), never other files, the store or its shard folder. Rows
skipped as corrupt (NaN scores) have no file: export leaves them out and says how many. Import writes a complete
store and verifies it (replacing, with `--overwrite`, only a label store).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from common.files import MARKER, read_marker, refuse_overlap, write_marker
from core.checkpoint import code_needed
from dump.store.checks import examples, open_matching
from dump.store.reader import SHARDS_HELP, LabelStore
from dump.store.schema import REGION, create_store, dataset_attrs, make_footprint, store_attrs
from dump.store.write import mark_complete, publishing, refuse_foreign, store_lock, write_shard
from dump.verify import verify_store
from shards.manifest import check_key, load_manifest
from shards.reader import split_keys


@dataclass(frozen=True)
class Layout:
    """What tells one per-image `.pt` layout from the other."""

    name: str                        # as messages name it
    command: str                     # its module
    crop: str                        # the region a map covers: dump.store.schema.make_footprint's crop
    dtypes: tuple[torch.dtype, ...]  # the file dtypes import accepts; export writes the first holding every id
    input_size: int                  # the published files' producer's input side
    producer: str                    # who made the published files

    @property
    def export_kind(self) -> str:
        """The marker kind of an export folder ("lvvit-export")."""
        return f"{self.command.removeprefix('dump.')}-export"

    def region(self) -> dict[str, object]:
        """The footprint fields that fix which pixels a map of this layout covers."""
        footprint = make_footprint(self.input_size, crop=self.crop)
        return {name: footprint.get(name) for name in REGION}


LVVIT = Layout("LV-ViT", "dump.lvvit", "center", (torch.float16,), 576, "LV-ViT's NFNet-F6")
RELABEL = Layout("ReLabel", "dump.relabel", "whole", (torch.float16, torch.float32), 475, "ReLabel's EfficientNet-L2")
LAYOUTS = (LVVIT, RELABEL)


def exact_ids(dtype: torch.dtype) -> int:
    """The largest n such that every integer 0..n is exact in a float dtype: 2048 (float16), 2**24 (float32)."""
    return round(2 / torch.finfo(dtype).eps)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_ids(ids: np.ndarray, num_classes: int, where: str, layout: Layout, dtype: torch.dtype) -> None:
    """Class ids that `dtype` holds exactly and that name a class; else one line saying which and why."""
    limit = exact_ids(dtype)
    if (ids > limit).any():
        raise UserError(f"{where}: class id {ids.max():g} > {limit} cannot be exact in {layout.name}'s "
                        f"{dtype_name(dtype)} layout (ids above {limit} may be rounded); use the Zarr store for "
                        f"K > {limit + 1}")
    fractional = ids != np.round(ids)
    if fractional.any():
        raise UserError(f"{where}: class id {ids[fractional][0]:g} is not an integer; {layout.name}'s class ids are "
                        f"whole numbers in [0, {num_classes})")
    if (ids < 0).any() or (ids >= num_classes).any():
        raise UserError(f"{where}: class ids must be in [0, {num_classes}), found {ids.min():g}..{ids.max():g}")


def label_file(folder: Path, key: str, where: str) -> Path:
    """`<folder>/<key>.pt` for a safe key (shards.manifest.check_key) whose file stays inside `folder`; else one
    line."""
    check_key(key, where)
    path = folder / f"{key}.pt"
    if not path.resolve().is_relative_to(folder.resolve()):  # e.g. through a symlinked class folder
        raise UserError(f"{where}: key {key!r} as a file name lands outside {folder}; remove the link or choose "
                        "another folder")
    return path


def read_file(layout: Layout, path: Path, shape: tuple[int, ...] | None) -> torch.Tensor:
    """One label file: a [2, k, H, W] tensor of one of the layout's dtypes (of `shape` once the first file fixed
    it), loaded without running code."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        what = code_needed(e)
        if what:
            raise UserError(f"{path}: loading it would run code (it {what}), so it is refused; a label file holds "
                            "one tensor: make it again with torch.save") from None
        raise UserError(f"{path}: not a readable torch file ({type(e).__name__}); re-export it") from e
    if not isinstance(t, torch.Tensor) or t.dtype not in layout.dtypes or t.dim() != 4 or t.shape[0] != 2:
        what = f"{dtype_name(t.dtype)}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        wanted = " or ".join(map(dtype_name, layout.dtypes))
        raise UserError(f"{path}: holds {what}, expected {layout.name}'s {wanted} [2, k, H, W]")
    if shape is not None and tuple(t.shape) != shape:
        raise UserError(f"{path}: shape {list(t.shape)} differs from the first file's {list(shape)}")
    return t


def read_maps(layout: Layout, path: Path, shape: tuple[int, ...], num_classes: int
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """One file's (scores float16 [k, H, W], class ids int32 [k, H, W], how far rounding its scores to float16
    moved them), its ids checked (`check_ids`)."""
    t = read_file(layout, path, shape)
    check_ids(t[1].numpy(), num_classes, str(path), layout, t.dtype)
    scores = t[0].half()
    overflow = ~scores.isfinite() & t[0].isfinite()
    if overflow.any():
        raise UserError(f"{path}: score {t[0][overflow][0].item():g} is beyond float16's range (65504), in which a "
                        "store keeps its scores")
    return scores.numpy(), t[1].numpy().astype(np.int32), float((scores.float() - t[0].float()).abs().max())


def import_files(layout: Layout, src: Path, store_path: Path, shards: Path, *, split: str = "train",
                 input_size: int | None = None, crop_pct: float = 1.0, interpolation: str = "bicubic",
                 model: str | None = None, overwrite: bool = False) -> int:
    """Build a complete, verified store from `<src>/<key>.pt` files for every key of the split; returns N."""
    manifest = load_manifest(shards)
    refuse_overlap(store_path, {"--shards": manifest.root, "DIR": src}, flag="STORE")
    keys = split_keys(shards, split)
    files = [label_file(src, key, f"{manifest.root}: split '{split}'") for key in keys]
    missing = [key for key, file in zip(keys, files) if not file.is_file()]
    if missing:
        raise UserError(f"{src}: {len(missing)} of {len(keys)} keys of split '{split}' have no .pt file "
                        f"(e.g. {examples(missing)}); every image of the split needs its label file")
    shape = tuple(read_file(layout, files[0], None).shape)
    input_size = input_size or layout.input_size
    attrs = store_attrs(num_classes=manifest.num_classes, k=shape[1], grid=shape[2:],
                        footprint=make_footprint(input_size, crop_pct, interpolation, crop=layout.crop),
                        labeler={"model": model or f"unknown ({layout.name} files)", "sha256": None,
                                 "input_size": input_size, "epoch": None, "mean": None, "std": None},
                        dataset=dataset_attrs(manifest, split),
                        producer={"tool": f"{layout.command} import", "source": str(src.resolve())})
    rounded = (0.0, "")  # the largest change of a score rounded to float16, and its file
    with store_lock(store_path):
        if store_path.exists() and not overwrite:
            raise UserError(f"{store_path}: already exists; pass --overwrite to replace it or choose another store")
        refuse_foreign(store_path, "STORE")
        with publishing(store_path) as tmp:
            group = create_store(tmp, attrs)
            bar = tqdm(total=len(keys), unit="img", desc="import", disable=None)
            start = 0
            for position, ((_, count), sha256) in enumerate(zip(manifest.shards(split), manifest.shard_digests(split))):
                rows = slice(start, start + count)
                maps = [read_maps(layout, file, shape, manifest.num_classes) for file in files[rows]]
                rounded = max(rounded, *((change, str(file)) for (_, _, change), file in zip(maps, files[rows])))
                write_shard(group, position, scores=np.stack([m[0] for m in maps]),
                            classes=np.stack([m[1] for m in maps]),
                            valid=np.ones(count, np.uint8), keys=keys[rows], sha256=sha256)
                start += count
                bar.update(count)
            bar.close()
            mark_complete(group)
            failures, _ = verify_store(tmp, shards)
            if failures:
                raise UserError(f"{src}: the imported labels fail verification: {failures[0]}")
    if rounded[0]:
        print(f"{src}: float32 scores rounded to the store's float16, by at most {rounded[0]:.3g} (in {rounded[1]})",
              file=sys.stderr)
    return len(keys)


def check_export_dir(layout: Layout, out: Path, overwrite: bool) -> None:
    """`out` must be absent or empty, or with --overwrite our export of this layout; its parent is made."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{out}: folder is not empty; pass --overwrite to replace an earlier export or choose "
                            f"another folder")
        if (read_marker(out) or {}).get("kind") != layout.export_kind:
            raise UserError(f"DIR {out}: holds files that are not a tokenlabel export of {layout.name} files (no "
                            f"{MARKER} of kind {layout.export_kind}); not replacing it (even with --overwrite): remove it "
                            f"yourself or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)


def describe(region: dict[str, object]) -> str:
    """A footprint region in words: "crop center, crop_pct 1.0"."""
    return ", ".join(f"{name} {value}" for name, value in region.items() if value is not None)


def check_region(layout: Layout, store: LabelStore) -> None:
    """Refuse (one line) a store whose maps cover other pixels than the layout's files say they do."""
    have = {name: store.footprint.get(name) for name in REGION}
    if have != layout.region():
        fits = [other.command for other in LAYOUTS if other.region() == have]
        way = f"export it with `python -m {fits[0]} export`" if fits else "use the Zarr store"
        raise UserError(f"{store.path}: its maps cover footprint {describe(have)}, {layout.name}'s files "
                        f"{describe(layout.region())}: as {layout.name} files they would label other pixels; {way}")


def export_files(layout: Layout, store_path: Path, out: Path, overwrite: bool = False,
                 shards: Path | None = None) -> tuple[int, int]:
    """Write every labelled row as `<out>/<key>.pt`; returns (files written, skipped rows left out)."""
    store, manifest = open_matching(store_path, shards)
    refuse_overlap(out, {"STORE": store.path, "its shard folder": manifest.root}, flag="DIR")
    check_region(layout, store)
    dtype = next((d for d in layout.dtypes if exact_ids(d) >= store.num_classes - 1), layout.dtypes[-1])
    keys, valid = store.keys, store.valid()
    with store_lock(out):
        check_export_dir(layout, out, overwrite)
        with publishing(out) as tmp:
            bar = tqdm(total=store.num_rows, unit="img", desc="export", disable=None)
            for position in range(len(store.attrs["dataset"]["shards"])):
                start, stop = store.shard_rows(position)
                scores, classes = store.read_rows(start, stop)
                for row in np.flatnonzero(valid[start:stop] == 1):
                    key, where = keys[start + row], f"{store.path}: row {start + row}"
                    path = label_file(tmp, key, where)
                    check_ids(classes[row], store.num_classes, f"{where} ({key})", layout, dtype)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(torch.stack([torch.from_numpy(scores[row]).to(dtype),
                                            torch.from_numpy(classes[row]).to(dtype)]), path)
                bar.update(stop - start)
            bar.close()
            write_marker(tmp, layout.export_kind, store=str(store.path.resolve()), dump_id=store.dump_id,
                         dtype=dtype_name(dtype))
    written = int(valid.sum())
    return written, len(valid) - written


def run(layout: Layout, description: str, argv: list[str] | None) -> None:
    """The `import` and `export` commands of a layout's module (dump.lvvit, dump.relabel)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="store -> <DIR>/<key>.pt files")
    export.add_argument("store", type=Path)
    export.add_argument("dir", type=Path)
    export.add_argument("--shards", type=Path, default=None, help=SHARDS_HELP)
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export at DIR (nothing else)")
    imp = commands.add_parser("import", help="<DIR>/<key>.pt files -> a complete, verified store")
    imp.add_argument("dir", type=Path)
    imp.add_argument("store", type=Path)
    imp.add_argument("--shards", type=Path, required=True, help="the shard folder whose keys the files label")
    imp.add_argument("--split", default="train")
    imp.add_argument("--input-size", type=int, default=None,
                     help=f"producer's input side (default {layout.input_size}: {layout.producer})")
    if layout.crop == "center":
        imp.add_argument("--crop-pct", type=float, default=1.0,
                         help=f"producer's centre-crop share ({layout.name}: 1.0)")
    else:
        imp.set_defaults(crop_pct=1.0)
    imp.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"), default="bicubic")
    imp.add_argument("--model", default=None,
                     help=f"producer model name, recorded in the store (default: unknown ({layout.name} files))")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing label store (nothing else)")
    args = parser.parse_args(argv)
    if args.command == "export":
        written, left_out = export_files(layout, args.store, args.dir, args.overwrite, args.shards)
        print(f"wrote {written} files to {args.dir}" + (f"; {left_out} skipped row(s) have no file" if left_out else ""))
    else:
        count = import_files(layout, args.dir, args.store, args.shards, split=args.split, input_size=args.input_size,
                             crop_pct=args.crop_pct, interpolation=args.interpolation, model=args.model,
                             overwrite=args.overwrite)
        print(f"wrote {args.store}: {count} rows imported from {args.dir}, verified")
