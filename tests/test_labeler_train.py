"""FAN-TL training: the loss goes down, a resumed run is bitwise an uninterrupted one, bad input is one line."""

import json

import pytest
import torch

from labeler.metrics import TokenCounts, mask_token_targets, token_accuracy
from labeler.train import main
from shards.demo import build_demo

FAST = ["--model", "fan_demo_tiny_p8", "--batch-size", "16", "--lr", "1e-3", "--warmup-epochs", "1",
        "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(root, train=64, val=32, per_shard=32)
    return root


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """Three epochs in one go, with Mixup/CutMix, RandAugment and two loader workers."""
    out = tmp_path_factory.mktemp("straight")
    main(["--shards", str(shards), "--out", str(out), "--epochs", "3", "--workers", "2",
          "--mixup", "0.8", "--cutmix", "1.0", *FAST])
    return out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(shards, tmp_path):
    main(["--shards", str(shards), "--out", str(tmp_path), "--epochs", "4", "--workers", "0", "--aa", "none",
          "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--crop-scale", "1", *FAST])
    rows = _metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
    for key in ("top1", "top1_pooled", "token_fg_acc", "token_bg_acc", "lr", "time"):
        assert key in rows[-1]


def test_resume_is_bitwise_identical(shards, straight, tmp_path):
    args = ["--shards", str(shards), "--out", str(tmp_path), "--epochs", "3", "--workers", "2",
            "--mixup", "0.8", "--cutmix", "1.0", *FAST]
    main([*args, "--stop-after", "1"])
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1]
    main(args)
    resumed = torch.load(tmp_path / "last.pt", weights_only=False)
    reference = torch.load(straight / "last.pt", weights_only=False)
    assert resumed["train_state"]["epoch"] == reference["train_state"]["epoch"] == 3
    for part in ("state_dict", "ema"):
        assert resumed[part].keys() == reference[part].keys()
        for key, value in reference[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key} differs after resume"
    assert [r["train_loss"] for r in _metrics(tmp_path)] == [r["train_loss"] for r in _metrics(straight)]


def test_checkpoint_of_another_model_is_refused(shards, straight, capsys):
    before = (straight / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", str(shards), "--out", str(straight), "--epochs", "4",
              "--model", "fan_demo_hybrid_p8", "--workers", "0"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "fan_demo_tiny_p8" in message and "fan_demo_hybrid_p8" in message
    assert (straight / "last.pt").read_bytes() == before


def test_wrong_shard_path_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *FAST])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and message.count("\n") == 0 and "missing" in message
    assert not (tmp_path / "run").exists()


def test_mask_token_targets_majority_rule():
    # one 4x4 mask on a 2x2 grid: each token covers a 2x2 block of pixels
    mask = torch.tensor([[[3, 3, 0, 1],
                          [3, 0, 0, 0],
                          [2, 2, 5, 5],
                          [2, 5, 5, 0]]])
    # top-left: 3 of 4 pixels are class 2 (mask value 3); top-right: 1 of 4 -> background;
    # bottom-left: 3 pixels of class 1; bottom-right: 3 pixels of class 4
    assert mask_token_targets(mask, (2, 2), num_classes=5).tolist() == [[2, -1, 1, 4]]


def test_token_accuracy_counts():
    mask = torch.tensor([[[3, 3, 0, 1], [3, 0, 0, 0], [2, 2, 5, 5], [2, 5, 5, 0]]])
    logits = torch.zeros(1, 4, 5)
    predicted = [2, 1, 1, 0]  # right, background labelled as the image class 1, right, wrong
    logits[0, torch.arange(4), torch.tensor(predicted)] = 1.0
    counts = token_accuracy(logits, (2, 2), mask, labels=torch.tensor([1]))
    assert counts == TokenCounts(fg_correct=2, fg_total=3, bg_correct=1, bg_total=1,
                                 distractor_correct=1, distractor_total=2)
    assert (counts + counts).rates() == {"token_fg_acc": 200 / 3, "token_bg_acc": 100.0,
                                         "token_distractor_acc": 50.0}
