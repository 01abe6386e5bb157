"""ReLabel's per-image maps, exactly: whole-image footprints on non-square images, known answers through every
reader (footprint_box, dump.quality, dump.show, the student's token targets), exact round trips, refusals.

The maps encode their cells: the top-1 class of cell (r, c) is its column c, the top-2 class (c + 1) % 15, and the
top-1 score r / 4 (the top-2's 0), so a token's softmax target names the cell it read. The masks paint every
pixel with the class of the cell its centre falls in, counted over the whole image: a reader that took the map
for a centre square would misplace almost every cell.
"""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader

from common.errors import UserError
from common.files import MARKER, read_marker
from core.seeding import seed_all
from dump.lvvit import export_lvvit, import_lvvit
from dump.quality import store_quality
from dump.relabel import export_relabel, import_relabel
from dump.relabel import main as relabel_main
from dump.show import show
from dump.store.reader import open_store
from dump.store.schema import footprint_box, make_footprint
from shards.build import build
from shards.manifest import load_manifest
from shards.reader import split_keys
from train.augment import LabelAwareTransform
from train.data import StudentData, token_label_targets

ROOT = Path(__file__).resolve().parents[1]
K, CELLS = 15, 15  # classes; ReLabel's 15 x 15 grid
SIZES = [(90, 60), (60, 105), (100, 70), (75, 45), (120, 48), (45, 90), (66, 99), (105, 61)]  # (W, H), none square


def cells_at(x: Fraction, size: int) -> set[int]:
    """The cells (0..14) along one axis that a point at x of a whole-image map over `size` px lies in: two on the
    edge between them."""
    u = x * CELLS / size
    return {min(math.floor(u), CELLS - 1), max(math.ceil(u) - 1, 0)}


def cell_target(r: int, c: int) -> torch.Tensor:
    """The softmax target of cell (r, c) of `relabel_map` over K classes, without smoothing."""
    target = torch.zeros(K)
    target[c] = 1 / (1 + math.exp(-r / 4))  # softmax of (r / 4, 0)
    target[(c + 1) % K] = 1 - target[c]
    return target


def relabel_map(dtype: torch.dtype) -> torch.Tensor:
    """[2, 2, 15, 15]: scores (r / 4, 0), then class ids (c, (c + 1) % 15), as one ReLabel file of `dtype`."""
    r, c = np.mgrid[:CELLS, :CELLS].astype(np.float64)
    return torch.from_numpy(np.stack([np.stack([r / 4, np.zeros_like(r)]), np.stack([c, (c + 1) % K])])).to(dtype)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[int, int]]]:
    """(shards, a ReLabel folder: float32 files in even rows, float16 in odd ones, {key: (W, H)}): real PNGs with
    column masks, built by shards.build into 2 tar shards of 4."""
    tmp = tmp_path_factory.mktemp("relabel")
    rng = np.random.default_rng(0)
    sizes = {}
    for i, (w, h) in enumerate(SIZES):
        cls = 2 * i % K
        folder = tmp / "images" / "train" / f"c{cls:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        columns = [math.floor((x + 0.5) * CELLS / w) for x in range(w)]  # the cell of the pixel's centre
        Image.fromarray(np.tile(np.array(columns, np.uint8) + 1, (h, 1)), mode="L").save(folder / f"img{i}.mask.png")
        sizes[f"c{cls:02d}/img{i}"] = (w, h)
    for cls in range(K):  # every class folder, the empty ones too: K = 15 classes
        (tmp / "images" / "train" / f"c{cls:02d}").mkdir(parents=True, exist_ok=True)
    root = tmp / "shards"
    build(tmp / "images", root, per_shard=4, seed=0, overwrite=False)
    files = tmp / "label_top5"
    for row, key in enumerate(split_keys(root, "train")):
        (files / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(relabel_map(torch.float32 if row % 2 == 0 else torch.float16), files / f"{key}.pt")
    return root, files, sizes


@pytest.fixture(scope="module")
def store(dataset) -> Path:
    root, files, _ = dataset
    path = root / "labels" / "relabel.zarr"
    relabel_main(["import", str(files), str(path), "--shards", str(root)])
    return path


def test_the_store_records_a_whole_image_footprint_that_quality_and_show_follow(dataset, store, tmp_path):
    root, _, sizes = dataset
    opened = open_store(store)
    assert load_manifest(root).num_classes == K and opened.grid == (CELLS, CELLS)
    footprint = opened.attrs["footprint"]
    assert footprint == make_footprint(475, crop="whole") and footprint["crop"] == "whole"
    assert footprint["resize"] == "the whole image to input_size x input_size, aspect ratio not kept"
    assert "crop_pct" not in footprint and opened.attrs["labeler"]["model"] == "unknown (ReLabel files)"
    for w, h in sizes.values():
        assert footprint_box(footprint, w, h) == (0, 0, w, h)  # a cell: w / 15 x h / 15 px
    # every cell's top-1 is the class its pixels are painted with, over the whole non-square image
    report = store_quality(store)
    assert report["label_target_acc"] == report["label_other_acc"] == 100.0
    assert report["label_cells"] == {"target": CELLS * len(SIZES), "other": (K - 1) * CELLS * len(SIZES),
                                     "background": 0}
    # the picture lays the 15 x 15 cells over the whole image, with no footprint outline
    key, (w, h) = "c02/img1", sizes["c02/img1"]  # 60 x 105: cells of 4 x 7 px
    figure = show(store, key, tmp_path / "show.png")
    assert (tmp_path / "show.png").stat().st_size > 0
    image_panel, top1_panel, confidence_panel = figure.axes[:3]
    assert not image_panel.patches
    for panel in (top1_panel, confidence_panel):
        cells = panel.images[-1]
        assert cells.get_array().shape == (CELLS, CELLS) and list(cells.get_extent()) == [0, w, h, 0]
    np.testing.assert_array_equal(top1_panel.images[-1].get_array(), np.tile(np.arange(CELLS), (CELLS, 1)))


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_token_targets_name_the_cell_each_token_centre_falls_in(dataset, store, augment_on):
    """RandomResizedCrop (aspect ratios 1/2..2) and flips through StudentData: each token's target is the stored
    cell under its centre, found from the crop and flip the sample's seed draws and the image's own size."""
    root, _, sizes = dataset
    size, grid, seed, scale, ratio = 48, 6, 3, (0.2, 1.0), (0.5, 2.0)
    transform = LabelAwareTransform(size, scale=scale, ratio=ratio, hflip=0.5, auto_augment=None, color_jitter=None,
                                    re_prob=0.0)
    data = StudentData(root, store, transform, seed=seed, augment_on=augment_on)
    keys = split_keys(root, "train")
    flips, checked = set(), 0
    for epoch in (0, 1):
        data.set_epoch(epoch)
        loader = DataLoader(data, batch_size=len(keys), collate_fn=data.collate)
        batch = next(iter(data.device_stage("cpu").batches(loader) if augment_on == "device" else loader))
        targets, valid, _ = token_label_targets(batch, K, size, (grid, grid), kind="softmax", smoothing=0.0, points=1)
        assert valid.all()  # every crop lies inside the image, which the map covers whole
        for b, row in enumerate(batch["index"].tolist()):
            w, h = sizes[keys[row]]
            seed_all(seed, epoch, row, cuda=False)  # the sample's seed (core.data.SeededTransform): its draws
            top, left, crop_h, crop_w = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (w, h)), scale,
                                                                                     ratio)
            flip = random.random() < 0.5
            flips.add(flip)
            for i in range(grid):
                for j in range(grid):
                    # exactly, in fractions; a centre on a cell edge (the float32 mapping may put it on either
                    # side) may read either cell
                    x_out, y_out = Fraction(2 * j + 1, 2 * grid) * size, Fraction(2 * i + 1, 2 * grid) * size
                    x = left + ((size - x_out) if flip else x_out) * Fraction(crop_w, size)
                    y = top + y_out * Fraction(crop_h, size)
                    rows, cols = (cells_at(y, h), cells_at(x, w))
                    target = targets[b, :, i, j]
                    assert any(torch.allclose(target, cell_target(r, c), atol=1e-4, rtol=0)
                               for r in rows for c in cols), (row, i, j, target)
                    checked += 1
    assert flips == {False, True} and checked == 2 * len(keys) * grid * grid


def test_export_gives_back_the_same_maps(dataset, store, tmp_path, capsys):
    root, files, _ = dataset
    out = tmp_path / "exported"
    relabel_main(["export", str(store), str(out)])
    assert f"wrote {len(SIZES)} files" in capsys.readouterr().out
    marker = read_marker(out)
    assert marker["kind"] == "relabel-export" and marker["dtype"] == "float16"
    names = sorted(p.relative_to(files) for p in files.rglob("*.pt"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.pt")) == names
    dtypes = set()
    for name in names:
        original, back = torch.load(files / name), torch.load(out / name)
        dtypes.add(original.dtype)
        assert back.dtype == torch.float16 and back.shape == (2, 2, CELLS, CELLS)
        if original.dtype == torch.float16:  # bit for bit
            np.testing.assert_array_equal(original.numpy().view(np.uint16), back.numpy().view(np.uint16))
        else:  # value for value: float32 values exact in float16
            assert torch.equal(back.float(), original)
    assert dtypes == {torch.float16, torch.float32}
    # and back again: the same store rows
    again = import_relabel(out, tmp_path / "again.zarr", root)
    assert again == len(SIZES)
    first, second = (open_store(p).read_rows(0, len(SIZES)) for p in (store, tmp_path / "again.zarr"))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # the other layout is refused, either way: its files would say other pixels
    with pytest.raises(UserError, match=r"its maps cover footprint crop whole, LV-ViT's files crop center, crop_pct "
                                        r"1.0: as LV-ViT files they would label other pixels; export it with "
                                        r"`python -m dump.relabel export`$"):
        export_lvvit(store, tmp_path / "lvvit")
    lvvit_store = tmp_path / "centre.zarr"
    import_lvvit(out, lvvit_store, root)  # the float16 export, read as LV-ViT files
    with pytest.raises(UserError, match=r"crop center, crop_pct 1.0, ReLabel's files crop whole: .*dump.lvvit export"):
        export_relabel(lvvit_store, tmp_path / "relabel")
    import_lvvit(out, tmp_path / "smaller.zarr", root, crop_pct=0.875)  # fits neither layout's files
    with pytest.raises(UserError, match=r"crop center, crop_pct 0.875, LV-ViT's files crop center, crop_pct 1.0: .*"
                                        r"use the Zarr store$"):
        export_lvvit(tmp_path / "smaller.zarr", tmp_path / "lvvit")
    assert not (tmp_path / "lvvit").exists() and not (tmp_path / "relabel").exists()
    # --overwrite replaces only a ReLabel export, not an LV-ViT one
    export_lvvit(lvvit_store, tmp_path / "lvvit")
    with pytest.raises(UserError, match=rf"not a tokenlabel export of ReLabel files \(no {MARKER} of kind relabel-export"):
        export_relabel(store, tmp_path / "lvvit", overwrite=True)
    assert export_relabel(store, out, overwrite=True) == (len(SIZES), 0)


def test_float32_scores_are_rounded_to_float16_and_said(dataset, tmp_path, capsys):
    root, files, _ = dataset
    key = split_keys(root, "train")[0]
    folder = shutil.copytree(files, tmp_path / "files")
    t = relabel_map(torch.float32)
    t[0, 0, 14, 0] = 3.5003  # between two float16 values, 3.5 and 3.501953125: nearer the first
    torch.save(t, folder / f"{key}.pt")
    import_relabel(folder, tmp_path / "rounded.zarr", root)
    assert f"float32 scores rounded to the store's float16, by at most 0.0003 (in {folder / key}.pt)" in \
        capsys.readouterr().err
    assert open_store(tmp_path / "rounded.zarr").read_rows(0, 1)[0][0, 0, 14, 0] == np.float16(3.5)
    t[0, 0, 0, 0] = 7e4  # beyond float16
    torch.save(t, folder / f"{key}.pt")
    with pytest.raises(UserError, match=r"score 70000 is beyond float16's range"):
        import_relabel(folder, tmp_path / "overflow.zarr", root)


class Touch:
    """Pickles as a call of os.system: loading it with weights_only=False touches `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_bad_files_are_refused_in_one_line(dataset, tmp_path):
    root, files, _ = dataset
    keys = split_keys(root, "train")
    bad = shutil.copytree(files, tmp_path / "bad")
    target = bad / f"{keys[5]}.pt"

    def refused(tensor, message: str) -> None:
        torch.save(tensor, target)
        with pytest.raises(UserError) as error:
            import_relabel(bad, tmp_path / "store.zarr", root)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
        assert not (tmp_path / "store.zarr").exists()

    fractional = relabel_map(torch.float32)
    fractional[1, 0, 3, 4] = 2.5
    refused(fractional, f"{target}: class id 2.5 is not an integer")
    refused(relabel_map(torch.float32)[:, :, 0], f"{target}: holds float32[2, 2, 15], expected ReLabel's float16 "
                                                 "or float32 [2, k, H, W]")
    refused(relabel_map(torch.float32)[:, :, :14, :14], f"{target}: shape [2, 2, 14, 14] differs from the first")
    refused(relabel_map(torch.float64), f"{target}: holds float64[2, 2, 15, 15]")
    # a pickle that would run code: through the real command, nothing runs
    torch.save({"maps": relabel_map(torch.float16), "hook": Touch(tmp_path / "ran")}, target)
    run = subprocess.run([sys.executable, "-m", "dump.relabel", "import", str(bad), str(tmp_path / "store.zarr"),
                          "--shards", str(root)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 2 and err.count("\n") == 0 and err.startswith(f"error: {target}: loading it would run "
                                                                           "code (it imports posix.system)"), err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "store.zarr").exists()


def test_export_keeps_float32_where_float16_would_round_class_ids(dataset, tmp_path):
    """With K = 3000 classes, ids above 2048 have no exact float16: float32 files are read and written, exact."""
    root, _, _ = dataset
    wide = shutil.copytree(root, tmp_path / "wide", ignore=shutil.ignore_patterns("labels"))
    doc = json.loads((wide / "manifest.json").read_text())
    doc["classes"] = [f"c{i:02d}" if i < K else f"x{i}" for i in range(3000)]
    (wide / "manifest.json").write_text(json.dumps(doc))
    files = tmp_path / "files"
    for key in split_keys(wide, "train"):
        t = relabel_map(torch.float32)
        t[1, 0] += 2049  # top-1 ids 2049..2063: past float16's exact integers
        (files / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(t, files / f"{key}.pt")
    import_relabel(files, tmp_path / "wide.zarr", wide)
    export_relabel(tmp_path / "wide.zarr", tmp_path / "out")
    assert read_marker(tmp_path / "out")["dtype"] == "float32"
    for key in split_keys(wide, "train"):
        assert torch.equal(torch.load(tmp_path / "out" / f"{key}.pt"), torch.load(files / f"{key}.pt"))


def test_a_whole_image_footprint_has_no_crop():
    assert footprint_box(make_footprint(475, crop="whole"), 90, 60) == (0, 0, 90, 60)
    with pytest.raises(UserError, match=r"crop_pct 0.875: a whole-image footprint has no crop"):
        make_footprint(475, 0.875, crop="whole")
    with pytest.raises(UserError, match=r"footprint crop 'full' is unknown; use one of center, whole"):
        make_footprint(475, crop="full")
    with pytest.raises(UserError, match=r"unknown footprint crop 'full'; this store needs a newer tokenlabel"):
        footprint_box({"crop": "full"}, 90, 60)
