"""Loading a checkpoint never runs code: a crafted pickle is refused by every command that reads one (real
subprocess CLIs), and an older checkpoint needing more than weights is converted only on --trust-code."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from common.errors import UserError
from core.checkpoint import FORMAT, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Touch:
    """Pickles as a call of os.system: loading it with weights_only=False touches `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def crafted(path: Path, touched: Path) -> Path:
    torch.save({"format": FORMAT, "kind": "labeler", "model": "fan_demo_tiny_p8", "train_state": Touch(touched)}, path)
    return path


def command(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_crafted_checkpoint_runs_nothing_through_any_command(dataset, tmp_path):
    root, store = dataset
    student = ["train.student", "--model", "fan_demo_tiny_p8", "--epochs", "1", "--batch-size", "8", "--workers", "0",
               "--final-corruptions", "none"]
    uses = {
        "eval": lambda ckpt: ["train.checkpoint_eval", str(ckpt), "--shards", str(root), "--corruptions"],
        "dump": lambda ckpt: ["dump.dump_labels", "--shards", str(root), "--checkpoint", str(ckpt), "--out",
                              str(tmp_path / "dump.zarr"), "--engine", "local", "--workers", "0"],
        "resume": lambda ckpt: [*student, "--labels", str(store), "--out", str(tmp_path / "resume"), "--resume",
                                str(ckpt)],
        "online": lambda ckpt: [*student, "--labels", str(root), "--out", str(tmp_path / "online"),
                                "--online-labeler", str(ckpt)],
    }
    files = {name: crafted(tmp_path / f"{name}.pt", tmp_path / f"ran-{name}") for name in uses}
    running = {name: command(*use(files[name])) for name, use in uses.items()}  # side by side: imports take seconds
    for name, process in running.items():
        _, err = process.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
        assert "loading it would run code" in lines[0] and not (tmp_path / f"ran-{name}").exists(), (name, lines)
    assert "(it imports posix.system)" in read_refusal(files["eval"])
    torch.load(files["eval"], weights_only=False)  # what loading used to do: the file's code runs
    assert (tmp_path / "ran-eval").exists()


def read_refusal(path: Path) -> str:
    with pytest.raises(UserError) as refused:
        read_checkpoint(path)
    return str(refused.value)


def test_an_older_checkpoint_loads_only_after_a_trusted_conversion(tmp_path):
    """A checkpoint holding a numpy scalar and a Path (what an older writer could leave in its state) needs code
    to load: refused with the way out, converted only with --trust-code, then plain and loadable."""
    import labeler  # noqa: F401  (registers the demo FAN)

    model = timm.create_model("fan_demo_tiny_p8", num_classes=10)
    old = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "kind": "labeler", "model": "fan_demo_tiny_p8", "model_kwargs": {},
                "num_classes": 10, "img_size": 64, "state_dict": model.state_dict(), "ema": model.state_dict(),
                "train_state": {"epoch": 2, "best": np.float64(0.75), "args": {"out": tmp_path / "run"}}}, old)
    refusal = read_refusal(old)
    assert f"python -m core.checkpoint convert {old} NEW.pt --trust-code" in refusal and "numpy" in refusal
    new = tmp_path / "new.pt"
    untrusted = subprocess.run([sys.executable, "-m", "core.checkpoint", "convert", str(old), str(new)], cwd=ROOT,
                               capture_output=True, text=True)
    assert untrusted.returncode == 2 and untrusted.stderr.count("\n") == 1 and "--trust-code" in untrusted.stderr
    assert not new.exists()
    trusted = subprocess.run([sys.executable, "-m", "core.checkpoint", "convert", str(old), str(new), "--trust-code"],
                             cwd=ROOT, capture_output=True, text=True)
    assert trusted.returncode == 0, trusted.stderr
    converted = read_checkpoint(new)
    assert converted["train_state"] == {"epoch": 2, "best": 0.75, "args": {"out": str(tmp_path / "run")}}
    assert type(converted["train_state"]["best"]) is float
    assert all(torch.equal(converted["ema"][k], v) for k, v in model.state_dict().items())
    help_text = subprocess.run([sys.executable, "-m", "core.checkpoint", "convert", "--help"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    assert "--trust-code" in help_text and "weights_only=False" in help_text
