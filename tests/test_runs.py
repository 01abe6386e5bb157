"""A training run keeps its folder and its history safe: one trainer per run folder (a lock; the folder marked as a
run), a torn metrics line from a crash does not block the resumption, and a run resumes only on its own data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from common.files import read_marker
from core.checkpoint import read_checkpoint
from dump.lvvit import import_lvvit
from labeler.train import main as labeler_main
from shards.demo import build_demo
from train.student import main as student_main

ROOT = Path(__file__).resolve().parents[1]


def student(labels: Path, out: Path, *flags: str) -> list[str]:
    """A student of one step an epoch (batch 8), no workers, a clean final evaluation."""
    return ["--labels", str(labels), "--model", "fan_demo_tiny_p8", "--out", str(out), "--batch-size", "8",
            "--lr", "1e-3", "--workers", "0", "--max-steps", "1", "--final-corruptions", "none", *flags]


def epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys, call) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        call()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(dataset, tmp_path, capsys):
    _, store = dataset
    out = tmp_path / "run"
    args = student(store, out, "--epochs", "3")
    student_main([*args, "--stop-after", "1"])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "top1": 12.')  # the disk filled up (or the machine died) in the middle of the line
    capsys.readouterr()
    student_main([*args, "--stop-after", "2"])
    assert "dropped its torn last line" in capsys.readouterr().err
    assert epochs(out) == [1, 2]
    first, second = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(f"{first[:20]}\n{second}\n")  # a line damaged in the middle stays an error
    line = one_error_line(capsys, lambda: student_main(args))
    assert f"{out / 'metrics.jsonl'}: line 1 is not an epoch record" in line


def test_a_second_trainer_on_the_same_run_folder_is_refused(dataset, tmp_path, capsys):
    """A re-run while the first trainer still writes the folder (a killed pipeline's child): refused in one line
    naming the owner; after a kill -9 of the owner the lock is free again and the run resumes."""
    _, store = dataset
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "train.student", *student(store, out, "--epochs", "1000")]
    first = subprocess.Popen(cli, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists():  # it holds the lock and has written an epoch
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.1)
        second = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert lines[0].startswith(f"error: {out}: another trainer is writing this run folder (pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert read_marker(out)["kind"] == "run"  # made by a trainer: a pipeline may clear it
    done = read_checkpoint(out / "last.pt")["train_state"]["epoch"]
    capsys.readouterr()
    student_main(student(store, out, "--epochs", "1000", "--stop-after", str(done + 1)))
    assert f"resumed from {out / 'last.pt'} after epoch {done}" in capsys.readouterr().err
    assert not list(out.glob("last.pt.partial*"))


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two demo datasets of the same classes and sizes with other images (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("two")
    for seed in (0, 1):
        build_demo(root / f"seed{seed}", train=16, val=8, per_shard=8, seed=seed)
    return root / "seed0", root / "seed1"


def test_a_labeler_resumes_only_on_the_images_it_was_trained_on(two_datasets, tmp_path, capsys):
    mine, other = two_datasets
    out = tmp_path / "run"

    def train(shards: Path, *flags: str) -> None:
        labeler_main(["--shards", str(shards), "--model", "fan_demo_tiny_p8", "--epochs", "3", "--batch-size", "8",
                      "--max-steps", "1", "--workers", "0", "--out", str(out), *flags])

    train(mine, "--stop-after", "1")
    line = one_error_line(capsys, lambda: train(other))
    assert "trained on train images sha256:" in line and f"({mine}), this run has sha256:" in line
    assert f"({other}); resume on the data it was trained on" in line
    moved = tmp_path / "moved"
    shutil.copytree(mine, moved)  # the same images elsewhere: the same data
    train(moved, "--stop-after", "2")
    assert epochs(out) == [1, 2]


def test_a_student_resumes_only_on_the_store_it_was_trained_on(dataset, tmp_path, capsys):
    root, store = dataset
    mine = Path(shutil.copytree(store, tmp_path / "mine.zarr"))
    other = tmp_path / "other.zarr"  # the same files imported again: another store
    import_lvvit(root.parent / f"{root.name}-lvvit", other, root, input_size=64)
    out = tmp_path / "run"
    student_main(student(mine, out, "--epochs", "2", "--stop-after", "1"))
    line = one_error_line(capsys, lambda: student_main(student(other, out, "--epochs", "2")))
    assert f"trained on label store {zarr.open_group(mine).attrs['dump_id'][:24]}... ({mine}), this run has" in line
    assert f"({other}); resume on the data it was trained on" in line
