"""shards.build and shards.demo never delete what they did not write, keys survive the round trip and are safe as
paths, an unreadable entry is named in one line, and masks are checked while building."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from shards.build import build
from shards.build import main as build_main
from shards.demo import build_demo
from shards.manifest import load_manifest
from shards.reader import ShardReader, split_keys

REPO = Path(__file__).parents[1]


def save(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", seed: int = 0) -> None:
    """A small real image file (format from the suffix); size is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def make_folder(root: Path, per_class: int = 2) -> Path:
    """An ImageFolder: train and val, classes a and b, `per_class` JPEGs each."""
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(per_class):
                save(root / split / cls / f"{i}.jpg", seed=i)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)


def test_out_that_holds_the_imagefolder_is_refused_and_every_image_survives(tmp_path):
    data = tmp_path / "DATA"
    images = make_folder(data / "imgs")
    (data / "labels").mkdir()
    before = snapshot(data)
    result = run("-m", "shards.build", "--imagefolder", str(images), "--out", str(data), "--overwrite")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --out {data}: is, holds or sits inside --imagefolder {images};")
    for out in (images, images / "train" / "shards"):
        with pytest.raises(UserError, match=f"--out {out}: is, holds or sits inside --imagefolder"):
            build(images, out, per_shard=4, seed=0, overwrite=True)
    assert snapshot(data) == before


def test_foreign_folder_is_refused_even_with_overwrite(tmp_path, capsys):
    images = make_folder(tmp_path / "imgs")
    out = tmp_path / "mine"
    save(out / "holiday.jpg")
    (out / "notes.txt").write_text("mine\n")
    (out / "train-000000.tar").write_bytes(b"my own tar, not a shard")
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--imagefolder", str(images), "--out", str(out), "--overwrite"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: not empty and not a shard folder tokenlabel wrote (no manifest.json); "
                   "--overwrite replaces only tokenlabel's own output: choose a new or empty --out"]
    with pytest.raises(UserError, match="not a shard folder tokenlabel wrote"):
        build_demo(out, train=4, val=2, overwrite=True)
    assert snapshot(out) == before


def test_rebuild_over_our_own_build_keeps_labels_and_other_files(tmp_path):
    images = make_folder(tmp_path / "imgs", per_class=3)
    out = tmp_path / "shards"
    build(images, out, per_shard=1, seed=0, overwrite=False)
    assert len(load_manifest(out).shards("train")) == 6
    (out / "labels" / "fan.zarr").mkdir(parents=True)
    (out / "labels" / "fan.zarr" / "zarr.json").write_text("{}\n")
    (out / "README.txt").write_text("notes beside the shards\n")
    (out / "val-000000.tar.partial").write_bytes(b"left by an older build")
    with pytest.raises(UserError, match="output folder is not empty; pass --overwrite"):
        build(images, out, per_shard=1, seed=0, overwrite=False)
    build(images, out, per_shard=4, seed=0, overwrite=True)
    manifest = load_manifest(out)
    assert [name for name, _ in manifest.shards("train")] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "labels", "manifest.json", "train-000000.tar",
                                                     "train-000001.tar", "val-000000.tar", "val-000001.tar"]
    assert (out / "labels" / "fan.zarr" / "zarr.json").read_text() == "{}\n"
    build_demo(out, train=4, val=2, per_shard=2, overwrite=True)  # the demo over a build of ours, the same rules
    assert (out / "README.txt").is_file() and (out / "labels" / "fan.zarr" / "zarr.json").is_file()
    assert load_manifest(out).count("train") == 4 and not (out / "train-000002.tar").exists()


def test_an_interrupted_build_is_ours_and_is_redone(tmp_path):
    images = make_folder(tmp_path / "imgs", per_class=3)
    broken = images / "train" / "b" / "2.jpg"
    broken.write_text("not an image\n")
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=f"{broken}: not a decodable image"):
        build(images, out, per_shard=1, seed=None, overwrite=False)  # stops in the middle of the train split
    assert (out / ".tokenlabel.json").is_file() and not (out / "manifest.json").exists()
    assert (out / "train-000000.tar").is_file()
    save(broken)
    build(images, out, per_shard=1, seed=None, overwrite=True)
    assert load_manifest(out).count("train") == 6 and not (out / ".tokenlabel.json").exists()
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_file_names_that_would_not_round_trip_are_refused_by_name(tmp_path):
    images = make_folder(tmp_path / "imgs")
    out = tmp_path / "shards"
    dotted = images / "train" / "a" / "photo.v2.jpg"
    save(dotted)
    with pytest.raises(UserError, match=rf"^{dotted}: key 'a/photo.v2' has a dot in its base name"):
        build(images, out, per_shard=4, seed=0, overwrite=False)
    dotted.unlink()
    backslash = images / "val" / "b" / "x\\y.png"
    save(backslash)
    with pytest.raises(UserError, match=r"key 'b/x\\\\y' contains a backslash"):
        build(images, out, per_shard=4, seed=0, overwrite=False)
    backslash.unlink()
    save(images / "train" / "a" / "0.png")  # beside 0.jpg
    with pytest.raises(UserError) as error:
        build(images, out, per_shard=4, seed=0, overwrite=False)
    assert str(error.value) == (f"{images}/train/a/0.jpg and {images}/train/a/0.png: both make the key 'a/0' "
                                "(a file name without its extension); rename or remove one")
    assert not out.exists()  # refused before anything was written


def test_hidden_files_and_folders_are_not_images(tmp_path):
    images = make_folder(tmp_path / "imgs")
    (images / "train" / "a" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    save(images / "train" / "b" / ".hidden.jpg")
    save(images / "train" / ".ipynb_checkpoints" / "0.jpg")
    out = tmp_path / "shards"
    build(images, out, per_shard=4, seed=None, overwrite=False)
    assert load_manifest(out).classes == ["a", "b"]
    assert split_keys(out, "train") == ["a/0", "a/1", "b/0", "b/1"]
    assert len(list(ShardReader(out, "train"))) == 4


def test_unreadable_entries_are_named_in_one_line(tmp_path, capsys):
    """Enough images for the pool of worker processes; a folder named like an image, a broken link, and (unless
    the tests run as root, who reads anything) a file without read permission."""
    images = tmp_path / "imgs"
    for split, count in (("train", 70), ("val", 1)):
        for cls in ("a", "b"):
            for i in range(count):
                save(images / split / cls / f"{i}.png", size=(4, 4), seed=i)
    (images / "train" / "a" / "dir.jpg").mkdir()
    (images / "train" / "b" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    bad = [f"{images}/train/a/dir.jpg: cannot be read (Is a directory)",
           f"{images}/train/b/gone.jpg: cannot be read (No such file or directory)"]
    if os.geteuid() != 0:
        locked = images / "train" / "b" / "locked.png"
        save(locked)
        locked.chmod(0)
        bad.append(f"{locked}: cannot be read (Permission denied)")
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--imagefolder", str(images), "--out", out, "--no-shuffle"])
    assert exit_info.value.code == 2  # not a worker's traceback
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last == f"error: {bad[0]}; remove or replace it, or pass --on-error skip to leave it out"
    build_main(["--imagefolder", str(images), "--out", out, "--on-error", "skip", "--overwrite"])
    report = capsys.readouterr().out
    assert all(line in report for line in bad) and f"skipped {len(bad)} undecodable" in report
    assert load_manifest(out).count("train") == 140


def mask_folder(root: Path, masks: dict[str, tuple[str, tuple[int, int], int]]) -> Path:
    """An ImageFolder of 8x6 PNGs (classes a, b) with a mask beside each image named in `masks`:
    {image path under root: (mode, size, value)}."""
    make_folder(root)
    for image, (mode, size, value) in masks.items():
        mask = Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).convert(mode)
        mask.save(root / image.replace(".jpg", ".mask.png"))
    return root


@pytest.mark.parametrize("mode, size, value, problem", [
    ("RGB", (8, 6), 1, "mask is mode RGB, not P or L (one class + 1 per pixel, 0 background)"),
    ("L", (6, 8), 1, "mask is 6x8 but its image 8x6"),
    ("L", (8, 6), 3, "value 3, but a mask holds class + 1 and there are 2 classes"),
])
def test_a_mask_the_evaluation_could_not_read_is_refused_by_name(tmp_path, mode, size, value, problem):
    """An RGB mask used to crash the end-of-epoch evaluation after a whole epoch; now the build refuses it."""
    images = mask_folder(tmp_path / "imgs", {f"{s}/{c}/{i}.jpg": ("L", (8, 6), 1)
                                             for s in ("train", "val") for c in "ab" for i in range(2)})
    mask_folder(images, {"val/b/1.jpg": (mode, size, value)})
    with pytest.raises(UserError) as error:
        build(images, tmp_path / "shards", per_shard=4, seed=0, overwrite=False)
    assert str(error.value).startswith(f"{images}/val/b/1.mask.png: not a usable mask (")
    assert problem in str(error.value)


def test_has_masks_only_when_every_image_has_one(tmp_path, capsys):
    everything = {f"{s}/{c}/{i}.jpg": ("P", (8, 6), 2) for s in ("train", "val") for c in "ab" for i in range(2)}
    full = build(mask_folder(tmp_path / "full", everything), tmp_path / "full-shards", 4, 0, False)
    manifest = load_manifest(tmp_path / "full-shards")
    assert not full and manifest.has_masks and manifest.split("val")["masks"] == 4
    assert all(np.asarray(s["mask"]).max() == 2 for s in ShardReader(tmp_path / "full-shards", "val"))

    val_only = {name: spec for name, spec in everything.items() if name.startswith("val/")}
    build(mask_folder(tmp_path / "some", val_only), tmp_path / "some-shards", 4, 0, False)
    manifest = load_manifest(tmp_path / "some-shards")
    assert not manifest.has_masks  # so no trainer evaluates token labels against masks it does not have
    assert (manifest.split("train")["masks"], manifest.split("val")["masks"]) == (0, 4)
    assert "masks on 4 of 8 images only: the dataset counts as without masks" in capsys.readouterr().out
