"""STL's FAN-TL loss: the class token and the pooled per-patch logits both learn the image label."""

import torch
from timm.loss import SoftTargetCrossEntropy

soft_cross_entropy = SoftTargetCrossEntropy()


def pool_tokens(token_logits: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """[B, N, K] -> [B, K]: per class, the mean of the largest `share` of its N token logits (at least one token).

    share 1 is STL's mean; a smaller share is multiple-instance pooling: a class is in the image if some tokens
    say so, and no token is pushed towards a class its region does not show.
    """
    if share >= 1:
        return token_logits.mean(1)
    count = max(1, round(share * token_logits.shape[1]))
    return token_logits.topk(count, dim=1).values.mean(1)


def fan_tl_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor, target: torch.Tensor, cls_weight: float = 1.0,
                dense_weight: float = 1.0, pool_share: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {"cls": ..., "dense": ...}) with the parts detached for logging: soft-target cross-entropy of the
    class logits [B, K] and of the pooled token logits (token_logits [B, N, K], `pool_tokens`) against the
    image-level target [B, K] (smoothed, possibly Mixup/CutMix-mixed probabilities)."""
    cls_loss = soft_cross_entropy(cls_logits.float(), target)
    dense_loss = soft_cross_entropy(pool_tokens(token_logits.float(), pool_share), target)
    total = cls_weight * cls_loss + dense_weight * dense_loss
    return total, {"cls": cls_loss.detach(), "dense": dense_loss.detach()}
