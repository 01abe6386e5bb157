"""Reading a store: `LabelStore` (whole row ranges, opened lazily per process), `open_store`, `store_shards`.

`LabelStore.read_rows` checks that its rows carry the dump id of the store it opened: a store replaced while
a run reads it (dump.store.write.publishing) stops the run instead of feeding it another dump's rows.
"""

import bisect
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from common.errors import UserError
from dump.store.schema import FORMAT, VERSION, shard_range
from shards.manifest import MANIFEST


def group_attrs(path: Path) -> dict[str, Any] | None:
    """The attributes in the `zarr.json` of a Zarr group at `path`, read as they are now; None when unreadable."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


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
