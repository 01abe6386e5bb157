"""Token-label loss (LV-ViT): soft-target class cross-entropy plus beta x the mean token cross-entropy over valid tokens."""

import torch
import torch.nn.functional as F

from train.targets import HardTokens


def token_label_loss(cls_logits: torch.Tensor, cls_target: torch.Tensor,
                     token_logits: torch.Tensor | None = None, token_target: torch.Tensor | HardTokens | None = None,
                     valid: torch.Tensor | None = None, beta: float = 1.0
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {"cls": ..., "token": ...}) with the parts detached for logging, computed in float32 (logits may
    come in half precision).

    cls_logits [B, K] against cls_target [B, K] probabilities (or [B] class ids). token_logits [B, N, K] against
    token_target [B, N, K] probabilities or HardTokens of ids [B, M, N]; valid [B, N] (bool, or float weights)
    marks the tokens inside the labels' footprint, and the token term is the (weighted) mean over those tokens
    of the whole batch (0 if there are none).
    beta == 0 or token_logits None gives the plain class loss (the --no-token-labels baseline) and no "token" part.
    """
    cls_logits = cls_logits.float()
    cls_loss = F.cross_entropy(cls_logits, _like(cls_target, cls_logits))
    if beta == 0 or token_logits is None:
        return cls_loss, {"cls": cls_loss.detach()}
    token_logits = token_logits.float()
    if isinstance(token_target, HardTokens):
        per_token = _hard_cross_entropy(token_logits, token_target).flatten()
    else:  # soft cross-entropy on the targets as they come (often a transposed view): no copy of them
        per_token = -(token_target * token_logits.log_softmax(-1)).sum(-1).flatten()
    if valid is None:
        token_loss = per_token.mean()
    else:
        weight = valid.flatten().to(per_token.dtype)
        token_loss = (per_token * weight).sum() / weight.sum().clamp_min(1e-12)
    total = cls_loss + beta * token_loss
    return total, {"cls": cls_loss.detach(), "token": token_loss.detach()}


def _like(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Soft targets in the logits' dtype (label maps may arrive as float16); class ids unchanged."""
    return target.to(logits.dtype) if target.is_floating_point() else target


def _hard_cross_entropy(logits: torch.Tensor, target: HardTokens) -> torch.Tensor:
    """[B, N] cross-entropy of logits [B, N, K] against the smoothed one-hot mixtures of target ([B, M, N] ids):
    -(1 - eps) sum_m w_m log p[i_m] - eps mean_k log p[k], without the dense targets."""
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, target.index.transpose(1, 2))
    eps = target.smoothing
    return -(1 - eps) * (picked * target.weight.transpose(1, 2).to(logp.dtype)).sum(-1) - eps * logp.mean(-1)
