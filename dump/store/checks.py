"""Whether a store fits the shards it is used with: complete, made from these very images, no rows lost.

A store records the shards' content digest and each tar shard's sha256, not only their keys (`check_matches`).
"""

from pathlib import Path

import numpy as np

from common.errors import UserError
from dump.store.reader import LabelStore, open_store, store_shards
from dump.store.schema import ROW_ARRAYS, SHARD_ARRAYS, dataset_attrs, shard_chunks
from shards.manifest import Manifest, keys_digest, load_manifest


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


def open_matching(path: str | Path, shards: str | Path | None = None) -> tuple[LabelStore, Manifest]:
    """A store and the manifest of the shards it labels (`store_shards`), refused (one line) where they do not fit
    (`check_matches`): the gate of every command that reads a store's rows with its images."""
    store = open_store(path)
    manifest = load_manifest(store_shards(store, shards))
    check_matches(store, manifest, store.attrs["dataset"]["split"])
    return store, manifest
