"""Token and class targets from stored label maps: densify the top-k logits, draw per-token targets, smooth.

Layout: per-cell and per-token distributions are channels-first, [B, K, H, W] and [B, K, h, w], so the same
box slicing mixes them and the images (train.mixing); a loss over [B, N, K] takes t.flatten(2).transpose(1, 2).
Order in the training step: densify -> train.geometry.resample_maps -> token_targets -> train.mixing.
"""

import torch

from shards.errors import UserError

TOKEN_TARGET_KINDS = ("gumbel", "softmax", "argmax")


def densify(scores: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-cell class distributions [B, K, H, W] (float32) from top-k logits and class ids [B, k, H, W].

    The k stored logits are softmaxed among themselves and scattered into K classes; every other class gets
    probability 0. LV-ViT instead scatters the logits into a K-vector of zero logits, which hands each unstored
    class exp(0) / Z: how much mass that is depends on the labeler's arbitrary logit offset (softmax is
    shift-invariant, zero is not a neutral logit), e.g. a top logit of 5 leaves ~87% of the mass spread
    uniformly over 995 classes the labeler ranked below its top 5. The top-k softmax keeps the ratios among
    the stored classes exactly and does not depend on the offset; smoothing adds the uniform part explicitly.
    Cells with a class id < 0 (rows the dump skipped) get all-zero distributions.
    """
    labelled = classes >= 0
    probs = torch.where(labelled, scores.float().softmax(1), 0.0)
    dense = probs.new_zeros(probs.shape[0], num_classes, *probs.shape[2:])
    return dense.scatter_add_(1, classes.long().clamp(min=0), probs)


def smooth(targets: torch.Tensor, smoothing: float, dim: int = 1) -> torch.Tensor:
    """Label smoothing of distributions along `dim`: t (1 - eps) + eps / K."""
    return targets * (1 - smoothing) + smoothing / targets.shape[dim]


def _one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype, smoothing: float = 0.0) -> torch.Tensor:
    """Smoothed one-hot along dim 1: index [B, ...] -> [B, K, ...], in one pass."""
    off = smoothing / num_classes
    out = torch.full((index.shape[0], num_classes, *index.shape[1:]), off, dtype=dtype, device=index.device)
    return out.scatter_(1, index.unsqueeze(1), 1 - smoothing + off)


def token_targets(probs: torch.Tensor, kind: str = "gumbel", tau: float = 1.0, smoothing: float = 0.1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Training targets [B, K, h, w] from per-token class distributions [B, K, h, w].

    kind "gumbel" (STL): a hard one-hot class per token, drawn afresh at each call from softmax(log p / tau),
    i.e. from p itself at tau=1 (STL's hard F.gumbel_softmax on logits draws from softmax(logits) whatever its
    tau); "softmax": p itself (soft); "argmax": one-hot of the most likely class. Then label smoothing.
    Draws use `generator` (on the tensors' device) when given.
    """
    if kind not in TOKEN_TARGET_KINDS:
        raise UserError(f"token target kind {kind!r} is unknown; use one of {TOKEN_TARGET_KINDS}")
    if kind == "softmax":
        return smooth(probs, smoothing)
    if kind == "argmax":
        return _one_hot(probs.argmax(1), probs.shape[1], probs.dtype, smoothing)
    # Gumbel-max as an exponential race: argmax p^(1/tau) / E with E = -log U ~ Exp(1), U ~ U[0, 1) so E > 0;
    # classes with p = 0 never win
    race = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device).log_().neg_()
    weights = probs if tau == 1 else probs.pow(1 / tau)
    return _one_hot((weights / race).argmax(1), probs.shape[1], probs.dtype, smoothing)


def class_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.1,
                  token_probs: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                  map_weight: float = 0.0) -> torch.Tensor:
    """Image-level targets [B, K]: the one-hot label, optionally blended with the map's pooled label, smoothed.

    With map_weight w > 0 the target is (1 - w) one_hot + w pooled, pooled being the mean of the valid tokens'
    distributions (token_probs [B, K, h, w], valid [B, h, w]; all tokens when valid is None), as LV-ViT's
    crop-level label; a sample without a valid token keeps its one-hot label.
    """
    targets = _one_hot(labels, num_classes, torch.float32)
    if map_weight > 0:
        if token_probs is None:
            raise UserError("class_targets: map_weight > 0 needs the token distributions (token_probs)")
        weight = torch.ones_like(token_probs[:, 0]) if valid is None else valid.to(token_probs.dtype)
        count = weight.sum((1, 2))[:, None]
        pooled = (token_probs * weight[:, None]).sum((2, 3)) / count.clamp(min=1)
        w = map_weight * (count > 0).to(pooled.dtype)
        targets = (1 - w) * targets.to(pooled.device) + w * pooled.float()
    return smooth(targets, smoothing)
