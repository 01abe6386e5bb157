"""The command-line flags both trainers share, with each trainer's defaults, and their checks."""

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from timm.optim import list_optimizers

from common.errors import UserError
from core.optim import AMP_MODES

# flag -> (type, help); every trainer gives its own defaults
TRAINING_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "epochs": (int, "total epochs of the schedule"),
    "batch-size": (int, "per process"),
    "opt": (str, "timm optimizer name (timm.optim.list_optimizers())"),
    "lr": (float, "peak learning rate (default: from --lr-base)"),
    "lr-base": (float, "peak learning rate per 512 images of global batch (DeiT's linear rule); --lr wins"),
    "min-lr": (float, "final learning rate of the cosine schedule"),
    "warmup-lr": (float, "learning rate at the start of warmup"),
    "warmup-epochs": (float, "linear warmup epochs"),
    "weight-decay": (float, "decoupled weight decay (AdamW)"),
    "drop-path": (float, "stochastic depth rate"),
    "smoothing": (float, "label smoothing"),
    "aa": (str, "timm RandAugment config, or 'none'"),
    "color-jitter": (float, "colour-jitter strength, used only with --aa none (as timm); 0: off"),
    "reprob": (float, "random-erasing probability (image only)"),
    "crop-scale": (float, "smallest area share of RandomResizedCrop"),
    "hflip": (float, "horizontal flip probability (default: 0.5, or 0 for data whose manifest says mirroring "
                     "changes the class)"),
    "ema-decay": (float, "EMA decay (after timm's EMA warmup); evaluation and checkpoints' `ema` use it"),
    "clip-grad": (float, "max gradient norm (off by default)"),
    "seed": (int, "seeds the initialisation, data order, augmentation and every step's draws"),
    "workers": (int, "DataLoader worker processes (per process)"),
    "log-interval": (int, "read the losses on the host (and check them) every this many steps"),
    "max-steps": (int, "cap on steps per epoch (smoke tests and benchmarks)"),
}
FLAG_DEFAULTS = {"opt": "adamw", "warmup-lr": 1e-6, "seed": 0, "workers": 2, "log-interval": 50}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; a flag's help ends with its default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


def add_training_flags(parser: argparse.ArgumentParser, defaults: Mapping[str, Any],
                       note: Callable[[str], str] = lambda flag: "", required: tuple[str, ...] = ()) -> None:
    """The shared flags with this trainer's `defaults` (by flag name; None = filled in after parsing, which
    `note(flag)` describes), then --amp, --device, --resume and --stop-after."""
    for flag, (kind, text) in TRAINING_FLAGS.items():
        default = defaults.get(flag, FLAG_DEFAULTS.get(flag))
        parser.add_argument(f"--{flag}", type=kind, default=default, required=flag in required,
                            help=text + note(flag))
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="auto: bf16/fp16 on CUDA, off on CPU")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from (default: OUT/last.pt when it exists)")
    parser.add_argument("--stop-after", type=int, help="stop after this many epochs in total, leaving a checkpoint "
                                                       "that a later run with the same flags resumes from")


def check_training_args(a: argparse.Namespace, allow_no_epochs: bool = False) -> None:
    """Refuse values that would fail late or silently (one line naming the flag); --epochs 0 only where allowed."""
    if a.lr is None and a.lr_base is None:
        raise UserError("give --lr or --lr-base")
    checks = {"epochs": (a.epochs >= (0 if allow_no_epochs else 1), "at least 1 (0 with --pretrained-file)"), "batch_size": (a.batch_size >= 1, "at least 1"),
              "workers": (a.workers >= 0, "at least 0"), "log_interval": (a.log_interval >= 1, "at least 1"),
              "max_steps": (a.max_steps is None or a.max_steps >= 1, "at least 1"),
              "stop_after": (a.stop_after is None or a.stop_after >= 1, "at least 1"),
              "smoothing": (0 <= a.smoothing < 1, "in [0, 1)"), "lr": (a.lr is None or a.lr > 0, "positive"),
              "lr_base": (a.lr_base is None or a.lr_base > 0, "positive")}
    for name, (ok, rule) in checks.items():
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be {rule}")
    if a.opt.lower() not in list_optimizers():
        raise UserError(f"--opt {a.opt}: not a timm optimizer; see timm.optim.list_optimizers()")
