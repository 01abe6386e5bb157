"""Checkpoints of both trainers: one file holding the model's identity, its live and EMA weights, and the training state."""

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError

FORMAT = "tokenlabel-checkpoint"


def save_checkpoint(path: str | Path, *, model_name: str, num_classes: int, img_size: int,
                    model: nn.Module, ema: nn.Module, train_state: dict[str, Any] | None = None,
                    model_kwargs: dict[str, Any] | None = None, kind: str = "labeler",
                    dense_head_trained: bool = True) -> None:
    """Write atomically (temp file, then rename) so a killed run never leaves a truncated checkpoint.

    `kind` is "labeler" or "student"; `model_kwargs` are the extra arguments that rebuild the model by name;
    `dense_head_trained` is False for a student trained without token labels (its per-token head got no loss).
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "kind": kind,
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "num_classes": num_classes,
        "img_size": img_size,
        "dense_head_trained": dense_head_trained,
        "state_dict": model.state_dict(),
        "ema": ema.state_dict(),
        "train_state": train_state or {},
    }
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict, refusing files that are missing or not ours with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; pass a last.pt written by labeler.train or train.student")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__}); re-run training") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a tokenlabel checkpoint (no '{FORMAT}' format tag)")
    return ckpt


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: identifies the exact labeler a dump came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

