"""Writing a store: shard by shard, durably, then complete; built aside and published whole; one writer.

zarr's LocalStore (>= 3.1.3) writes each chunk to a temporary file and renames it: a killed writer leaves a
chunk whole or absent. `write_shard` writes every chunk of a shard, even one of fill values only (Zarr would
otherwise leave it out), fsyncs them, then its `done` flag: a shard without its flag is redone, and a done
shard whose chunk files are missing now lost data since (dump.store.checks.missing_chunks). `complete` is set,
by the driver alone, once every shard's `done` flag is on disk.
"""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from common.errors import UserError
from common.files import exclusive_lock, fsync_path, fsync_tree, replace_folder
from dump.store.reader import group_attrs
from dump.store.schema import FORMAT, ROW_ARRAYS, SHARD_ARRAYS, shard_chunks, shard_range


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


@contextlib.contextmanager
def publishing(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` to build a store or an export in (stale ones removed: call it under the
    lock), removed if the block fails, else moved into place durably (every file fsynced first) and atomically
    (common.files.replace_folder: a reader sees the old folder whole or the new one whole), replacing what the
    caller checked is ours."""
    for stale in path.parent.glob(f"{path.name}.partial-*"):
        shutil.rmtree(stale)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    replace_folder(tmp, path)


def refuse_foreign(path: Path, flag: str) -> None:
    """One line unless `path` is absent or a label store of ours (any version): nothing else is replaced."""
    if path.exists() and (group_attrs(path) or {}).get("format") != FORMAT:
        what = "a Zarr group not written by tokenlabel" if (path / "zarr.json").is_file() else "not a label store"
        raise UserError(f"{flag} {path}: exists and is {what}; not replacing it (even with --overwrite): remove it "
                        f"yourself or choose another {flag}")


def store_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `<store>.lock` while writing the store; a second writer is refused in one line."""
    return exclusive_lock(path.with_name(path.name + ".lock"), f"{path}: another dump is writing this store")
