"""Shards from an ImageFolder, the shared reader, bad input, and the demo dataset."""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from shards.build import main as build_main
from shards.demo import build_demo
from shards.manifest import keys_digest, load_manifest
from shards.reader import ShardReader, read_shard, split_keys

CLASSES = ["cat", "dog", "eel"]


def image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """train: 3 classes x 4 images (JPEG and PNG, masks beside the cat images); val: 3 x 1."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, per_class in (("train", 4), ("val", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
                (root / split / name / f"{name}_{i}.{ext}").write_bytes(image_bytes(rng, fmt))
                if name == "cat":
                    mask = Image.fromarray(rng.integers(0, 2, size=(12, 16), dtype=np.uint8))
                    mask.save(root / split / name / f"{name}_{i}.mask.png")
    return root


def build(imagefolder: Path, out: Path, *extra: str) -> None:
    build_main(["--imagefolder", str(imagefolder), "--out", str(out), "--samples-per-shard", "5", *extra])


def test_build_round_trips_keys_classes_and_bytes(imagefolder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build(imagefolder, out)
    manifest = load_manifest(out)
    assert manifest.classes == CLASSES
    assert not manifest.has_masks and manifest.split("train")["masks"] == 4  # masks beside the cat images only
    assert [count for _, count in manifest.shards("train")] == [5, 5, 2]
    keys = []
    for name, count in manifest.shards("train"):
        with tarfile.open(out / name) as tar:
            members = tar.getmembers()
            for member in members:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext in ("jpg", "png"):
                    assert data == (imagefolder / "train" / f"{key}.{ext}").read_bytes()  # never re-encoded
                    keys.append(key)
                elif ext == "cls":
                    assert CLASSES[int(data)] == key.split("/")[0]
                else:
                    assert ext == "mask.png" and key.startswith("cat/")
            assert len({m.name.split(".")[0] for m in members}) == count
    assert sorted(keys) == sorted(f"{c}/{c}_{i}" for c in CLASSES for i in range(4))
    assert keys == split_keys(out, "train")
    assert manifest.digest("train") == keys_digest(keys)

    samples = list(ShardReader(out, "train"))
    assert [s["key"] for s in samples] == keys and [s["index"] for s in samples] == list(range(12))
    for s in samples:
        ext = "png" if s["key"].endswith(("1", "3")) else "jpg"
        original = Image.open(imagefolder / "train" / f"{s['key']}.{ext}").convert("RGB")
        assert np.array_equal(np.asarray(s["image"]), np.asarray(original))
        assert s["cls"] == CLASSES.index(s["key"].split("/")[0])
        assert (s["mask"] is not None) == s["key"].startswith("cat/")


def test_build_is_deterministic_and_refuses_to_overwrite(imagefolder: Path, tmp_path: Path) -> None:
    build(imagefolder, tmp_path / "a")
    build(imagefolder, tmp_path / "b")
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    with pytest.raises(SystemExit) as exit_info:
        build(imagefolder, tmp_path / "a")
    assert exit_info.value.code == 2
    build(imagefolder, tmp_path / "a", "--overwrite", "--samples-per-shard", "100")
    assert len(load_manifest(tmp_path / "a").shards("train")) == 1


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "shards.build", "--imagefolder", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nope: no such folder" in result.stderr


def test_reader_splits_across_workers_and_ranks_and_reshuffles(imagefolder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build(imagefolder, out, "--samples-per-shard", "2")  # 6 train shards
    everything = sorted(s["key"] for s in ShardReader(out, "train"))
    reader = ShardReader(out, "train", transform=lambda s: s["key"])
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2)
    assert sorted(loader) == everything and len(reader) == 12
    ranks = [ShardReader(out, "train", shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = [[s["key"] for s in r] for r in ranks]
    assert sorted(seen[0] + seen[1]) == everything and [len(r) for r in ranks] == [len(s) for s in seen]
    orders = []
    for epoch in (0, 1):
        reader = ShardReader(out, "train", shuffle=True, seed=3, buffer=4)
        reader.set_epoch(epoch)
        orders.append([s["key"] for s in reader])
        reader.set_epoch(epoch)
        assert [s["key"] for s in reader] == orders[-1]  # same seed and epoch: same order
    assert orders[0] != orders[1] and sorted(orders[0]) == everything


def corrupt_member(shard: Path, key: str, ext: str) -> None:
    """Rewrite one member's bytes with garbage, keeping the tar itself valid."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{key}.{ext}":
                data = b"not an image" * 10
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_bad_input_names_shard_and_key(imagefolder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build(imagefolder, out)
    manifest = load_manifest(out)
    first = out / manifest.shards("train")[0][0]
    key = split_keys(out, "train")[1]
    ext = "png" if key.endswith(("1", "3")) else "jpg"
    corrupt_member(first, key, ext)
    with pytest.raises(UserError, match=f"{first}: {key}: cannot decode"):
        list(ShardReader(out, "train"))
    reader = ShardReader(out, "train", on_error="skip")
    assert len(list(reader)) == 11 and reader.skips.skipped[0][:2] == (str(first), key)

    build(imagefolder, out, "--overwrite")
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{first}: truncated or corrupt tar after key"):
        list(read_shard(out, "train", first.name))

    second = out / manifest.shards("train")[1][0]
    with tarfile.open(second) as tar:  # the same tar without its last sample
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last = members[-1][0].name.split(".")[0]
    with tarfile.open(second, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] != last:
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(UserError, match=f"{second}: holds 4 samples but manifest.json says 5"):
        list(read_shard(out, "train", second.name))

    second.unlink()
    with pytest.raises(UserError, match=f"{second}: shard listed in the manifest is missing"):
        ShardReader(out, "train")


def test_demo_masks_agree_with_digits(tmp_path: Path) -> None:
    build_demo(tmp_path / "demo", train=40, val=20, per_shard=16)
    manifest = load_manifest(tmp_path / "demo")
    assert manifest.count("train") == 40 and manifest.count("val") == 20 and manifest.has_masks
    assert not manifest.hflip  # digits change under a mirror
    train_keys, val_keys = split_keys(tmp_path / "demo", "train"), split_keys(tmp_path / "demo", "val")
    assert not set(train_keys) & set(val_keys)
    distractors = []
    for sample in ShardReader(tmp_path / "demo", "train"):
        image, mask = np.asarray(sample["image"], np.float32), np.asarray(sample["mask"])
        assert image.shape == (64, 64, 3)
        labels = set(np.unique(mask)) - {0}
        assert sample["cls"] + 1 in labels and len(labels) <= 3  # the target and up to two distractors
        distractors.append(len(labels) - 1)
        target = mask == sample["cls"] + 1
        rows, cols = np.nonzero(target)
        side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert 0.25 * 64 < side < 0.6 * 64
        for other in labels - {sample["cls"] + 1}:  # every distractor is smaller than the target
            rows, cols = np.nonzero(mask == other)
            assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 < side
        rows, cols = np.nonzero(target)
        inside_box = np.zeros_like(target)
        inside_box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        background = inside_box & (mask == 0)
        # the digit's pixels stand out from the background around them: the mask marks the real strokes
        assert np.abs(image[target].mean(0) - image[background].mean(0)).max() > 20
    assert np.mean(distractors) > 1.2  # one or two in nearly every image
