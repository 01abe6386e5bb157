"""Exact resumption of a run from its last.pt: which checkpoint, whether it is this run's, and its metrics.jsonl."""

import argparse
import json
from pathlib import Path
from typing import Any

from common.errors import UserError


def saved_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a checkpoint records them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def resume_point(args: argparse.Namespace) -> Path | None:
    """--resume, else OUT/last.pt when it exists."""
    if args.resume is not None:
        return args.resume
    last = args.out / "last.pt"
    return last if last.exists() else None


def check_resumable(ckpt: dict[str, Any], path: Path, args: argparse.Namespace, num_classes: int,
                    img_size: int) -> None:
    """A run resumes only the same model, classes, input size and schedule length it was started with."""
    if ckpt["model"] != args.model:
        raise UserError(f"{path}: checkpoint is of model {ckpt['model']}, not --model {args.model}; "
                        f"pass --model {ckpt['model']} or another --out")
    if ckpt["num_classes"] != num_classes or ckpt["img_size"] != img_size:
        raise UserError(f"{path}: checkpoint has {ckpt['num_classes']} classes at {ckpt['img_size']}px, this run "
                        f"{num_classes} at {img_size}px; use another --out")
    state = ckpt["train_state"]
    if "optimizer" not in state:
        raise UserError(f"{path}: checkpoint holds no training state to resume from; use another --out")
    if state["args"]["epochs"] != args.epochs:
        raise UserError(f"{path}: checkpoint follows a {state['args']['epochs']}-epoch schedule, not --epochs "
                        f"{args.epochs}; pass --epochs {state['args']['epochs']} or another --out")


def check_same_run(saved: dict[str, Any], args: argparse.Namespace, path: Path, free: tuple[str, ...]) -> None:
    """Exact resumption needs the flags the checkpoint was trained with (all but `free`); name the first that differs."""
    now = saved_args(args)
    changed = [k for k in now if k not in free and saved.get(k) != now[k]]
    if changed:
        flag = changed[0]
        raise UserError(f"{path}: trained with --{flag.replace('_', '-')} {saved.get(flag)}, this run has "
                        f"{now[flag]}; resume with the checkpoint's flags ({len(changed)} differ) or use another --out")


def rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep the metrics lines of epochs the checkpoint has; a run killed after logging an epoch logs it again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= upto_epoch))
