"""The label store: a Zarr v3 group of per-image top-k token-label maps, one chunk per tar shard.

Layout (N rows in the split's shard order, k labels per token, an H x W token grid):

    scores   float16 [N, k, H, W]  top-k raw logits per token, descending along k; NaN in skipped rows
    classes  int16   [N, k, H, W]  their class ids (int32 when K > 32767); -1 in skipped rows
    keys     str     [N]           sample keys ("" for an unreadable sample whose key is unknown)
    valid    uint8   [N]           1 = labelled, 0 = sample skipped as corrupt (see attribute "skipped")
    done     uint8   [num_shards]  completion flag of each tar shard, written after its rows

Rows are chunked along N with `chunk_rows` rows per chunk, chosen so that every tar-shard boundary falls on a
chunk boundary: the first shard's count when all shards but the last have equal counts (one chunk = one tar
shard), else the gcd of those counts (a tar shard then spans several chunks). Either way each chunk belongs to
exactly one tar shard, so one writer alone ever writes it (zarr-python 3 has no locking; two writers of one
chunk lose data). zarr's LocalStore (>= 3.1.3) writes each chunk to a temporary file and renames it, so a
killed writer leaves a chunk whole or absent; a shard without its `done` flag is simply redone. The group
attribute `complete` is set, by the driver alone, only once every shard's `done` flag is in. One dump at a
time writes a store: `store_lock` holds `<store>.lock`.

The geometry of a map is its `footprint`: the square of the original image the labeler saw, resized to the
labeler's input (see `footprint_box`). The student data path uses `open_store`, `store_shards`, `check_matches`,
`LabelStore.shard_rows`, `LabelStore.read_rows` and `footprint_box`.
"""

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from common.errors import UserError
from core.eval_view import centre_box, check_crop_pct
from shards.manifest import MANIFEST, Manifest, keys_digest

FORMAT = "tokenlabel-labels"
VERSION = 1
VALUE_KIND = "logits"
RUN_STATE = ("complete", "skipped")  # attributes that change while a store is filled; the rest is its identity
CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")  # byte-shuffled fp16/int16 then zstd, lossless


def make_footprint(input_size: int, crop_pct: float = 1.0, interpolation: str = "bicubic",
                   shift: float = 0.0) -> dict[str, Any]:
    """The rule that turned an original image into the labeler's S x S input (core.eval_view's centre view).

    The map's cells tile the footprint box; `shift` (labeler input pixels, right and down) is how far the box the
    labeler saw was moved so that each token's receptive-field centre falls on its cell's centre
    (labeler.receptive)."""
    return {"resize": "shorter side to input_size/crop_pct", "crop": "center", "crop_pct": check_crop_pct(crop_pct),
            "input_size": input_size, "interpolation": interpolation, "shift": shift}


def footprint_box(footprint: Mapping[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in the original image's continuous pixel coordinates that the map covers.

    Resizing the shorter side to S / crop_pct and centre-cropping S x S covers a centred square of side
    crop_pct * min(width, height) (core.eval_view.centre_box); the dump resamples exactly this box to S x S,
    and the map's H x W tokens tile it evenly.
    """
    if footprint.get("crop") != "center":
        raise UserError(f"unknown footprint crop {footprint.get('crop')!r}; this store needs a newer tokenlabel")
    return centre_box(width, height, footprint["crop_pct"])


def chunk_rows(counts: list[int]) -> int:
    """Rows per chunk such that every tar-shard boundary is a chunk boundary (see the module docstring)."""
    return counts[0] if len(counts) == 1 else math.gcd(*counts[:-1])


def flatten(attrs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested attributes as {"labeler.sha256": ...}, for naming exactly which field differs."""
    flat = {}
    for name, value in attrs.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def identity_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'field: store has A, now B' for each identity attribute (all but the run state) that differs."""
    have = flatten({k: v for k, v in stored.items() if k not in RUN_STATE})
    want = flatten({k: v for k, v in wanted.items() if k not in RUN_STATE})
    return [f"{name}: store has {have.get(name)!r}, now {want.get(name)!r}"
            for name in sorted(set(have) | set(want)) if have.get(name) != want.get(name)]


def dataset_attrs(manifest: Manifest, split: str) -> dict[str, Any]:
    """What a store records of the shards it labels; `root` (the shard folder, absolute) is where they were."""
    return {"split": split, "digest": manifest.digest(split), "count": manifest.count(split),
            "num_classes": manifest.num_classes, "shards": [list(s) for s in manifest.shards(split)],
            "root": str(manifest.root.resolve())}


def store_attrs(*, num_classes: int, k: int, grid: tuple[int, int], footprint: Mapping[str, Any],
                labeler: Mapping[str, Any], dataset: Mapping[str, Any], producer: Mapping[str, Any]) -> dict[str, Any]:
    """All attributes of a new store, as JSON would give them back (so they compare equal to a stored copy)."""
    counts = [count for _, count in dataset["shards"]]
    attrs = {"format": FORMAT, "version": VERSION, "value": VALUE_KIND, "num_classes": num_classes, "k": k,
             "grid": list(grid), "chunk_rows": chunk_rows(counts), "footprint": footprint, "labeler": labeler,
             "dataset": dataset, "producer": producer, "complete": False, "skipped": []}
    return json.loads(json.dumps(attrs))


def create_store(path: str | Path, attrs: Mapping[str, Any]) -> zarr.Group:
    """Create the empty store (arrays and `store_attrs` attributes) at `path`, which must not exist yet.

    Callers create it under a temporary name and `publish` it, so a store path never holds a half-made group.
    """
    counts = [count for _, count in attrs["dataset"]["shards"]]
    n, rows, k, grid = sum(counts), attrs["chunk_rows"], attrs["k"], tuple(attrs["grid"])
    class_dtype = "int16" if attrs["num_classes"] <= np.iinfo(np.int16).max else "int32"
    group = zarr.open_group(Path(path), mode="w-", zarr_format=3, attributes=dict(attrs))
    maps = {"shape": (n, k, *grid), "chunks": (rows, k, *grid), "compressors": CODEC}
    group.create_array("scores", dtype="float16", fill_value=np.nan, dimension_names=("row", "k", "y", "x"), **maps)
    group.create_array("classes", dtype=class_dtype, fill_value=-1, dimension_names=("row", "k", "y", "x"), **maps)
    group.create_array("keys", shape=(n,), chunks=(rows,), dtype=str)
    group.create_array("valid", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
    group.create_array("done", shape=(len(counts),), chunks=(1,), dtype="uint8", fill_value=0)
    return group


def temporary_path(path: Path) -> Path:
    """Where a store is built before `publish` moves it to `path`; stale ones are removed under the lock."""
    for stale in path.parent.glob(f"{path.name}.partial-*"):
        shutil.rmtree(stale)
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """Move a fully written temporary store into place (replacing whatever the caller agreed to replace)."""
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


@contextlib.contextmanager
def store_lock(path: Path) -> Iterator[None]:
    """Hold `<store>.lock` (an flock, released even on kill -9) while writing; a second writer is refused.

    The file records the owner's host and pid for the refusal message. It is removed on release; the inode
    check makes a writer that locked a just-removed file try again instead of sharing the lock.
    """
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{path}: another dump is writing this store ({owner}; lock {lock}); "
                            f"wait for it to finish or stop it, then run again") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


class LabelStore:
    """Read side of a store: opens Zarr lazily in each process (pickles as its path), reads whole row ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]

    def __repr__(self) -> str:
        return f"LabelStore({str(self.path)!r})"

    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r", zarr_format=3)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def num_rows(self) -> int:
        return self.group["scores"].shape[0]

    @property
    def num_classes(self) -> int:
        return self.attrs["num_classes"]

    @property
    def k(self) -> int:
        return self.attrs["k"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.attrs["grid"])

    @property
    def footprint(self) -> dict[str, Any]:
        return self.attrs["footprint"]

    @cached_property
    def keys(self) -> np.ndarray:
        return self.group["keys"][:]

    def shard_rows(self, shard: str | int) -> tuple[int, int]:
        """[start, stop) rows of a tar shard, given by file name or position in the split."""
        shards = self.attrs["dataset"]["shards"]
        names = [name for name, _ in shards]
        position = shard if isinstance(shard, int) else names.index(shard) if shard in names else None
        if position is None:
            raise UserError(f"{self.path}: no tar shard {shard!r} in this store (it has {names[0]} ... {names[-1]})")
        start = sum(count for _, count in shards[:position])
        return start, start + shards[position][1]

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float16 [n, k, H, W], classes int [n, k, H, W]) of rows [start, stop)."""
        return self.group["scores"][start:stop], self.group["classes"][start:stop]

    def done(self) -> np.ndarray:
        return self.group["done"][:]

    def valid(self) -> np.ndarray:
        return self.group["valid"][:]


SHARDS_HELP = ("the store's shard folder (default: <dataset> when the store is <dataset>/labels/NAME.zarr, else "
               "the dataset folder the store records)")


def store_shards(store: LabelStore, shards: str | Path | None = None) -> Path:
    """The shard folder a store labels: `shards` when given; else `<dataset>` for a store placed at
    `<dataset>/labels/NAME.zarr` (symlinks not followed) when that folder holds a manifest; else the folder the
    store records (dataset.root). One line when none of them holds a manifest."""
    if shards is not None:
        return Path(shards)
    path = Path(os.path.abspath(store.path))
    candidates = [(path.parent.parent, "its <dataset>/labels/ folder")] if path.parent.name == "labels" else []
    if store.attrs["dataset"].get("root"):
        candidates.append((Path(store.attrs["dataset"]["root"]), "the dataset it records"))
    for folder, _ in candidates:
        if (folder / MANIFEST).is_file():
            return folder
    if not candidates:
        raise UserError(f"{store.path}: not in a <dataset>/labels/ folder and no dataset folder recorded; "
                        "pass --shards DIR")
    tried = " nor in ".join(f"{folder} ({why})" for folder, why in candidates)
    raise UserError(f"{store.path}: no {MANIFEST} in {tried}; pass --shards DIR")


def open_store(path: str | Path) -> LabelStore:
    """Open a label store for reading, refusing (one line) anything that is not one."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path}: no label store here; make one with `python -m dump.dump_labels --out {path}`")
    store = LabelStore(path)
    try:
        fmt = store.attrs.get("format")
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: unreadable Zarr metadata ({e}); re-run the dump with --overwrite") from e
    if fmt != FORMAT:
        raise UserError(f"{path}: format is {fmt!r}, not a {FORMAT} store")
    if store.attrs.get("version") != VERSION:
        raise UserError(f"{path}: {FORMAT} version {store.attrs.get('version')}, this code reads version {VERSION}")
    return store


def mark_complete(group: zarr.Group) -> list[dict[str, Any]]:
    """Record the skipped rows (valid == 0) and set `complete`, once every shard's done flag is in."""
    done = group["done"][:]
    if not done.all():
        raise UserError(f"{group.store}: {int((done == 0).sum())} shard(s) not done; run the same dump again")
    keys = group["keys"][:]
    skipped = [{"row": int(row), "key": str(keys[row])} for row in np.flatnonzero(group["valid"][:] == 0)]
    group.attrs.update({"skipped": skipped, "complete": True})
    return skipped


def examples(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def check_complete(store: LabelStore) -> None:
    """Refuse a store whose dump has not finished, saying how far it got."""
    done = store.done()
    if not store.attrs.get("complete") or not done.all():
        raise UserError(f"{store.path}: incomplete label store ({int(done.sum())} of {len(done)} shards done); "
                        f"run the same dump command again to finish it")


def misplaced_keys(keys: np.ndarray, expected: list[str], valid: np.ndarray) -> np.ndarray:
    """Rows whose stored key is not the shards' key at that row (an unknown key, "", is allowed in skipped rows)."""
    return np.flatnonzero((keys != np.array(expected, dtype=keys.dtype)) & ~((keys == "") & (valid == 0)))


def check_matches(store: LabelStore, manifest: Manifest, split: str) -> None:
    """Refuse (one line) a store that is incomplete or was not made from exactly these shards of `split`: its
    attributes, then its `keys` array itself (the rows are joined to the samples by position)."""
    from shards.reader import split_keys

    check_complete(store)
    have, want = store.attrs["dataset"], dataset_attrs(manifest, split)
    where = f"{store.path} vs {manifest.root}/manifest.json"
    if have["split"] != split:
        raise UserError(f"{where}: the store labels split '{have['split']}', not '{split}'; dump the '{split}' split")
    if store.num_classes != manifest.num_classes:
        raise UserError(f"{where}: the store has {store.num_classes} classes, the shards {manifest.num_classes}; "
                        f"dump with a labeler trained on these shards")
    if have["digest"] != want["digest"]:
        stored, present = set(store.keys.tolist()), split_keys(manifest.root, split)
        missing = [key for key in present if key not in stored]
        extra = sorted(stored - set(present) - {""})
        raise UserError(f"{where}: made from other shards (key digest differs; {len(stored)} keys stored, "
                        f"{len(present)} in the shards, {len(missing)} missing e.g. [{examples(missing)}], "
                        f"{len(extra)} extra e.g. [{examples(extra)}]); re-run the dump on these shards")
    if have["shards"] != want["shards"]:
        raise UserError(f"{where}: same keys but a different tar-shard layout ({len(have['shards'])} vs "
                        f"{len(want['shards'])} shards); re-run the dump on these shards")
    keys = store.keys
    if len(keys) == want["count"] and keys_digest(keys.tolist()) == want["digest"]:
        return
    expected = split_keys(manifest.root, split)  # read only when the digest differs (or a key is unknown)
    problem = f"{len(keys)} keys stored, {len(expected)} in the shards" if len(keys) != len(expected) else None
    wrong = misplaced_keys(keys, expected, store.valid()) if problem is None else []
    if len(wrong):
        row = wrong[0]
        problem = f"{len(wrong)} row(s) differ, first row {row}: {keys[row]!r} stored, {expected[row]!r} in the shards"
    if problem:
        raise UserError(f"{where}: the store's keys array does not list the shards' keys, though its attributes do "
                        f"({problem}); its rows would label other images: re-run the dump on these shards")
