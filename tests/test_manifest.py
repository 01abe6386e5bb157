"""manifest.json version 2: per-shard sha256 and content digests, checked by the reader as it streams; a schema that
names the bad field; `python -m shards.manifest upgrade` for version 1; keys refused where unsafe."""

import copy
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from common.errors import UserError
from shards.demo import build_demo
from shards.manifest import check_key, content_digest, key_problem, load_manifest
from shards.manifest import main as manifest_main
from shards.reader import ShardReader, read_shard, split_keys

REPO = Path(__file__).parents[1]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Demo shards: train 6 images in shards of 2, val 2."""
    build_demo(tmp_path / "demo", train=6, val=2, per_shard=2)
    return tmp_path / "demo"


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar member by member: change(name, data) -> (name, data)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            member.name, data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def edit_manifest(root: Path, edit) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


def rehash(doc: dict, root: Path) -> None:
    """Make the manifest's sha256s and content digests those of the tars as they are now."""
    for split in doc["splits"].values():
        for shard in split["shards"]:
            shard["sha256"] = hashlib.sha256((root / shard["file"]).read_bytes()).hexdigest()
        split["content_digest"] = content_digest(split["shards"])


def test_manifest_records_each_tars_sha256_and_the_splits_content_digest(shards):
    doc = json.loads((shards / "manifest.json").read_text())
    manifest = load_manifest(shards)
    assert doc["version"] == 2 and manifest.shards("train") == [(f"train-00000{i}.tar", 2) for i in range(3)]
    for split in ("train", "val"):
        hashes = [hashlib.sha256((shards / name).read_bytes()).hexdigest() for name, _ in manifest.shards(split)]
        assert manifest.shard_digests(split) == hashes
        lines = "".join(f"{name}\t{count}\t{sha}\n" for (name, count), sha in zip(manifest.shards(split), hashes))
        assert manifest.content_digest(split) == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    build_demo(shards.parent / "again", train=6, val=2, per_shard=2, seed=1)  # other pixels, other digests
    assert load_manifest(shards.parent / "again").content_digest("train") != manifest.content_digest("train")


def test_a_tar_replaced_by_another_with_the_same_keys_is_refused(shards, capsys):
    manifest = load_manifest(shards)
    name, keys = manifest.shards("train")[1][0], split_keys(shards, "train")

    def reencode(member: str, data: bytes) -> tuple[str, bytes]:
        if not member.endswith(".jpg"):
            return member, data
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).save(out, format="JPEG", quality=50)  # still a valid image
        return member, out.getvalue()

    rewrite_tar(shards / name, reencode)
    assert split_keys(shards, "train") == keys  # the same keys and counts: only the bytes tell
    with pytest.raises(UserError) as error:
        list(read_shard(shards, "train", name))
    assert str(error.value) == (f"{shards / name}: changed since manifest.json was written (its sha256 differs "
                                "from the manifest's); rebuild the shards")
    assert len(list(read_shard(shards, "train", manifest.shards("train")[0][0]))) == 2  # the others still read
    capsys.readouterr()
    reader = ShardReader(shards, "train", on_error="skip")  # corrupt bytes change a tar too: read it, and warn
    assert len(list(reader)) == 6 and not reader.skips.skipped
    assert capsys.readouterr().err.strip().endswith(f"warning: {shards / name}: changed since manifest.json was "
                                                    "written (its sha256 differs from the manifest's); read as it "
                                                    "is under the skip policy")


MANIFEST_EDITS = [
    (lambda d: d.pop("classes"), "classes: missing"),
    (lambda d: d.update(classes="ab"), "classes: expected a list, got 'ab'"),
    (lambda d: d["classes"].__setitem__(2, 7), "classes[2]: expected a string, got 7"),
    (lambda d: d.update(has_masks="yes"), "has_masks: expected true or false, got 'yes'"),
    (lambda d: d.update(splits=[]), "splits: expected an object, got []"),
    (lambda d: d["splits"].update(train=[1]), "splits.train: expected an object, got [1]"),
    (lambda d: d["splits"]["train"].update(shards={}), "splits.train.shards: expected a list, got {}"),
    (lambda d: d["splits"]["train"]["shards"][2].update(count="2"),
     "splits.train.shards[2].count: expected an integer >= 0, got '2'"),
    (lambda d: d["splits"]["train"]["shards"][1].pop("file"), "splits.train.shards[1].file: missing"),
    (lambda d: d["splits"]["train"]["shards"][1].update(file="../../etc/passwd"),
     "splits.train.shards[1].file: expected a file name, got '../../etc/passwd'"),
    (lambda d: d["splits"]["val"]["shards"].__setitem__(0, "val-000000.tar"),
     "splits.val.shards[0]: expected an object, got 'val-000000.tar'"),
    (lambda d: d["splits"]["val"]["shards"][0].update(sha256="abc"),
     "splits.val.shards[0].sha256: expected a hex sha256, got 'abc'"),
    (lambda d: d["splits"]["val"].update(count=True), "splits.val.count: expected an integer >= 0, got True"),
    (lambda d: d["splits"]["val"].pop("content_digest"), "splits.val.content_digest: missing"),
    (lambda d: d["splits"]["val"].update(count=3), "split 'val' counts 3 samples but its shards sum to 2"),
    (lambda d: d.update(version=3), "version 3, this tokenlabel reads 2"),
]


def test_a_hand_edited_manifest_is_refused_naming_the_field(shards):
    original = json.loads((shards / "manifest.json").read_text())
    for edit, message in MANIFEST_EDITS:
        doc = copy.deepcopy(original)
        edit(doc)
        (shards / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(UserError) as error:
            load_manifest(shards)
        assert str(error.value).startswith(f"{shards}/manifest.json: {message}"), str(error.value)
    original["splits"]["train"]["shards"][0]["count"] = "2"  # one line from a command too
    (shards / "manifest.json").write_text(json.dumps(original))
    result = upgrade(shards)
    assert result.returncode == 2 and result.stderr == (f"error: {shards}/manifest.json: splits.train.shards[0].count: "
                                                        "expected an integer >= 0, got '2'; rebuild the shards\n")


def downgrade(root: Path) -> dict:
    """Rewrite the manifest as version 1 wrote it (no sha256, content digest or mask counts); returns version 2's."""
    doc = json.loads((root / "manifest.json").read_text())
    old = copy.deepcopy(doc)
    old["version"] = 1
    for split in old["splits"].values():
        del split["content_digest"], split["masks"]
        for shard in split["shards"]:
            del shard["sha256"]
    (root / "manifest.json").write_text(json.dumps(old))
    return doc


def upgrade(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards.manifest", "upgrade", str(root)], capture_output=True,
                          text=True, cwd=REPO)


def test_version_1_is_refused_and_upgrade_rewrites_it_after_checking_the_tars(shards):
    version_2 = downgrade(shards)
    with pytest.raises(UserError) as error:
        load_manifest(shards)
    assert str(error.value) == (f"{shards}/manifest.json: version 1 has no content digests; rebuild the shards, "
                                f"or run `python -m shards.manifest upgrade {shards}`")
    manifest_main(["upgrade", str(shards)])
    assert json.loads((shards / "manifest.json").read_text()) == version_2
    assert len(list(ShardReader(shards, "train"))) == 6

    downgrade(shards)
    first, second = (shards / f"train-00000{i}.tar" for i in (0, 1))
    second.write_bytes(first.read_bytes())  # same count, other keys
    result = upgrade(shards)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr == (f"error: {shards}/manifest.json: split 'train': the tars' keys are not those the "
                             "manifest lists (key digest differs); rebuild the shards\n")
    assert json.loads((shards / "manifest.json").read_text())["version"] == 1  # left as it was


@pytest.mark.parametrize("member", ["a/../../ESCAPED", "/abs/x"])
def test_a_tar_with_an_unsafe_key_is_refused_naming_shard_and_key(shards, member):
    name = load_manifest(shards).shards("train")[0][0]
    first = split_keys(shards, "train")[0]
    rewrite_tar(shards / name, lambda n, data: (n.replace(first, member), data))
    edit_manifest(shards, lambda doc: rehash(doc, shards))  # the manifest vouches for the crafted tar
    problem = "has an empty, '.' or '..' path component" if ".." in member else "is an absolute path"
    message = f"{shards / name}: key '{member}' {problem}; a key must be a relative path of plain names"
    with pytest.raises(UserError) as error:
        list(read_shard(shards, "train", name))
    assert str(error.value) == message
    with pytest.raises(UserError) as error:
        split_keys(shards, "train")
    assert str(error.value) == message
    with pytest.raises(UserError) as error:
        list(ShardReader(shards, "train", on_error="skip"))
    assert str(error.value) == message


def test_check_key_is_the_rule_for_keys():
    assert [key_problem(k) for k in ("n01440764/n01440764_10026", "a.b/c", "c/d/e_f-g")] == [None] * 3
    for key, problem in [("/x/y", "absolute"), ("a\\b", "backslash"), ("a\0b", "NUL"), ("a/../b", "'..'"),
                         ("..", "'..'"), ("a//b", "empty"), ("a/./b", "'.'"), ("a/", "empty"), ("", "empty"),
                         ("a/photo.v2", "dot in its base name"), ("__meta__/x", "__name__")]:
        assert problem in key_problem(key), key
        with pytest.raises(UserError, match="^" + re.escape(f"store.zarr: key {key!r} ")):
            check_key(key, "store.zarr")
