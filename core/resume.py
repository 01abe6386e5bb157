"""Exact resumption of a run from its last.pt: which checkpoint, whether it is this run's (its flags and the data it
learns from), and its metrics.jsonl."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import atomic_write
from shards.manifest import Manifest

DataIdentity = dict[str, tuple[str | None, str]]  # what a run learns from -> (its digest or id, where it is)


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


def dataset_identity(manifest: Manifest) -> DataIdentity:
    """The images a run trains and evaluates on: its train and val splits' content digests."""
    return {f"{split} images": (manifest.content_digest(split), str(manifest.root)) for split in ("train", "val")}


def check_same_data(saved: dict[str, Any] | None, now: DataIdentity, path: Path) -> None:
    """A run resumes only on the data it was trained on (same digests and ids); name the first that differs."""
    if saved is None:
        raise UserError(f"{path}: checkpoint records no identity of its training data (an older tokenlabel's); "
                        f"use another --out")
    for what, (value, where) in now.items():
        old, old_where = saved.get(what, (None, "?"))
        if old != value:
            raise UserError(f"{path}: trained on {what} {short(old)} ({old_where}), this run has {short(value)} "
                            f"({where}); resume on the data it was trained on or use another --out")


def short(digest: str | None) -> str:
    return "none" if digest is None else digest if len(digest) <= 24 else digest[:24] + "..."


def rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep the metrics lines of epochs the checkpoint has; a run killed after logging an epoch logs it again.

    A torn last line (a write cut short by a full disk or a crash) is dropped with a warning: an epoch's line is
    written before its checkpoint, so that epoch is trained and logged again. A bad line elsewhere is refused.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, TypeError, KeyError):
            if i < last:
                raise UserError(f"{path}: line {i + 1} is not an epoch record ({line[:40]!r}); repair or remove that "
                                f"line, then resume") from None
            print(f"warning: {path}: dropped its torn last line ({line[:40]!r}); that epoch is trained again",
                  file=sys.stderr)
            continue
        if epoch <= upto_epoch:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))
