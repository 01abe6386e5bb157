"""The label store: a Zarr v3 group of per-image top-k token-label maps, one chunk per tar shard.

Layout (N rows in the split's shard order, k labels per token, an H x W token grid):

    scores   float16 [N, k, H, W]  top-k raw logits per token, descending along k; NaN in skipped rows
    classes  int16   [N, k, H, W]  their class ids (int32 when K > 32767); -1 in skipped rows
    keys     str     [N]           sample keys ("" for an unreadable sample whose key is unknown)
    valid    uint8   [N]           1 = labelled, 0 = sample skipped as corrupt (see attribute "skipped")
    shard_sha256 str [num_shards]  sha256 of each tar shard's bytes as labelled, written with its rows
    dump_id  str     [num_shards]  the store's dump id (attribute "dump_id"), written with each tar shard's rows
    done     uint8   [num_shards]  completion flag of each tar shard, written after its rows are durable

Rows are chunked along N with `chunk_rows` rows per chunk, chosen so that every tar-shard boundary falls on a
chunk boundary: the first shard's count when all shards but the last have equal counts (one chunk = one tar
shard), else the gcd of those counts (a tar shard then spans several chunks). Either way each chunk belongs to
exactly one tar shard, so one writer alone ever writes it (zarr-python 3 has no locking; two writers of one
chunk lose data). zarr's LocalStore (>= 3.1.3) writes each chunk to a temporary file and renames it, so a
killed writer leaves a chunk whole or absent. `write_shard` writes every chunk of a shard, even one of fill
values only (Zarr would otherwise leave it out), fsyncs them, and only then its `done` flag: a shard without
its flag is simply redone, and a done shard whose chunk files are missing now (`missing_chunks`) lost data
since. The group attribute `complete` is set, by the driver alone, only once every shard's `done` flag is on
disk. One dump at a time writes a store: `store_lock` holds `<store>.lock`.

A store fits only the images it was made from: it records the shards' content digest and each tar shard's
sha256 (`content_problem` names the first that differs), not only their key names. Each store gets a dump id
(uuid4) when it is created; `LabelStore.read_rows` checks that the rows it read carry the id of the store it
opened, so a store replaced while a run reads it (`publish`: renamed aside, the new one moved in, then removed)
stops the run instead of feeding it another dump's rows.

The geometry of a map is its `footprint`: the square of the original image the labeler saw, resized to the
labeler's input (see `footprint_box`). The student data path uses `open_store`, `store_shards`, `check_matches`,
`LabelStore.shard_rows`, `LabelStore.read_rows`, `LabelStore.dump_id` and `footprint_box`.
"""

import bisect
import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from common.errors import UserError
from common.files import exclusive_lock, fsync_path, fsync_tree, replace_folder
from core.imaging.boxes import centre_box, check_crop_pct
from shards.manifest import MANIFEST, Manifest, keys_digest, load_manifest

FORMAT = "tokenlabel-labels"
VERSION = 2  # 2: content digests (dataset.content_digest, shard_sha256) and dump ids
VALUE_KIND = "logits"
NOT_IDENTITY = ("complete", "skipped", "dump_id")  # the run state of a store and which dump made it; the rest is
# what it is made from and how: a dump resumes a store only where all of that is the same
ROW_ARRAYS = ("scores", "classes", "keys", "valid")  # chunked along the rows, `chunk_rows` rows per chunk
SHARD_ARRAYS = ("shard_sha256", "dump_id", "done")  # one element, one chunk, per tar shard; `done` written last
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
    """'field: store has A, now B' for each identity attribute (all but NOT_IDENTITY) that differs."""
    have = flatten({k: v for k, v in stored.items() if k not in NOT_IDENTITY})
    want = flatten({k: v for k, v in wanted.items() if k not in NOT_IDENTITY})
    return [f"{name}: store has {have.get(name)!r}, now {want.get(name)!r}"
            for name in sorted(set(have) | set(want)) if have.get(name) != want.get(name)]


def dataset_attrs(manifest: Manifest, split: str) -> dict[str, Any]:
    """What a store records of the shards it labels: their keys' and their bytes' digests, layout, classes, and
    `root` (the shard folder, absolute) where they were."""
    return {"split": split, "digest": manifest.digest(split), "content_digest": manifest.content_digest(split),
            "count": manifest.count(split), "num_classes": manifest.num_classes,
            "shards": [list(s) for s in manifest.shards(split)], "root": str(manifest.root.resolve())}


def store_attrs(*, num_classes: int, k: int, grid: tuple[int, int], footprint: Mapping[str, Any],
                labeler: Mapping[str, Any], dataset: Mapping[str, Any], producer: Mapping[str, Any]) -> dict[str, Any]:
    """All attributes of a new store but its dump id, as JSON would give them back (so they compare equal to a
    stored copy)."""
    counts = [count for _, count in dataset["shards"]]
    attrs = {"format": FORMAT, "version": VERSION, "value": VALUE_KIND, "num_classes": num_classes, "k": k,
             "grid": list(grid), "chunk_rows": chunk_rows(counts), "footprint": footprint, "labeler": labeler,
             "dataset": dataset, "producer": producer, "complete": False, "skipped": []}
    return json.loads(json.dumps(attrs))


def create_store(path: str | Path, attrs: Mapping[str, Any]) -> zarr.Group:
    """Create the empty store (arrays, `store_attrs` attributes and a new dump id) at `path`, which must not exist.

    Callers create it under a temporary name and `publish` it, so a store path never holds a half-made group.
    """
    counts = [count for _, count in attrs["dataset"]["shards"]]
    n, rows, k, grid = sum(counts), attrs["chunk_rows"], attrs["k"], tuple(attrs["grid"])
    class_dtype = "int16" if attrs["num_classes"] <= np.iinfo(np.int16).max else "int32"
    group = zarr.open_group(Path(path), mode="w-", zarr_format=3,
                            attributes={**attrs, "dump_id": uuid.uuid4().hex})
    maps = {"shape": (n, k, *grid), "chunks": (rows, k, *grid), "compressors": CODEC}
    group.create_array("scores", dtype="float16", fill_value=np.nan, dimension_names=("row", "k", "y", "x"), **maps)
    group.create_array("classes", dtype=class_dtype, fill_value=-1, dimension_names=("row", "k", "y", "x"), **maps)
    group.create_array("keys", shape=(n,), chunks=(rows,), dtype=str)
    group.create_array("valid", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
    for name in ("shard_sha256", "dump_id"):
        group.create_array(name, shape=(len(counts),), chunks=(1,), dtype=str)
    group.create_array("done", shape=(len(counts),), chunks=(1,), dtype="uint8", fill_value=0)
    return group


def shard_range(shards: list[list[Any]], position: int) -> tuple[int, int]:
    """[start, stop) rows of tar shard `position` of a store's `dataset.shards` ([file, count] pairs)."""
    start = sum(count for _, count in shards[:position])
    return start, start + shards[position][1]


def shard_chunks(arrays: Mapping[str, zarr.Array], attrs: Mapping[str, Any], position: int) -> list[str]:
    """Storage keys (relative to the store) of every chunk of tar shard `position`, its `done` flag's last."""
    start, stop = shard_range(attrs["dataset"]["shards"], position)
    rows = attrs["chunk_rows"]
    keys = [f"{name}/{arrays[name].metadata.encode_chunk_key((i,) + (0,) * (arrays[name].ndim - 1))}"
            for name in ROW_ARRAYS for i in range(start // rows, (stop - 1) // rows + 1)]
    return keys + [f"{name}/{arrays[name].metadata.encode_chunk_key((position,))}" for name in SHARD_ARRAYS]


def make_durable(root: Path, keys: list[str]) -> None:
    """fsync these files of the store at `root` and every folder from the root down to them (their entries)."""
    folders = {root.joinpath(*key.split("/")[:depth]) for key in keys for depth in range(key.count("/") + 1)}
    for path in [root / key for key in keys] + sorted(folders):
        fsync_path(path)


def write_shard(group: zarr.Group, position: int, *, scores: np.ndarray, classes: np.ndarray, valid: np.ndarray,
                keys: list[str], sha256: str) -> None:
    """Write tar shard `position`'s rows with its tar's sha256 and the store's dump id, every chunk even of fill
    values only, fsync them, then its done flag (fsynced too): the shard is done with all its data, or not done."""
    attrs, root = group.attrs, Path(group.store.root)
    arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in ROW_ARRAYS + SHARD_ARRAYS}
    start, stop = shard_range(attrs["dataset"]["shards"], position)
    arrays["scores"][start:stop], arrays["classes"][start:stop], arrays["valid"][start:stop] = scores, classes, valid
    arrays["keys"][start:stop] = np.array(keys, dtype=str)
    arrays["shard_sha256"][position], arrays["dump_id"][position] = sha256, attrs["dump_id"]
    *chunks, done = shard_chunks(arrays, attrs, position)
    make_durable(root, chunks)
    arrays["done"][position] = 1
    make_durable(root, [done])


def temporary_path(path: Path) -> Path:
    """Where a store is built before `publish` moves it to `path`; stale ones are removed under the lock."""
    for stale in path.parent.glob(f"{path.name}.partial-*"):
        shutil.rmtree(stale)
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary folder (a store or an export) into place, durably (every file fsynced first) and
    atomically (common.files.replace_folder: a reader sees the old folder whole or the new one whole), replacing
    what the caller checked is ours."""
    fsync_tree(tmp)
    replace_folder(tmp, path)


def group_attrs(path: Path) -> dict[str, Any] | None:
    """The attributes in the `zarr.json` of a Zarr group at `path`, read as they are now; None when unreadable."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def refuse_foreign(path: Path, flag: str) -> None:
    """One line unless `path` is absent or a label store of ours (any version): nothing else is replaced."""
    if path.exists() and (group_attrs(path) or {}).get("format") != FORMAT:
        what = "a Zarr group not written by tokenlabel" if (path / "zarr.json").is_file() else "not a label store"
        raise UserError(f"{flag} {path}: exists and is {what}; not replacing it (even with --overwrite): remove it "
                        f"yourself or choose another {flag}")


def store_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `<store>.lock` while writing the store; a second writer is refused in one line."""
    return exclusive_lock(path.with_name(path.name + ".lock"), f"{path}: another dump is writing this store")


class LabelStore:
    """Read side of a store: opens Zarr lazily in each process (pickles as its path), reads whole row ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dump_id": self.dump_id}  # a worker reads the store this process opened

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LabelStore({str(self.path)!r})"

    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r", zarr_format=3)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @cached_property
    def dump_id(self) -> str:
        """The id of the dump (or import) that made the store opened here; a replaced store has another."""
        return self.attrs["dump_id"]

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
        return shard_range(shards, position)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float16 [n, k, H, W], classes int [n, k, H, W]) of rows [start, stop), refused (one line) when
        the store was replaced since it was opened here."""
        try:
            return self.group["scores"][start:stop], self.group["classes"][start:stop]
        finally:  # after the rows (or their failure): a store replaced meanwhile is noticed, not read
            self.check_dump_id(start, stop)

    def check_dump_id(self, start: int, stop: int) -> None:
        """Refuse (one line) rows whose tar shards carry another dump id than the store opened here."""
        offsets = list(np.cumsum([0] + [count for _, count in self.attrs["dataset"]["shards"]]))
        first, last = bisect.bisect_right(offsets, start) - 1, bisect.bisect_right(offsets, max(start, stop - 1)) - 1
        try:
            ids = self.group["dump_id"][first:last + 1]
        except KeyError:  # no store at the path at this instant: the moment between the two renames of a publish
            ids = None
        if ids is not None and (ids == self.dump_id).all():
            return
        now = (group_attrs(self.path) or {}).get("dump_id")
        if now != self.dump_id:  # (the same id: shards this store has not written yet, as in an incomplete dump)
            raise UserError(f"{self.path} was replaced while this run read it (dump id {self.dump_id}, now "
                            f"{now or 'none'}); restart the run")

    def shard_digests(self) -> np.ndarray:
        """The sha256 of each tar shard as it was labelled ("" for a shard not done)."""
        return self.group["shard_sha256"][:]

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
    if store.attrs.get("version") == 1:
        raise UserError(f"{path}: a version 1 {FORMAT} store, from before content digests and dump ids; this code "
                        f"reads version {VERSION}: re-dump it (dump.dump_labels --overwrite) or re-import it")
    if store.attrs.get("version") != VERSION:
        raise UserError(f"{path}: {FORMAT} version {store.attrs.get('version')}, this code reads version {VERSION}")
    return store


def open_matching(path: str | Path, shards: str | Path | None = None) -> tuple[LabelStore, Manifest]:
    """A store and the manifest of the shards it labels (`store_shards`), refused (one line) where they do not fit
    (`check_matches`): the gate of every command that reads a store's rows with its images."""
    store = open_store(path)
    manifest = load_manifest(store_shards(store, shards))
    check_matches(store, manifest, store.attrs["dataset"]["split"])
    return store, manifest


def mark_complete(group: zarr.Group) -> list[dict[str, Any]]:
    """Record the skipped rows (valid == 0) and set `complete`, once every shard's done flag is in."""
    done = group["done"][:]
    if not done.all():
        raise UserError(f"{group.store}: {int((done == 0).sum())} shard(s) not done; run the same dump again")
    keys = group["keys"][:]
    skipped = [{"row": int(row), "key": str(keys[row])} for row in np.flatnonzero(group["valid"][:] == 0)]
    group.attrs.update({"skipped": skipped, "complete": True})
    make_durable(Path(group.store.root), ["zarr.json"])
    return skipped


def examples(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def check_complete(store: LabelStore) -> None:
    """Refuse a store whose dump has not finished, saying how far it got."""
    done = store.done()
    if not store.attrs.get("complete") or not done.all():
        raise UserError(f"{store.path}: incomplete label store ({int(done.sum())} of {len(done)} shards done); "
                        f"run the same dump command again to finish it")


def content_problem(store: LabelStore, manifest: Manifest, split: str) -> str | None:
    """What differs, naming the first tar shard, when the store labelled other bytes than the shards' now (other
    images under the same names); None when every done shard is the one labelled."""
    labelled = zip(manifest.shards(split), store.shard_digests(), manifest.shard_digests(split), store.done())
    for (name, _), have, want, done in labelled:
        if done and have != want:
            return (f"tar shard {name} is not the one labelled (sha256 {have[:12] or 'none'}... stored, "
                    f"{want[:12]}... now): the shards were rebuilt with other images under the same keys")
    return None


def missing_chunks(store: LabelStore) -> str | None:
    """What is missing, naming the first done tar shard with a chunk file absent now (Zarr would read it as fill
    values, as skipped rows); None when all are there. Lists the store's files, reads no chunk."""
    present = {path.relative_to(store.path).as_posix() for path in store.path.rglob("*") if path.is_file()}
    arrays = {name: store.group[name] for name in ROW_ARRAYS + SHARD_ARRAYS}
    for position in np.flatnonzero(store.done()):
        absent = [key for key in shard_chunks(arrays, store.attrs, int(position)) if key not in present]
        if absent:
            name = store.attrs["dataset"]["shards"][position][0]
            return (f"tar shard {name} is done but {len(absent)} of its chunk files are missing (e.g. {absent[0]}): "
                    f"the store lost rows since its dump")
    return None


def misplaced_keys(keys: np.ndarray, expected: list[str], valid: np.ndarray) -> np.ndarray:
    """Rows whose stored key is not the shards' key at that row (an unknown key, "", is allowed in skipped rows)."""
    return np.flatnonzero((keys != np.array(expected, dtype=keys.dtype)) & ~((keys == "") & (valid == 0)))


def check_matches(store: LabelStore, manifest: Manifest, split: str) -> None:
    """Refuse (one line) a store that is incomplete or was not made from exactly these shards of `split`: its
    attributes, each tar shard's bytes (sha256), every done shard's chunk files, then its `keys` array itself (the
    rows are joined to the samples by position)."""
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
    for problem in (content_problem(store, manifest, split), missing_chunks(store)):
        if problem:
            raise UserError(f"{where}: {problem}; re-run the dump on these shards (with --overwrite)")
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
