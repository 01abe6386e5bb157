"""The labeler's part of a training step (STL's FAN-TL): image-level targets, the dense forward, fan_tl_loss."""

from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import nn

from core.optim import autocast
from core.seeding import step_seed
from labeler.losses import fan_tl_loss


class FanTLObjective:
    """`objective(batch, epoch, step) -> (loss, parts)` for core.engine: Mixup/CutMix (timm's, drawn from the
    step's seed) or smoothed one-hot targets; class-token CE plus CE of the pooled per-patch logits."""

    def __init__(self, module: nn.Module, num_classes: int, *, smoothing: float, mixup: Mixup | None,
                 cls_weight: float, dense_weight: float, pool_share: float, device: torch.device,
                 amp_dtype: torch.dtype | None, seed: int, rank: int):
        self.module, self.num_classes, self.smoothing, self.mixup = module, num_classes, smoothing, mixup
        self.cls_weight, self.dense_weight, self.pool_share = cls_weight, dense_weight, pool_share
        self.device, self.amp_dtype, self.seed, self.rank = device, amp_dtype, seed, rank

    def __call__(self, batch: dict[str, Any], epoch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step_seed(self.seed, epoch, step, self.rank)  # Mixup draws from NumPy's, drop-path from torch's RNG
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["cls"].to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, target = self.mixup(images, labels)
        else:
            target = mixup_target(labels, self.num_classes, smoothing=self.smoothing)
        self.module.train()
        with autocast(self.device, self.amp_dtype):
            cls_logits, token_logits, _ = self.module(images)
        return fan_tl_loss(cls_logits, token_logits, target, self.cls_weight, self.dense_weight, self.pool_share)
