"""shards.build decodes every image while building: a file that is not an image is refused by name, or skipped."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import main as build_main
from shards.manifest import load_manifest
from shards.reader import split_keys


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """train: 2 classes x 3 JPEGs, one of them text with a .jpg name; a corrupt mask beside another; val: 2."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, count in (("train", 3), ("val", 1)):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / split / name / f"{i}.jpg")
    (root / "train" / "bee" / "1.jpg").write_text("not an image, despite its name\n")
    (root / "train" / "ant" / "2.mask.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_an_undecodable_image_is_refused_by_name(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--imagefolder", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {folder}/train/") and "not a decodable image" in err and "--on-error skip" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_leaves_bad_files_out_and_reports_them(folder, tmp_path, capsys):
    out = tmp_path / "out"
    build_main(["--imagefolder", str(folder), "--out", str(out), "--on-error", "skip", "--no-shuffle"])
    report = capsys.readouterr().out
    assert "train 4 images" in report and "skipped 2 undecodable file(s)" in report
    assert f"{folder}/train/ant/2.mask.png" in report and f"{folder}/train/bee/1.jpg" in report
    manifest = load_manifest(out)
    assert manifest.count("train") == 4 and manifest.count("val") == 2
    assert split_keys(out, "train") == ["ant/0", "ant/1", "bee/0", "bee/2"]
    with tarfile.open(out / manifest.shards("train")[0][0]) as tar:
        assert "bee/1.jpg" not in tar.getnames()
