"""A labeler from its checkpoint: the model with its EMA weights, in eval mode, and its identity."""

from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_model_data_config
from torch import nn

from common.errors import UserError
from core.checkpoint import read_checkpoint
from labeler.dense import build_labeler


def load_labeler(path: str | Path, device: str | torch.device = "cpu",
                 sha256: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model with its EMA weights, in eval mode, and its identity: name, K, input size,
    sha256, epoch, and the input normalisation (mean, std) of its data config. With `sha256`, a file with other
    bytes is refused (core.checkpoint.read_checkpoint)."""
    ckpt = read_checkpoint(path, sha256)
    if ckpt.get("kind", "labeler") != "labeler":
        raise UserError(f"{path}: is a {ckpt['kind']} checkpoint, not a labeler's; pass DIR/last.pt of labeler.train")
    model = build_labeler(ckpt["model"], ckpt["num_classes"], **ckpt.get("model_kwargs", {}))
    model.load_state_dict(ckpt["ema"])
    model.to(device).eval()
    config = resolve_model_data_config(model)
    meta = {
        "kind": "labeler",
        "model": ckpt["model"],
        "num_classes": ckpt["num_classes"],
        "img_size": ckpt["img_size"],
        "sha256": ckpt["sha256"],
        "epoch": ckpt["train_state"].get("epoch"),
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
    }
    return model, meta
