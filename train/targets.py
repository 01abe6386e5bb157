"""Token and class targets from stored label maps: densify the top-k logits, draw per-token targets, smooth.

Layout: per-cell and per-token distributions are channels-first, [B, K, H, W] and [B, K, h, w], so the same
box slicing mixes them and the images (train.mixing); a loss over [B, N, K] takes t.flatten(2).transpose(1, 2).
Order in the training step: densify -> train.geometry.resample_maps -> token_targets -> train.mixing, or, the
same without the dense per-cell map, stored_token_targets -> train.mixing.
"""

import torch

from shards.errors import UserError
from train.geometry import cell_taps

TOKEN_TARGET_KINDS = ("gumbel", "softmax", "argmax")


def _top_k_probs(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The k stored logits softmaxed among themselves (float32), 0 where the class id is < 0 (skipped rows)."""
    return torch.where(classes >= 0, scores.float().softmax(1), 0.0)


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
    probs = _top_k_probs(scores, classes)
    dense = probs.new_zeros(probs.shape[0], num_classes, *probs.shape[2:])
    return dense.scatter_add_(1, classes.long().clamp(min=0), probs)


def smooth(targets: torch.Tensor, smoothing: float, dim: int = 1) -> torch.Tensor:
    """Label smoothing of distributions along `dim`: t (1 - eps) + eps / K."""
    return targets * (1 - smoothing) + smoothing / targets.shape[dim]


def _top(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Index of the largest entry along dim 1, the first on ties (max(1) outruns argmax(1) on CPU there)."""
    return x.max(1, keepdim=keepdim).indices


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
        return _one_hot(_top(probs), probs.shape[1], probs.dtype, smoothing)
    # Gumbel-max as an exponential race: argmax p^(1/tau) / E with E = -log U ~ Exp(1), U ~ U[0, 1) so E > 0;
    # classes with p = 0 never win
    race = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device).log_().neg_()
    weights = probs if tau == 1 else probs.pow(1 / tau)
    return _one_hot(_top(weights / race), probs.shape[1], probs.dtype, smoothing)


def stored_token_targets(scores: torch.Tensor, classes: torch.Tensor, mappings: torch.Tensor,
                         footprints: torch.Tensor, num_classes: int, img_size: int | tuple[int, int],
                         grid: tuple[int, int], *, kind: str = "gumbel", tau: float = 1.0, smoothing: float = 0.1,
                         points: int = 2, mode: str = "nearest", generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [B, K, h, w], valid [B, h, w], token distributions [B, K, h, w]) straight from stored top-k maps.

    The same as densify -> resample_maps -> token_targets (arguments as there; scores and classes [B, k, H, W]
    as stored, mappings [B, 3, 3], footprints [B, 4]), without the dense [B, K, H, W] map: each token gathers
    the k (class, probability) pairs of the cells it reads (train.geometry.cell_taps) and adds them into its K
    classes in the order resample_maps sums them, so with mode="nearest" the distributions and the mask are
    bit-identical on CPU (on CUDA scatter_add_ may add a token's terms in another order: the last bit may differ).
    This assumes distinct classes within a cell, as a top-k has.

    kind "gumbel" races the token's candidates instead of its K classes: candidate i of class c runs with
    weight w_i p_c^(1/tau - 1) (w_i its share of p_c), so class c wins with probability proportional to
    p_c^(1/tau), exactly token_targets' distribution, drawn from a different random stream. A token without a
    label draws class 0, as there.
    """
    b, k, mh, mw = scores.shape
    h, w = grid
    cells, weights, count = cell_taps(mappings.to(scores.device), footprints, (mh, mw), img_size, grid, points, mode)
    taps = cells.shape[1]
    # candidates [B, T * k, h * w], tap-major as resample_maps adds its points
    index = cells.flatten(2)[:, :, None].expand(b, taps, k, h * w)
    probs = _top_k_probs(scores, classes).flatten(2)[:, None].expand(b, taps, k, mh * mw).gather(3, index)
    cand = (probs * weights.flatten(2)[:, :, None].to(probs.dtype)).view(b, taps * k, h * w)
    ids = classes.flatten(2)[:, None].expand(b, taps, k, mh * mw).gather(3, index).view(b, taps * k, h * w)
    ids = ids.long().clamp_(min=0)
    token_probs = cand.new_zeros(b, num_classes, h * w).scatter_add_(1, ids, cand)
    if points > 1:
        token_probs /= count.flatten(2).to(cand.dtype)
    valid = (cand > 0).any(1).view(b, h, w)
    if kind != "gumbel":
        token_probs = token_probs.view(b, num_classes, h, w)
        return token_targets(token_probs, kind, tau, smoothing), valid, token_probs
    if tau != 1:
        share = token_probs.gather(1, ids).pow(1 / tau - 1)
        cand = torch.where(cand > 0, cand * share, 0.0)  # 0 * inf would be NaN where p_c = 0 and tau > 1
    race = torch.rand(cand.shape, generator=generator, dtype=cand.dtype, device=cand.device).log_().neg_()
    winner = ids.gather(1, _top(cand / race, keepdim=True)).view(b, h, w)
    winner = torch.where(valid, winner, 0)
    return _one_hot(winner, num_classes, cand.dtype, smoothing), valid, token_probs.view(b, num_classes, h, w)


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
