"""FAN-TL training: the loss goes down, a resumed run is bitwise an uninterrupted one, DDP under torchrun equals one
process, bad input is one line."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import read_checkpoint
from labeler.train import LabelerRun, main, parse_args
from shards.build import write_dataset
from shards.demo import CLASSES, build_demo, demo_samples
from shards.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]

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
    for key in ("top1", "top1_pooled", "label_target_acc", "label_other_acc", "label_background_image_class", "lr",
                "time"):
        assert key in rows[-1]
    assert read_checkpoint(tmp_path / "last.pt")["classes"] == load_manifest(shards).classes  # for checkpoint_eval


def test_resume_is_bitwise_identical(shards, straight, tmp_path):
    args = ["--shards", str(shards), "--out", str(tmp_path), "--epochs", "3", "--workers", "2",
            "--mixup", "0.8", "--cutmix", "1.0", *FAST]
    main([*args, "--stop-after", "1"])
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1]
    main(args)
    resumed, reference = read_checkpoint(tmp_path / "last.pt"), read_checkpoint(straight / "last.pt")  # weights only
    assert resumed["train_state"]["epoch"] == reference["train_state"]["epoch"] == 3
    for part in ("state_dict", "ema"):
        assert resumed[part].keys() == reference[part].keys()
        for key, value in reference[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key} differs after resume"
    assert [r["train_loss"] for r in _metrics(tmp_path)] == [r["train_loss"] for r in _metrics(straight)]


def twin_shards(root: Path) -> Path:
    """Demo shards whose two train shards hold the same 16 images (the second under keys ending in _twin); val: 20."""
    images = list(demo_samples("train", 16, 64, seed=0))
    twins = [dataclasses.replace(s, key=f"{s.key}_twin") for s in images]
    root.mkdir()
    write_dataset(root, CLASSES, {"train": (images + twins, 32), "val": (demo_samples("val", 20, 64, seed=0), 20)},
                  per_shard=16)
    return root


def on_two_ranks(args: list[str]) -> None:
    """labeler.train under torchrun: 2 CPU processes (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "labeler.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_one_shard_trains_a_labeler_on_two_ranks_of_two_workers(tmp_path):
    """One train shard of 32 on 2 ranks x 2 DataLoader workers, batch 8: samples are split within the shard, each
    rank takes its 2 steps and the epoch sees all 32 samples."""
    build_demo(tmp_path / "one", train=32, val=8, per_shard=32)
    on_two_ranks(["--shards", str(tmp_path / "one"), "--out", str(tmp_path / "run"), "--epochs", "1", "--workers", "2",
                  *FAST, "--batch-size", "8"])
    (record,) = _metrics(tmp_path / "run")
    assert (record["world_size"], record["train_samples"]) == (2, 32) and record["train_loss"] > 0
    assert read_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["step"] == 2


def test_ddp_first_step_matches_one_process_on_the_global_batch(tmp_path):
    """torchrun, gloo, 2 CPU processes of batch 16 (one train shard each) vs one process of batch 32: one step.

    FAN normalises with batch statistics (BatchNorm in its stem and in every block's LPI; SyncBatchNorm is
    GPU-only), so the two train shards hold the same images under different keys: each rank's batch then has
    the global batch's statistics. Nothing draws per rank or row (the demo recipe: no augmentation, Mixup,
    CutMix or drop-path), so the mean of the two ranks' losses is the loss of the global batch."""
    root = twin_shards(tmp_path / "twins")
    flags = ["--shards", str(root), "--model", "fan_demo_tiny_p8", "--epochs", "1", "--max-steps", "1",
             "--opt", "sgd", "--lr", "0.1", "--warmup-epochs", "0", "--weight-decay", "0", "--workers", "0"]
    on_two_ranks([*flags, "--batch-size", "16", "--out", str(tmp_path / "ddp")])
    main([*flags, "--batch-size", "32", "--out", str(tmp_path / "one")])

    (ddp,), (one,) = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    for key in ("train_loss", "train_loss_cls", "train_loss_dense"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key
    assert (ddp["world_size"], one["world_size"]) == (2, 1)
    assert ddp["train_samples"] == one["train_samples"] == 32
    assert ddp["top1"] == one["top1"] and ddp["label_other_acc"] == one["label_other_acc"]  # 20 val images, 2 ranks
    initial = LabelerRun(parse_args([*flags, "--batch-size", "32", "--out", str(tmp_path / "init")])).model.state_dict()
    a, b = (read_checkpoint(tmp_path / run / "last.pt")["state_dict"] for run in ("ddp", "one"))
    for key in a:  # SGD: the update is linear in the gradient, so DDP's averaged gradient must match closely
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-6), key
    assert sum(float((a[key].float() - initial[key].float()).abs().sum()) for key in a) > 1.0
    assert not list((tmp_path / "ddp").glob("last.pt.partial*"))


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
