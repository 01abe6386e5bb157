"""Token and class targets from stored label maps: per-token distributions of the top-k logits, targets, smoothing.

Layout: per-cell and per-token distributions are channels-first, [B, K, H, W] and [B, K, h, w], so the same
box slicing mixes them and the images (train.mixing); a loss over [B, N, K] takes t.flatten(2).transpose(1, 2).
Hard targets (Gumbel draws, argmax) stay class ids (`HardTokens`): at K=1000 the dense one-hot [B, K, h, w]
would cost more than everything else in the label path, and the loss and mixing do not need it.
Order in the training step: stored_token_targets (the stored top-k through train.geometry.cell_taps; no dense
per-cell map is made) or, from an online labeler's token distributions, token_targets -> train.mixing.
"""

from dataclasses import dataclass

import torch

from common.errors import UserError
from train.geometry import cell_taps

TOKEN_TARGET_KINDS = ("gumbel", "softmax", "argmax")


def top_k_probs(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The k stored logits softmaxed among themselves (float32), 0 where the class id is < 0 (skipped rows); every
    other class gets 0. LV-ViT instead scatters the logits into K zero logits, handing each unstored class exp(0) / Z,
    a mass set by the labeler's arbitrary logit offset (a top logit of 5 leaves ~87% of it spread over 995 classes
    ranked below the top 5); the top-k softmax keeps the stored ratios exactly; smoothing adds the uniform part."""
    return torch.where(classes >= 0, scores.float().softmax(1), 0.0)


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


@dataclass(frozen=True)
class HardTokens:
    """Hard token targets as class ids: per token sum_m weight[:, m] x smoothed one-hot(index[:, m]).

    index [B, M, h, w] long and weight [B, M, h, w] (summing to 1 over M): M is 1 for a draw or an argmax and 2
    after Mixup. `dense()` is the [B, K, h, w] form; the loss (train.losses), CutMix and Mixup work on the ids.
    """

    index: torch.Tensor
    weight: torch.Tensor
    num_classes: int
    smoothing: float

    @classmethod
    def of(cls, index: torch.Tensor, num_classes: int, smoothing: float) -> "HardTokens":
        """One class per token: index [B, h, w]."""
        index = index.unsqueeze(1)
        return cls(index, torch.ones(index.shape, device=index.device), num_classes, smoothing)

    def dense(self) -> torch.Tensor:
        """[B, K, h, w] float32 smoothed distributions."""
        if self.index.shape[1] == 1:
            return _one_hot(self.index[:, 0], self.num_classes, torch.float32, self.smoothing)
        hot = self.weight.new_zeros(self.index.shape[0], self.num_classes, *self.index.shape[2:])
        return smooth(hot.scatter_add_(1, self.index, self.weight), self.smoothing)

    def map(self, fn) -> "HardTokens":
        """The same targets with `fn` applied to index and weight alike (box pasting, flattening)."""
        return HardTokens(fn(self.index), fn(self.weight), self.num_classes, self.smoothing)

    def blend(self, lam: float) -> "HardTokens":
        """lam x these + (1 - lam) x those of the batch flipped (Mixup's partners): their ids join along M."""
        return HardTokens(torch.cat([self.index, self.index.flip(0)], 1),
                          torch.cat([self.weight * lam, self.weight.flip(0) * (1 - lam)], 1),
                          self.num_classes, self.smoothing)


def token_targets(probs: torch.Tensor, kind: str = "gumbel", tau: float = 1.0, smoothing: float = 0.1,
                  generator: torch.Generator | None = None) -> torch.Tensor | HardTokens:
    """Training targets from per-token class distributions [B, K, h, w].

    kind "gumbel" (STL): a hard class per token, drawn afresh at each call from softmax(log p / tau), i.e. from
    p itself at tau=1 (STL's hard F.gumbel_softmax on logits draws from softmax(logits) whatever its tau);
    "softmax": p itself (soft, [B, K, h, w]); "argmax": the most likely class. Hard kinds give `HardTokens`.
    Then label smoothing. Draws use `generator` (on the tensors' device) when given.
    """
    if kind not in TOKEN_TARGET_KINDS:
        raise UserError(f"token target kind {kind!r} is unknown; use one of {TOKEN_TARGET_KINDS}")
    if kind == "softmax":
        return smooth(probs, smoothing)
    if kind == "argmax":
        return HardTokens.of(_top(probs), probs.shape[1], smoothing)
    # Gumbel-max as an exponential race: argmax p^(1/tau) / E with E = -log U ~ Exp(1), U ~ U[0, 1) so E > 0;
    # classes with p = 0 never win
    race = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device).log_().neg_()
    weights = probs if tau == 1 else probs.pow(1 / tau)
    return HardTokens.of(_top(weights / race), probs.shape[1], smoothing)


def _candidates(scores: torch.Tensor, classes: torch.Tensor, mappings: torch.Tensor, footprints: torch.Tensor,
                img_size: int | tuple[int, int], grid: tuple[int, int], points: int, mode: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities [B, C, h*w], class ids [B, C, h*w], points per token [B, 1, h*w], valid [B, h, w]) of
    the C = taps x k (class, probability) candidates each token reads from the stored top-k, tap-major (cell_taps'
    order); a class may appear among a token's candidates several times."""
    b, k, mh, mw = scores.shape
    h, w = grid
    cells, weights, count = cell_taps(mappings.to(scores.device), footprints, (mh, mw), img_size, grid, points, mode)
    taps = cells.shape[1]
    index = cells.flatten(2)[:, :, None].expand(b, taps, k, h * w)
    probs = top_k_probs(scores, classes).flatten(2)[:, None].expand(b, taps, k, mh * mw).gather(3, index)
    cand = (probs * weights.flatten(2)[:, :, None].to(probs.dtype)).view(b, taps * k, h * w)
    ids = classes.flatten(2)[:, None].expand(b, taps, k, mh * mw).gather(3, index).view(b, taps * k, h * w)
    valid = (cand > 0).any(1).view(b, h, w)
    return cand, ids.long().clamp_(min=0), count.flatten(2).to(cand.dtype), valid


def stored_token_probs(scores: torch.Tensor, classes: torch.Tensor, mappings: torch.Tensor, footprints: torch.Tensor,
                       num_classes: int, img_size: int | tuple[int, int], grid: tuple[int, int], *, points: int = 2,
                       mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """(token distributions [B, K, h, w], valid [B, h, w]) straight from stored top-k maps.

    The same as the dense reference densify -> resample_maps of tests/reference.py (scores and classes
    [B, k, H, W] as stored, mappings [B, 3, 3], footprints [B, 4]) without its [B, K, H, W] map: each token
    gathers the k (class, probability) pairs of the cells it reads (train.geometry.cell_taps) and adds them into
    its K classes in the order resample_maps sums them, so with mode="nearest" the result is bit-identical on CPU
    (on CUDA scatter_add_ may add a token's terms in another order: the last bit may differ). This assumes
    distinct classes within a cell, as a top-k has.
    """
    cand, ids, count, valid = _candidates(scores, classes, mappings, footprints, img_size, grid, points, mode)
    token_probs = cand.new_zeros(cand.shape[0], num_classes, cand.shape[2]).scatter_add_(1, ids, cand) / count
    return token_probs.view(*token_probs.shape[:2], *grid), valid


def stored_token_targets(scores: torch.Tensor, classes: torch.Tensor, mappings: torch.Tensor,
                         footprints: torch.Tensor, num_classes: int, img_size: int | tuple[int, int],
                         grid: tuple[int, int], *, kind: str = "gumbel", tau: float = 1.0, smoothing: float = 0.1,
                         points: int = 2, mode: str = "nearest", generator: torch.Generator | None = None,
                         pooled: bool = True) -> tuple[torch.Tensor | HardTokens, torch.Tensor, torch.Tensor | None]:
    """(targets, valid [B, h, w], pooled label [B, K] or None) from stored top-k maps, as stored_token_probs ->
    token_targets would make them: soft targets [B, K, h, w], or for the hard kinds `HardTokens` drawn among each
    token's candidates, so that at no point a [B, K, h, w] tensor exists. The pooled label is the mean of the
    valid tokens' distributions (all zeros for a sample without a valid token), for class_targets' blend; with
    pooled=False it is not computed (None).

    kind "gumbel" races the token's candidates instead of its K classes: candidate i of class c runs with
    weight w_i p_c^(1/tau - 1) (w_i its share of p_c), so class c wins with probability proportional to
    p_c^(1/tau), exactly token_targets' distribution, drawn from a different random stream. "argmax" picks the
    class of the largest per-class total. A token without a label gets class 0, as there.
    """
    if kind not in TOKEN_TARGET_KINDS:
        raise UserError(f"token target kind {kind!r} is unknown; use one of {TOKEN_TARGET_KINDS}")
    b, h, w = scores.shape[0], *grid
    if kind == "softmax":
        token_probs, valid = stored_token_probs(scores, classes, mappings, footprints, num_classes, img_size, grid,
                                                points=points, mode=mode)
        return (token_targets(token_probs, kind, tau, smoothing), valid,
                pooled_label(token_probs, valid) if pooled else None)
    cand, ids, count, valid = _candidates(scores, classes, mappings, footprints, img_size, grid, points, mode)
    mean = None
    if pooled:
        tokens = valid.flatten(1).sum(1, keepdim=True).clamp(min=1).to(cand.dtype)
        mean = cand.new_zeros(b, num_classes).scatter_add_(1, ids.flatten(1), (cand / count).flatten(1)) / tokens
    if kind == "argmax" or tau != 1:
        # each candidate's class total p_c: summed over the token's candidates of the same class
        total = ((ids[:, :, None] == ids[:, None]) * cand[:, None]).sum(2)
    if kind == "argmax":  # the largest total, the smallest class id on ties, as _top over K classes
        winner = torch.where(total == total.amax(1, keepdim=True), ids, num_classes).amin(1)
    else:
        if tau != 1:
            cand = torch.where(cand > 0, cand * total.pow(1 / tau - 1), 0.0)  # 0 * inf would be NaN if p_c = 0
        race = torch.rand(cand.shape, generator=generator, dtype=cand.dtype, device=cand.device).log_().neg_()
        winner = ids.gather(1, _top(cand / race, keepdim=True))
    winner = torch.where(valid, winner.view(b, h, w), 0)
    return HardTokens.of(winner, num_classes, smoothing), valid, mean


def pooled_label(token_probs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K]: the mean of the valid tokens' distributions (token_probs [B, K, h, w], valid [B, h, w]; all tokens
    when None); all zeros for a sample without a valid token."""
    weight = torch.ones_like(token_probs[:, 0]) if valid is None else valid.to(token_probs.dtype)
    return (token_probs * weight[:, None]).sum((2, 3)) / weight.sum((1, 2))[:, None].clamp(min=1)


def class_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.1,
                  pooled: torch.Tensor | None = None, map_weight: float = 0.0) -> torch.Tensor:
    """Image-level targets [B, K]: the one-hot label, optionally blended with the map's pooled label, smoothed.

    With map_weight w > 0 the target is (1 - w) one_hot + w pooled (pooled_label: the mean of the valid tokens'
    distributions), as LV-ViT's crop-level label; a sample without a valid token (pooled all zeros) keeps its
    one-hot label.
    """
    targets = _one_hot(labels, num_classes, torch.float32)
    if map_weight > 0:
        if pooled is None:
            raise UserError("class_targets: map_weight > 0 needs the pooled token label (pooled)")
        w = map_weight * (pooled.sum(1, keepdim=True) > 0).to(pooled.dtype)
        targets = (1 - w) * targets.to(pooled.device) + w * pooled.float()
    return smooth(targets, smoothing)
