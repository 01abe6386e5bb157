"""Batch mixing that keeps token labels right: CutMix on the token grid, Mixup, and MixToken.

One draw per batch; each sample's partner is the batch flipped along dim 0 (as timm and LV-ViT do), so a mix is
a flip and a copy on the device: no index tensor, nothing the host must send or read.
- cutmix: a box of whole tokens is pasted from the partner into the pixels (box x patch size), the token
  targets and the validity mask alike; the class target is weighted by the exact share of tokens from each
  image. (STL leaves token labels unmixed under CutMix; LV-ViT blends whole maps regardless of the box.)
- mixup: pixels, token targets and class targets are blended with one lam; a token stays valid only where
  both images' tokens are.
- mixtoken (LV-ViT): `mixtoken_forward` pastes the box into the model's patch tokens after its patch embedding
  (a forward hook) and pastes it back into its token outputs (`mix_tokens` both times), so token targets stay
  as they are and only the class target mixes.
Boxes are (top, bottom, left, right) in tokens, half-open. `MixInfo` records the draw for the trainer and
TL-Align (`MixInfo.source` gives which sample each token's content comes from).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from train.targets import HardTokens

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class MixInfo:
    """What one batch went through: mode ("none", "mixup", "cutmix" or "mixtoken"), lam (the weight of each
    sample's own content; for box modes exactly 1 - box tokens / all tokens), box (token units, or None) and the
    token grid (h, w) the box lives on. Sample b's partner is sample B - 1 - b."""

    mode: str
    lam: float
    box: Box | None
    grid: tuple[int, int]

    def source(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[B, h, w] long on `device`: the batch index whose content each token shows (its partner's inside the box)."""
        src = torch.arange(batch, device=device)[:, None, None].expand(batch, *self.grid)
        return src if self.box is None else _paste(src, self.box)


def token_box(grid: tuple[int, int], lam: float, rng: np.random.Generator) -> tuple[Box, float]:
    """A box of whole tokens covering about 1 - lam of the grid (sides scaled by sqrt(1 - lam), centre uniform,
    clipped to the grid), and the exact lam it leaves: 1 - box tokens / all tokens."""
    h, w = grid
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(round(h * ratio)), int(round(w * ratio))
    top, left = int(rng.integers(h)) - cut_h // 2, int(rng.integers(w)) - cut_w // 2
    top, bottom = max(top, 0), min(top + cut_h, h)
    left, right = max(left, 0), min(left + cut_w, w)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (h * w)


def sample_mixtoken(grid: tuple[int, int], alpha: float = 1.0, rng: np.random.Generator | None = None) -> MixInfo:
    """A MixToken draw: lam ~ Beta(alpha, alpha) and a token box from it."""
    rng = rng or np.random.default_rng()
    box, lam = token_box(grid, float(rng.beta(alpha, alpha)), rng)
    return MixInfo("mixtoken", lam, box, tuple(grid))


def mix_tokens(x: torch.Tensor, info: MixInfo, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Paste the box of each sample's partner into its patch tokens; x is [B, prefix + h*w, C], row-major tokens.

    Prefix (class/distillation) tokens are left alone. Self-inverse: the same call un-mixes token outputs.
    """
    if info.box is None:
        return x
    patches = x[:, num_prefix_tokens:].unflatten(1, info.grid).movedim(-1, 1)
    mixed = _paste(patches, info.box).movedim(1, -1).flatten(1, 2)
    return torch.cat([x[:, :num_prefix_tokens], mixed], dim=1)


def _on_grid(info: MixInfo, embed_grid: tuple[int, int]) -> MixInfo:
    """The token-grid MixToken draw moved onto a patch-embedding grid that is an integer multiple of it."""
    (h, w), (H, W) = info.grid, embed_grid
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"patch-embedding grid {embed_grid} is not a square multiple of the token grid {info.grid}")
    return replace(info, box=tuple(v * (H // h) for v in info.box), grid=(H, W))


def _mix_embedding(x: torch.Tensor, layout: str, info: MixInfo) -> torch.Tensor:
    """MixToken on a patch-embedding output in layout NLC, NHWC or NCHW."""
    if layout == "NCHW":
        return _mix_embedding(x.permute(0, 2, 3, 1), "NHWC", info).permute(0, 3, 1, 2)
    if layout == "NHWC":
        return mix_tokens(x.flatten(1, 2), _on_grid(info, x.shape[1:3])).unflatten(1, x.shape[1:3])
    h, w = info.grid
    scale = round((x.shape[1] / (h * w)) ** 0.5)
    if x.shape[1] != h * w * scale**2:
        raise ValueError(f"{x.shape[1]} patch-embedding tokens do not tile the token grid {info.grid}")
    return mix_tokens(x, _on_grid(info, (h * scale, w * scale)))


def _mix_hook(module: nn.Module, args: tuple, output, layout: str, info: MixInfo):
    if isinstance(output, tuple):  # FAN-style (tokens, (H, W))
        return (_mix_embedding(output[0], layout, info), *output[1:])
    return _mix_embedding(output, layout, info)


def mixtoken_forward(dense: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], patch_embed: nn.Module,
                     layout: str, x: torch.Tensor, info: MixInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, token logits [B, h*w, K]) of `dense(x)` under a MixToken draw: inside info.box the output of
    `patch_embed` (layout NLC, NHWC or NCHW, or FAN's (tokens, (H, W)); its grid an integer multiple of the token
    grid) is each sample's partner's, and the token logits are pasted back, so they line up with each sample's
    own token labels; only the class target mixes (apply_mix)."""
    handle = patch_embed.register_forward_hook(partial(_mix_hook, layout=layout, info=info))
    try:
        cls, tokens = dense(x)
    finally:
        handle.remove()
    return cls, mix_tokens(tokens, info)


def _paste(x: torch.Tensor | HardTokens, box: Box, scale: int = 1) -> torch.Tensor | HardTokens:
    """A copy of x [B, ..., H, W] (or of HardTokens' ids and weights) with each sample's box (scaled by `scale`)
    taken from its partner."""
    if isinstance(x, HardTokens):
        return x.map(lambda t: _paste(t, box, scale))
    top, bottom, left, right = (v * scale for v in box)
    out = x.clone()
    out[..., top:bottom, left:right] = x[..., top:bottom, left:right].flip(0)
    return out


def _blend(x: torch.Tensor | HardTokens, lam: float) -> torch.Tensor | HardTokens:
    if isinstance(x, HardTokens):
        return x.blend(lam)
    return torch.lerp(x.flip(0), x, lam)


def _patch_size(image_hw: tuple[int, int], grid: tuple[int, int]) -> int:
    """Pixels per token side; the image must tile the token grid exactly in square patches."""
    (sh, sw), (h, w) = image_hw, grid
    if sh % h or sw % w or sh // h != sw // w:
        raise UserError(f"images of {sh}x{sw} pixels do not split into a {h}x{w} token grid of square patches; "
                        "use an input size that is a multiple of the patch size")
    return sh // h


Tokens = torch.Tensor | HardTokens


def apply_mix(info: MixInfo, images: torch.Tensor, class_targets: torch.Tensor,
              token_targets: Tokens | None = None, valid: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, Tokens | None, torch.Tensor | None]:
    """(images, class_targets, token_targets, valid) as mixed by `info`; the inputs are not modified.

    images [B, C, S, S] (S a multiple of the grid), class_targets [B, K], token_targets [B, K, h, w] or
    HardTokens (already drawn and smoothed: mixing is linear), valid [B, h, w]. For "mixtoken" only the class
    targets change. Hard targets stay class ids: CutMix pastes them, Mixup keeps both samples' ids with weights.
    """
    if info.mode == "none":
        return images, class_targets, token_targets, valid
    class_targets = _blend(class_targets, info.lam)
    if info.mode == "mixup":
        images = _blend(images, info.lam)
        token_targets = None if token_targets is None else _blend(token_targets, info.lam)
        valid = None if valid is None else valid & valid.flip(0)
    elif info.mode == "cutmix":
        images = _paste(images, info.box, _patch_size(images.shape[-2:], info.grid))
        token_targets = None if token_targets is None else _paste(token_targets, info.box)
        valid = None if valid is None else _paste(valid, info.box)
    return images, class_targets, token_targets, valid


class Mixer:
    """Per-batch Mixup or CutMix with timm's switching, mixing token targets with the same box or weight.

    With probability `prob` a batch is mixed: by CutMix with probability `switch_prob` when both alphas are
    > 0, else by whichever is on; lam ~ Beta(alpha, alpha). Seedable through `seed`.
    """

    def __init__(self, grid: tuple[int, int], mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int | None = None):
        self.grid = tuple(grid)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.rng = np.random.default_rng(seed)

    def sample(self) -> MixInfo:
        """Draw a batch's mode, lam and box."""
        on = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if not on or self.rng.random() >= self.prob:
            return MixInfo("none", 1.0, None, self.grid)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            box, lam = token_box(self.grid, float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha)), self.rng)
            return MixInfo("cutmix", lam, box, self.grid)
        return MixInfo("mixup", float(self.rng.beta(self.mixup_alpha, self.mixup_alpha)), None, self.grid)

    def __call__(self, images: torch.Tensor, class_targets: torch.Tensor, token_targets: Tokens | None = None,
                 valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, Tokens | None, torch.Tensor | None, MixInfo]:
        """Sample and apply: (images, class_targets, token_targets, valid, info)."""
        info = self.sample()
        return *apply_mix(info, images, class_targets, token_targets, valid), info
