"""Check a label store against its shards: `python -m dump.verify STORE [--shards DIR]`; one line per failure.

Checked: the store is complete; its attributes agree with the shards' manifest (split, key and content
digests, count, classes, shard layout); each tar shard is the one labelled (its sha256); every done shard has
all its chunk files; every key of the split is present once, in order; array shapes and dtypes; in labelled
rows no NaN/inf, scores descending along k, class ids in [0, K) and distinct per token; skipped rows
(valid == 0, the skip policy's corrupt samples) are exactly the ones listed in the `skipped` attribute and hold
NaN scores and -1 ids.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import cli
from dump.store.checks import content_problem, misplaced_keys, missing_chunks
from dump.store.reader import SHARDS_HELP, LabelStore, open_store, store_shards
from dump.store.schema import dataset_attrs
from shards.manifest import keys_digest, load_manifest
from shards.reader import split_keys


def check_layout(store: LabelStore) -> list[str]:
    """Shapes and dtypes of the arrays against the attributes."""
    a, g = store.attrs, store.group
    n = a["dataset"]["count"]
    want = {"scores": ((n, a["k"], *a["grid"]), "float16"),
            "classes": ((n, a["k"], *a["grid"]), "int16" if a["num_classes"] <= 32767 else "int32"),
            "keys": ((n,), None), "valid": ((n,), "uint8"), "done": ((len(a["dataset"]["shards"]),), "uint8"),
            "shard_sha256": ((len(a["dataset"]["shards"]),), None), "dump_id": ((len(a["dataset"]["shards"]),), None)}
    failures = []
    for name, (shape, dtype) in want.items():
        if name not in g:
            failures.append(f"{store.path}: array '{name}' is missing")
        elif g[name].shape != shape or (dtype and str(g[name].dtype) != dtype):
            failures.append(f"{store.path}: array '{name}' is {g[name].dtype}{list(g[name].shape)}, expected {dtype}{list(shape)}")
    return failures


def check_keys(store: LabelStore, expected: list[str], valid: np.ndarray) -> list[str]:
    """Every key of the split once and in order; unknown keys ("") only in skipped rows."""
    keys, path = store.keys, store.path
    failures = []
    if len(keys) != len(expected):
        return [f"{path}: {len(keys)} keys stored, the split has {len(expected)}"]
    wrong = misplaced_keys(keys, expected, valid)
    if len(wrong):
        row = wrong[0]
        failures.append(f"{path}: {len(wrong)} row(s) hold the wrong key, first row {row}: {keys[row]!r}, "
                        f"the shards have {expected[row]!r} there")
    repeated = [key for key, count in Counter(keys.tolist()).items() if count > 1 and key]
    if repeated:
        failures.append(f"{path}: {len(repeated)} key(s) stored more than once, e.g. {repeated[0]!r}")
    if "" not in keys and keys_digest(keys.tolist()) != store.attrs["dataset"]["digest"]:
        failures.append(f"{path}: the stored keys' digest differs from the digest recorded in the attributes")
    return failures


def rows_where(mask: np.ndarray, rows: np.ndarray) -> list[int]:
    """Rows (of a per-row stack `mask`) where any element is set."""
    return rows[mask.reshape(len(rows), -1).any(axis=1)].tolist() if len(rows) else []


def check_rows(store: LabelStore, valid: np.ndarray) -> list[str]:
    """Values of every tar shard's rows: finite, descending, in range, distinct; skipped rows well-defined."""
    num_classes = store.num_classes
    bad: dict[str, list[int]] = {"non-finite scores": [], "scores not descending along k": [],
                                 f"class ids outside [0, {num_classes})": [], "a class id repeated in a token": [],
                                 "skipped rows not all NaN / -1": []}
    for position in range(len(store.attrs["dataset"]["shards"])):
        start, stop = store.shard_rows(position)
        scores, classes = store.read_rows(start, stop)
        labelled = valid[start:stop] == 1
        s, c, rows = scores[labelled].astype(np.float32), classes[labelled], np.flatnonzero(labelled) + start
        ordered = np.sort(c, axis=1)
        bad["non-finite scores"] += rows_where(~np.isfinite(s), rows)
        bad["scores not descending along k"] += rows_where(s[:, 1:] > s[:, :-1], rows)
        bad[f"class ids outside [0, {num_classes})"] += rows_where((c < 0) | (c >= num_classes), rows)
        bad["a class id repeated in a token"] += rows_where(ordered[:, 1:] == ordered[:, :-1], rows)
        skipped = np.flatnonzero(~labelled)
        undefined = ~np.isnan(scores[skipped].astype(np.float32)) | (classes[skipped] != -1)
        bad["skipped rows not all NaN / -1"] += rows_where(undefined, skipped + start)
    return [f"{store.path}: {len(rows)} row(s) with {what}, first row {rows[0]} (key {store.keys[rows[0]] or '?'})"
            for what, rows in bad.items() if rows]


def verify_store(path: str | Path, shards: str | Path | None = None) -> tuple[list[str], str]:
    """(failures, summary): every failure is one line; an empty list means the store is sound."""
    store = open_store(path)
    manifest = load_manifest(store_shards(store, shards))
    attrs = store.attrs
    split = attrs["dataset"]["split"]
    failures = check_layout(store)
    if failures:
        return failures, ""
    done = store.done()
    if not attrs.get("complete") or not done.all():
        failures.append(f"{store.path}: incomplete ({int(done.sum())} of {len(done)} shards done, "
                        f"complete={attrs.get('complete')}); run the same dump command again")
    # a store may live anywhere (root); its content is checked tar shard by tar shard below, naming the first
    want = {k: v for k, v in dataset_attrs(manifest, split).items() if k not in ("root", "content_digest")}
    for field, value in want.items():
        if attrs["dataset"].get(field) != value:
            failures.append(f"{store.path}: dataset.{field} is {str(attrs['dataset'].get(field))[:80]!r}, "
                            f"{manifest.root}/manifest.json has {str(value)[:80]!r}")
    if attrs["num_classes"] != manifest.num_classes:
        failures.append(f"{store.path}: num_classes {attrs['num_classes']}, the shards have {manifest.num_classes}")
    if attrs["dataset"]["shards"] == want["shards"]:  # the same tar files: compare their bytes and chunk files
        failures += [f"{store.path}: {problem}" for problem in (content_problem(store, manifest, split),
                                                                missing_chunks(store)) if problem]
    valid = store.valid()
    failures += check_keys(store, split_keys(manifest.root, split), valid)
    listed = {entry["row"] for entry in attrs.get("skipped", [])}
    unlisted = sorted(set(np.flatnonzero(valid == 0).tolist()) ^ listed)
    if unlisted:
        failures.append(f"{store.path}: {len(unlisted)} row(s) differ between valid == 0 and the 'skipped' attribute, "
                        f"first row {unlisted[0]}")
    failures += check_rows(store, valid)
    grid = "x".join(map(str, attrs["grid"]))
    summary = (f"ok: {store.num_rows} rows, top-{attrs['k']} of {attrs['num_classes']} classes on a {grid} grid, "
               f"{len(done)} shards, {len(listed)} skipped row(s); labeler {attrs['labeler']['model']}, "
               f"split '{split}' of {manifest.root}")
    return failures, summary


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, help="label store (a .zarr folder)")
    parser.add_argument("--shards", type=Path, default=None, help=SHARDS_HELP)
    args = parser.parse_args(argv)
    failures, summary = verify_store(args.store, args.shards)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print(summary)


if __name__ == "__main__":
    main()
