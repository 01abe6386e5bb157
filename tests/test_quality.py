"""The label-quality report: per-cell truth from masks, the rates, and whole stores whose right answer is known.

A store that repeats the image class everywhere must score 0 on other objects' cells; a store that says what
each cell shows must score 100; both are written here as real Zarr stores over real tar shards.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from core.label_quality import BACKGROUND, MIXED, LabelQuality, cell_truth, top1_confidence
from dump.quality import main as quality_main
from dump.quality import store_quality
from dump.store.schema import footprint_box, make_footprint
from shards.build import build
from shards.manifest import load_manifest
from shards.reader import read_shard


def test_cell_truth_majority_background_and_mixed():
    """A 4x4 mask over a 2x2 map: one cell all class 3, one 3/4 class 1, one background, one 1/4 object."""
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 4          # cell (0, 0): all object, class 3
    mask[:2, 2:] = [[2, 2], [2, 0]]  # cell (0, 1): 3 of 4 pixels class 1
    mask[3, 3] = 5            # cell (1, 1): 1 of 4 pixels an object: not scored
    assert cell_truth(mask, (0, 0, 4, 4), (2, 2)).tolist() == [3, 1, BACKGROUND, MIXED]


def test_cell_truth_follows_the_footprint_box():
    """A box over the right half of a 4x8 image: the map's cells are that half's pixels only."""
    mask = np.zeros((4, 8), np.uint8)
    mask[:, :4] = 7  # left half: an object outside the footprint
    mask[:2, 6:] = 2
    assert cell_truth(mask, (4, 0, 8, 4), (2, 2)).tolist() == [BACKGROUND, 1, BACKGROUND, BACKGROUND]
    # a box reaching beyond the image: cells without pixels are not scored
    assert cell_truth(mask, (6, 0, 10, 4), (1, 2)).tolist() == [MIXED, MIXED]


def test_rates_on_counts_whose_answer_is_known():
    truth = torch.tensor([[2, 2, 5, BACKGROUND, BACKGROUND, MIXED]])  # image class 2; a 5 is another object
    predicted = torch.tensor([[2, 7, 5, 2, 9, 2]])
    confidence = torch.tensor([[0.9, 0.5, 0.7, 0.2, 0.4, 1.0]])
    quality = LabelQuality.measure(predicted, confidence, truth, torch.tensor([2]))
    rates = (quality + LabelQuality.zeros()).rates()
    assert rates["label_target_acc"] == 50.0 and rates["label_other_acc"] == 100.0
    assert rates["label_background_image_class"] == 50.0
    assert rates["label_object_confidence"] == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert rates["label_background_confidence"] == pytest.approx(0.3)
    assert rates["label_cells"] == {"target": 2, "other": 1, "background": 2}


def test_confidence_is_over_the_top_k_as_a_store_keeps_them():
    logits = torch.tensor([[3.0, 1.0, 0.0, -20.0]])
    cls, conf = top1_confidence(logits, k=2)
    assert cls.item() == 0 and conf.item() == pytest.approx(np.exp(3) / (np.exp(3) + np.exp(1)))


@pytest.fixture
def write_store(make_store):
    """make(path, shards, cell_label): a complete store over the train split whose top-1 per cell is
    cell_label(sample, truth) (confidence 0.9)."""
    def make(path, shards, cell_label):
        manifest = load_manifest(shards)
        grid = (8, 8)
        scores = np.zeros((manifest.count("train"), 2, *grid), np.float16)
        classes = np.zeros(scores.shape, np.int16)
        keys = []
        for name, _ in manifest.shards("train"):
            for sample in read_shard(shards, "train", name):
                truth = cell_truth(np.asarray(sample["mask"]), footprint_box(make_footprint(64), 64, 64), grid)
                top = np.asarray(cell_label(sample, truth)).reshape(grid)
                row = sample["index"]
                classes[row, 0], classes[row, 1] = top, (top + 1) % 10
                scores[row, 0], scores[row, 1] = np.log(9.0), 0.0  # softmax over the two: 0.9 / 0.1
                keys.append(sample["key"])
        make_store(path, manifest, scores, classes, keys)
        return path

    return make


def test_a_store_that_repeats_the_image_class_scores_zero_on_other_objects(demo_shards, tmp_path, write_store):
    store = write_store(tmp_path / "broadcast.zarr", demo_shards, lambda s, truth: np.full(64, s["cls"]))
    report = store_quality(store, demo_shards)
    assert report["label_cells"]["other"] > 0 and report["label_cells"]["target"] > 0
    assert report["label_target_acc"] == 100.0 and report["label_other_acc"] == 0.0
    assert report["label_background_image_class"] == 100.0
    assert report["label_object_confidence"] == pytest.approx(0.9, abs=1e-3)


def test_a_store_that_names_what_each_cell_shows_scores_full_marks(demo_shards, tmp_path, write_store, capsys):
    def oracle(sample, truth):
        return np.where(truth >= 0, truth, (sample["cls"] + 1) % 10)  # background: never the image class

    store = write_store(tmp_path / "oracle.zarr", demo_shards, oracle)
    quality_main([str(store), "--shards", str(demo_shards), "--out", str(tmp_path / "q.json")])
    printed = capsys.readouterr().out
    assert "| other objects: top-1 = their own class |" in printed and "100.0%" in printed
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["label_target_acc"] == report["label_other_acc"] == 100.0
    assert report["label_background_image_class"] == 0.0


def test_quality_needs_masks(demo_shards, tmp_path, write_store):
    for split in ("train", "val"):
        (tmp_path / "f" / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "f" / split / "a" / "x.png")
    build(tmp_path / "f", tmp_path / "nomask", per_shard=4, seed=0, overwrite=False)
    store = write_store(tmp_path / "s.zarr", demo_shards, lambda s, truth: np.full(64, s["cls"]))
    with pytest.raises(UserError, match="has no masks"):
        store_quality(store, tmp_path / "nomask")
