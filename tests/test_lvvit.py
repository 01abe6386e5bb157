"""LV-ViT per-image `.pt` interop: exact round trips both ways, missing files, and the float16 id limit."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from common.errors import UserError
from dump.lvvit import export_lvvit, import_lvvit
from dump.lvvit import main as lvvit_main
from dump.store.reader import open_store
from dump.store.schema import make_footprint
from dump.store.write import mark_complete
from dump.verify import verify_store
from shards.manifest import load_manifest
from shards.reader import split_keys

K, H, W = 5, 4, 4


def lvvit_tensor(rng: np.random.Generator, num_classes: int) -> torch.Tensor:
    """What generate_label.py saves: float16 [2, k, H, W], top-k logits (descending) then their ids."""
    scores = -np.sort(-rng.normal(size=(K, H, W)) * 4, axis=0)
    ids = np.argsort(rng.random((num_classes, H, W)), axis=0)[:K]
    return torch.from_numpy(np.stack([scores, ids]).astype(np.float16))


def write_lvvit_dir(root: Path, keys: list[str], num_classes: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(lvvit_tensor(rng, num_classes), root / f"{key}.pt")
    return root


@pytest.fixture
def lvvit_dir(demo_shards, tmp_path):
    return write_lvvit_dir(tmp_path / "label_top5", split_keys(demo_shards, "train"))


def bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint16)


def test_round_trip_is_exact_both_ways(lvvit_dir, demo_shards, tmp_path, capsys):
    # files -> store -> files
    store_path = tmp_path / "imported.zarr"
    lvvit_main(["import", str(lvvit_dir), str(store_path), "--shards", str(demo_shards), "--input-size", "64"])
    assert "20 rows imported" in capsys.readouterr().out
    store = open_store(store_path)
    assert store.attrs["complete"] and store.attrs["footprint"] == make_footprint(64)
    assert store.keys.tolist() == split_keys(demo_shards, "train")
    assert verify_store(store_path, demo_shards)[0] == []
    lvvit_main(["export", str(store_path), str(tmp_path / "exported")])
    originals = sorted(p.relative_to(lvvit_dir) for p in lvvit_dir.rglob("*.pt"))
    assert sorted(p.relative_to(tmp_path / "exported") for p in (tmp_path / "exported").rglob("*.pt")) == originals
    for name in originals:
        a, b = torch.load(lvvit_dir / name), torch.load(tmp_path / "exported" / name)
        assert b.dtype == torch.float16 and b.shape == (2, K, H, W)
        np.testing.assert_array_equal(bits(a), bits(b))
    # store -> files -> store
    import_lvvit(tmp_path / "exported", tmp_path / "again.zarr", demo_shards, input_size=64)
    first, again = zarr.open_group(store_path, mode="r"), zarr.open_group(tmp_path / "again.zarr", mode="r")
    for name in ("scores", "classes", "keys", "valid", "done"):
        x, y = first[name][:], again[name][:]
        np.testing.assert_array_equal(x.view(np.uint16) if x.dtype == np.float16 else x,
                                      y.view(np.uint16) if y.dtype == np.float16 else y)


def test_import_needs_a_file_for_every_key(lvvit_dir, demo_shards, tmp_path):
    keys = split_keys(demo_shards, "train")
    (lvvit_dir / f"{keys[3]}.pt").unlink()
    (lvvit_dir / f"{keys[11]}.pt").unlink()
    with pytest.raises(UserError, match=rf"2 of 20 keys of split 'train' have no \.pt file \(e\.g\. {keys[3]}, {keys[11]}\)"):
        import_lvvit(lvvit_dir, tmp_path / "store.zarr", demo_shards)
    assert not (tmp_path / "store.zarr").exists()


def test_import_refuses_files_that_fail_verification(lvvit_dir, demo_shards, tmp_path):
    key = split_keys(demo_shards, "train")[5]
    t = torch.load(lvvit_dir / f"{key}.pt")
    t[0, [0, 1]] = t[0, [1, 0]]  # scores no longer descending
    torch.save(t, lvvit_dir / f"{key}.pt")
    with pytest.raises(UserError, match=r"fail verification: .*scores not descending along k, first row 5"):
        import_lvvit(lvvit_dir, tmp_path / "store.zarr", demo_shards)
    assert not (tmp_path / "store.zarr").exists() and not list(tmp_path.glob("store.zarr.partial-*"))


@pytest.fixture
def many_classes(demo_shards, tmp_path):
    """The demo shards with a manifest claiming 3000 classes: more than float16 ids can hold exactly."""
    root = shutil.copytree(demo_shards, tmp_path / "wide", ignore=shutil.ignore_patterns("labels"))
    doc = json.loads((root / "manifest.json").read_text())
    doc["classes"] = [f"c{i}" for i in range(3000)]
    (root / "manifest.json").write_text(json.dumps(doc))
    return root


def test_float16_class_ids_above_2048_are_refused(many_classes, tmp_path, make_store):
    keys = split_keys(many_classes, "train")
    files = write_lvvit_dir(tmp_path / "files", keys, num_classes=2049)  # ids up to 2048: exact in float16
    import_lvvit(files, tmp_path / "ok.zarr", many_classes)
    assert open_store(tmp_path / "ok.zarr").group["classes"][:].max() == 2048
    t = torch.load(files / f"{keys[2]}.pt")
    t[1, 0, 0, 0] = 2050  # a representable float16 that may stand for 2049 or 2051 rounded by the producer
    torch.save(t, files / f"{keys[2]}.pt")
    with pytest.raises(UserError, match=r"class id 2050 > 2048 cannot be exact in LV-ViT's float16 layout"):
        import_lvvit(files, tmp_path / "bad.zarr", many_classes)
    # export: a store holding id 2049 cannot be written as LV-ViT files without rounding it
    n = len(keys)
    maps = np.zeros((n, 1, 1, 1)), np.full((n, 1, 1, 1), 2049)
    make_store(tmp_path / "wide.zarr", load_manifest(many_classes), *maps, keys, num_classes=3000)
    with pytest.raises(UserError, match=r"row 0 .*class id 2049 > 2048 cannot be exact"):
        export_lvvit(tmp_path / "wide.zarr", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_leaves_out_skipped_rows(lvvit_dir, demo_shards, tmp_path):
    import_lvvit(lvvit_dir, tmp_path / "store.zarr", demo_shards)
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    group["valid"][7], group["scores"][7], group["classes"][7] = 0, np.nan, -1
    mark_complete(group)
    assert export_lvvit(tmp_path / "store.zarr", tmp_path / "out") == (19, 1)
    key = split_keys(demo_shards, "train")[7]
    assert not (tmp_path / "out" / f"{key}.pt").exists() and len(list((tmp_path / "out").rglob("*.pt"))) == 19
