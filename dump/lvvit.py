"""LV-ViT interop: export a store to, or import one from, LV-ViT's per-image `.pt` label layout, exactly.

    python -m dump.lvvit export STORE DIR [--shards shards/NAME]
    python -m dump.lvvit import DIR STORE --shards shards/NAME [--split train --input-size 576 --crop-pct 1.0]

LV-ViT (TokenLabeling's generate_label.py) writes one file per training image, `<class_dir>/<stem>.pt`, holding
a float16 tensor [2, k, H, W]: the top-k scores, then their class ids, also as float16. A file's path without
`.pt` is our sample key; a key that is not a plain relative path (absolute, `..`, a backslash or NUL) is
refused both ways. Scores are float16 in both layouts, so they move bit for bit.

Export writes only a store that fits its shards (dump.store.checks), into a folder marked as our export
(`.tokenlabel.json`): `--overwrite` replaces such a folder (or an empty one), never other files, the store or
its shard folder. Import writes a store (replacing, with `--overwrite`, only a label store).

Class ids: float16 holds every integer only up to 2048. An id above 2048 in a file may already have been
rounded by its producer (2049 is stored as 2048), so it cannot be trusted: import refuses any file with an id
above 2048, and export refuses a store holding one. Datasets with K <= 2049 classes always round-trip; with
more classes the LV-ViT layout itself is lossy, use the Zarr store. Rows skipped as corrupt (NaN scores) have
no LV-ViT file: export leaves them out and says how many.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, cli
from common.files import MARKER, read_marker, refuse_overlap, write_marker
from dump.store.checks import examples, open_matching
from dump.store.reader import SHARDS_HELP
from dump.store.schema import create_store, dataset_attrs, make_footprint, store_attrs
from dump.store.write import mark_complete, publishing, refuse_foreign, store_lock, write_shard
from dump.verify import verify_store
from shards.manifest import check_key, load_manifest
from shards.reader import split_keys

MAX_EXACT_ID = 2048  # the largest n such that every integer 0..n is exact in float16
EXPORT = "lvvit-export"  # the marker kind of an export folder


def check_ids(ids: np.ndarray, num_classes: int, where: str) -> None:
    """Class ids that float16 holds exactly and that name a class; else one line saying which and why."""
    if (ids > MAX_EXACT_ID).any():
        raise UserError(f"{where}: class id {int(ids.max())} > {MAX_EXACT_ID} cannot be exact in LV-ViT's float16 "
                        f"layout (ids above {MAX_EXACT_ID} may be rounded); use the Zarr store for K > {MAX_EXACT_ID + 1}")
    if (ids != np.round(ids)).any() or (ids < 0).any() or (ids >= num_classes).any():
        raise UserError(f"{where}: class ids must be integers in [0, {num_classes}), found {ids.min()}..{ids.max()}")


def label_file(folder: Path, key: str, where: str) -> Path:
    """`<folder>/<key>.pt` for a safe key (shards.manifest.check_key) whose file stays inside `folder`; else one
    line."""
    check_key(key, where)
    path = folder / f"{key}.pt"
    if not path.resolve().is_relative_to(folder.resolve()):  # e.g. through a symlinked class folder
        raise UserError(f"{where}: key {key!r} as a file name lands outside {folder}; remove the link or choose "
                        "another folder")
    return path


def check_export_dir(out: Path, overwrite: bool) -> None:
    """`out` must be absent or empty, or with --overwrite our export; its parent is made."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{out}: folder is not empty; pass --overwrite to replace an earlier export or choose "
                            f"another folder")
        if (read_marker(out) or {}).get("kind") != EXPORT:
            raise UserError(f"DIR {out}: holds files that are not an LV-ViT export of tokenlabel (no {MARKER} of kind "
                            f"{EXPORT}); not replacing it (even with --overwrite): remove it yourself or choose "
                            f"another folder")
    out.parent.mkdir(parents=True, exist_ok=True)


def export_lvvit(store_path: Path, out: Path, overwrite: bool = False, shards: Path | None = None) -> tuple[int, int]:
    """Write every labelled row as `<out>/<key>.pt`; returns (files written, skipped rows left out)."""
    store, manifest = open_matching(store_path, shards)
    refuse_overlap(out, {"STORE": store.path, "its shard folder": manifest.root}, flag="DIR")
    keys, valid = store.keys, store.valid()
    with store_lock(out):
        check_export_dir(out, overwrite)
        with publishing(out) as tmp:
            bar = tqdm(total=store.num_rows, unit="img", desc="export")
            for position in range(len(store.attrs["dataset"]["shards"])):
                start, stop = store.shard_rows(position)
                scores, classes = store.read_rows(start, stop)
                for row in np.flatnonzero(valid[start:stop] == 1):
                    key, where = keys[start + row], f"{store.path}: row {start + row}"
                    path = label_file(tmp, key, where)
                    check_ids(classes[row], store.num_classes, f"{where} ({key})")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(torch.stack([torch.from_numpy(scores[row]),
                                            torch.from_numpy(classes[row].astype(np.float16))]), path)
                bar.update(stop - start)
            bar.close()
            write_marker(tmp, EXPORT, store=str(store.path.resolve()), dump_id=store.dump_id)
    written = int(valid.sum())
    return written, len(valid) - written


def read_lvvit(path: Path, shape: tuple[int, ...] | None) -> torch.Tensor:
    """One LV-ViT label file: a float16 [2, k, H, W] tensor (of `shape` once the first file fixed it)."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable torch file ({type(e).__name__}); re-export it") from e
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float16 or t.dim() != 4 or t.shape[0] != 2:
        what = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise UserError(f"{path}: holds {what}, expected LV-ViT's float16 [2, k, H, W]")
    if shape is not None and tuple(t.shape) != shape:
        raise UserError(f"{path}: shape {list(t.shape)} differs from the first file's {list(shape)}")
    return t


def import_lvvit(src: Path, store_path: Path, shards: Path, *, split: str = "train", input_size: int = 576,
                 crop_pct: float = 1.0, interpolation: str = "bicubic", model: str = "unknown (LV-ViT files)",
                 overwrite: bool = False) -> int:
    """Build a complete, verified store from `<src>/<key>.pt` files for every key of the split; returns N."""
    manifest = load_manifest(shards)
    refuse_overlap(store_path, {"--shards": manifest.root, "DIR": src}, flag="STORE")
    keys = split_keys(shards, split)
    files = [label_file(src, key, f"{manifest.root}: split '{split}'") for key in keys]
    missing = [key for key, file in zip(keys, files) if not file.is_file()]
    if missing:
        raise UserError(f"{src}: {len(missing)} of {len(keys)} keys of split '{split}' have no .pt file "
                        f"(e.g. {examples(missing)}); every image of the split needs its label file")
    shape = tuple(read_lvvit(files[0], None).shape)
    attrs = store_attrs(num_classes=manifest.num_classes, k=shape[1], grid=shape[2:],
                        footprint=make_footprint(input_size, crop_pct, interpolation),
                        labeler={"model": model, "sha256": None, "input_size": input_size, "epoch": None,
                                 "mean": None, "std": None},
                        dataset=dataset_attrs(manifest, split),
                        producer={"tool": "dump.lvvit import", "source": str(src.resolve())})
    with store_lock(store_path):
        if store_path.exists() and not overwrite:
            raise UserError(f"{store_path}: already exists; pass --overwrite to replace it or choose another store")
        refuse_foreign(store_path, "STORE")
        with publishing(store_path) as tmp:
            group = create_store(tmp, attrs)
            bar = tqdm(total=len(keys), unit="img", desc="import")
            start = 0
            for position, ((_, count), sha256) in enumerate(zip(manifest.shards(split), manifest.shard_digests(split))):
                rows = slice(start, start + count)
                maps = np.stack([read_lvvit(file, shape).numpy() for file in files[rows]])
                check_ids(maps[:, 1], manifest.num_classes, f"{src}: shard {position} files")
                write_shard(group, position, scores=maps[:, 0], classes=maps[:, 1].astype(np.int32),
                            valid=np.ones(count, np.uint8), keys=keys[rows], sha256=sha256)
                start += count
                bar.update(count)
            bar.close()
            mark_complete(group)
            failures, _ = verify_store(tmp, shards)
            if failures:
                raise UserError(f"{src}: the imported labels fail verification: {failures[0]}")
    return len(keys)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    imp.add_argument("--input-size", type=int, default=576, help="producer's input side (LV-ViT's NFNet-F6: 576)")
    imp.add_argument("--crop-pct", type=float, default=1.0, help="producer's centre-crop share (LV-ViT: 1.0)")
    imp.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"), default="bicubic")
    imp.add_argument("--model", default="unknown (LV-ViT files)", help="producer model name, recorded in the store")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing label store (nothing else)")
    args = parser.parse_args(argv)
    if args.command == "export":
        written, left_out = export_lvvit(args.store, args.dir, args.overwrite, args.shards)
        print(f"wrote {written} files to {args.dir}" + (f"; {left_out} skipped row(s) have no file" if left_out else ""))
    else:
        count = import_lvvit(args.dir, args.store, args.shards, split=args.split, input_size=args.input_size,
                             crop_pct=args.crop_pct, interpolation=args.interpolation, model=args.model,
                             overwrite=args.overwrite)
        print(f"wrote {args.store}: {count} rows imported from {args.dir}, verified")


if __name__ == "__main__":
    main()
