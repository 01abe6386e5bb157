"""STL's FAN-TL loss: the class token and the mean of the per-patch logits both learn the image label."""

import torch
from timm.loss import SoftTargetCrossEntropy

soft_cross_entropy = SoftTargetCrossEntropy()


def fan_tl_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor, target: torch.Tensor, cls_weight: float = 1.0,
                dense_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {"cls": ..., "dense": ...}) with the parts detached for logging: soft-target cross-entropy of the
    class logits [B, K] and of the mean token logits (token_logits [B, N, K] averaged over N) against the
    image-level target [B, K] (smoothed, possibly Mixup/CutMix-mixed probabilities)."""
    cls_loss = soft_cross_entropy(cls_logits.float(), target)
    dense_loss = soft_cross_entropy(token_logits.float().mean(1), target)
    total = cls_weight * cls_loss + dense_weight * dense_loss
    return total, {"cls": cls_loss.detach(), "dense": dense_loss.detach()}
