"""train.checkpoint_eval: accuracies checked against the model run by hand, corruptions, mCE, the command line."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from corrupt_tta import corrupt

from common.errors import UserError
from core.checkpoint import save_checkpoint
from core.corruptions import mean_corruption_error
from core.engine import evaluate
from core.eval_data import EvalTransform
from core.label_quality import LabelQuality, cell_truth, top1_confidence
from shards.demo import build_demo
from shards.manifest import load_manifest
from shards.reader import ShardReader
from train.checkpoint_eval import check_classes, load_model, main
from train.models import build_student

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: torch on one thread for each test


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """Demo shards with 20 val images (shards of 8, 8 and 4) and a FAN demo student checkpoint. A random FAN's
    features barely vary across images, so both heads are centred on the val set's mean feature: the predictions
    then follow the input, and the class head and the combined score disagree."""
    tmp = tmp_path_factory.mktemp("eval")
    root = tmp / "demo"
    build_demo(root, train=4, val=20, per_shard=8)
    torch.manual_seed(1)
    student = build_student("fan_demo_tiny_p8", 10, 64).eval()
    images = torch.stack([s["image"] for s in ShardReader(root, "val", transform=EvalTransform(64))])
    with torch.no_grad():
        feats = student.model.forward_features(images)
        for head, f in ((student.model.head, feats[:, 0]), (student.model.aux_head, feats[:, 1:].flatten(0, 1))):
            head.bias.copy_(-head.weight @ f.mean(0))
    (tmp / "run").mkdir()
    save_checkpoint(tmp / "run" / "last.pt", model_name="fan_demo_tiny_p8", num_classes=10, img_size=64,
                    model=student, ema=student, kind="student")
    return root, tmp / "run" / "last.pt"


def by_hand(model: torch.nn.Module, root: Path, corruption: str | None = None, severity: int = 0) -> dict:
    """Val images (64 px, so the centre crop is the whole image) normalised here and run through the model."""
    samples = list(ShardReader(root, "val"))
    pixels = []
    for s in samples:
        assert s["image"].size == (64, 64)
        x = np.asarray(s["image"], np.float64)
        if corruption:
            np.random.seed(zlib.crc32(f"{s['key']}/{corruption}/{severity}".encode()))
            x = np.clip(corrupt(np.asarray(s["image"]), severity, corruption), 0, 255).astype(np.uint8)
        pixels.append((x - MEAN) / STD)
    images = torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2)).float()
    labels = torch.tensor([s["cls"] for s in samples])
    with torch.no_grad():
        cls, tokens, grid = model.forward_dense(images)
    truth = torch.from_numpy(np.stack([cell_truth(np.asarray(s["mask"]), (0, 0, 64, 64), grid) for s in samples]))
    combined = cls + 0.5 * tokens.max(dim=1).values
    n = len(samples)
    return {"top1": 100.0 * int((cls.argmax(-1) == labels).sum()) / n,
            "top1_combined": 100.0 * int((combined.argmax(-1) == labels).sum()) / n,
            "disagree": int((cls.argmax(-1) != combined.argmax(-1)).sum()),
            **LabelQuality.measure(*top1_confidence(tokens), truth, labels).rates()}


def test_accuracies_match_the_model_run_by_hand(setup):
    root, ckpt = setup
    model, meta = load_model(ckpt)
    assert meta == {"kind": "student", "model": "fan_demo_tiny_p8", "num_classes": 10, "img_size": 64,
                    "dense_head_trained": True, "classes": None}  # a checkpoint recording no class names
    clean, noisy = by_hand(model, root), by_hand(model, root, "gaussian_noise", 5)
    # preconditions: mixing up the scores or the passes would show
    assert clean["disagree"] > 0 and clean["top1"] != clean["top1_combined"] and clean["top1"] != noisy["top1"]
    for workers in (0, 2):  # batches of 6 straddle the clean and corrupted passes
        results = evaluate(model, root, 64, batch_size=6, workers=workers, corruptions=("gaussian_noise",),
                           severities=(5,))
        for key in ("top1", "top1_combined", "label_target_acc", "label_other_acc", "label_background_image_class",
                    "label_cells"):
            assert results[key] == pytest.approx(clean[key], abs=1e-9), key
        for key in ("label_object_confidence", "label_background_confidence"):  # float32 sums in other orders
            assert results[key] == pytest.approx(clean[key], abs=1e-6), key
        assert results["corrupted"] == {"gaussian_noise/5": pytest.approx(noisy["top1"], abs=1e-9)}
        assert results["corrupt_acc"] == results["corrupted"]["gaussian_noise/5"]
    assert "corrupted" not in evaluate(model, root, 64, batch_size=6, workers=0, corruptions=())


def test_mean_corruption_error_by_hand():
    results = {"corrupted": {"fog/1": 80.0, "fog/3": 60.0, "snow/1": 90.0}}
    baseline = {"corrupted": {"fog/1": 70.0, "fog/3": 50.0, "snow/1": 80.0, "contrast/1": 10.0}}
    # fog: (20 + 40) / (30 + 50) = 0.75, snow: 10 / 20 = 0.5; mean 0.625
    assert mean_corruption_error(results, baseline) == 62.5
    assert mean_corruption_error(baseline, baseline) == 100.0
    with pytest.raises(UserError, match="baseline eval has no result for fog/3"):
        mean_corruption_error(results, {"corrupted": {"fog/1": 70.0, "snow/1": 80.0}})


def test_command_line_writes_eval_json_and_refuses_bad_input(setup, tmp_path, capsys):
    root, ckpt = setup
    common = ["--shards", str(root), "--corruptions", "fog", "--severities", "1", "--workers", "0"]
    main([str(ckpt), *common])
    written = json.loads((ckpt.parent / "eval.json").read_text())
    expected = evaluate(load_model(ckpt)[0], root, 64, workers=0, corruptions=("fog",), severities=(1,))
    assert written == {**expected, "checkpoint": str(ckpt)}

    main([str(ckpt), *common, "--baseline", str(ckpt.parent), "--out", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["mce"] == 100.0 and again["mce_baseline"] == str(ckpt.parent)  # against itself
    vit = build_student("vit_tiny_patch16_224", 10, 64, patch_size=16)
    save_checkpoint(tmp_path / "vit.pt", model_name="vit_tiny_patch16_224", num_classes=10, img_size=64, model=vit,
                    ema=vit, model_kwargs={"patch_size": 16}, kind="student")
    capsys.readouterr()

    for args, message in [
        ([str(ckpt), "--shards", str(root), "--corruptions", "fog", "fgo"], "unknown corruption 'fgo'"),
        ([str(ckpt), "--shards", str(root), "--severities", "6"], "severity 6 is out of range"),
        ([str(ckpt), *common, "--baseline", str(tmp_path / "again.json"), "--severities", "3"],
         "baseline eval has no result for fog/3"),
        ([str(tmp_path / "missing.pt"), "--shards", str(root)], "checkpoint not found"),
        ([str(tmp_path / "vit.pt"), *common, "--img-size", "32"], "was trained at 64 px and its weights do not fit"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and message in err[0], (args, err)


def test_a_checkpoint_recording_its_class_names_refuses_other_shards(setup, tmp_path, capsys):
    """A checkpoint that records its dataset's class names (a field core.checkpoint may write) is evaluated only
    on shards with the same names in the same order: other shards with as many classes are refused in one line."""
    root, ckpt = setup
    recorded = torch.load(ckpt, weights_only=False)
    names = load_manifest(root).classes
    check_classes(ckpt, names, load_manifest(root))
    torch.save({**recorded, "classes": names[::-1]}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "other.pt"), "--shards", str(root), "--corruptions", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert f"other.pt: trained on 10 classes, {root} has 10, and class 0 is '9' there but '0' here" in err[0]
