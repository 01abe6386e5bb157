"""Where a labeler's tokens sit in its input: the stride, and the centre of token 0's receptive field.

A map cell must describe the image region its logits come from. Token (r, c) of a stride-s labeler is centred at
input pixel coordinate (c s + centre, r s + centre) (continuous coordinates: pixel j spans [j, j + 1]). A lattice
is centred when centre = s / 2: patchify stems (ViT, FAN-Hybrid's ConvNeXt, the demo CNN) are. FAN-ViT's stem of
3x3 stride-2 convolutions with padding 1 puts centre at 0.5 whatever its stride, i.e. 3.5 px left of the cell
centre at stride 8: rendered naively, a map would be off by nearly half a cell, and a flipped one by nearly a
whole cell. The dump therefore renders the labeler's input shifted by `input_shift` so that each token's centre
lands on its cell's centre.

The centre is measured, not assumed: the receptive field of a middle token of the labeler's local stem (the patch
embedding of a transformer, the whole feature extractor of a CNN) is the set of input pixels its output depends
on, found with autograd on a random input; its midpoint is the token's centre.
"""

import copy

import torch
from timm.layers import PatchEmbed
from torch import nn

from common.errors import UserError


def local_stem(model: nn.Module) -> nn.Module:
    """The part of a labeler that maps pixels to tokens before any global mixing (attention, pooling)."""
    inner = getattr(model, "model", model)  # DenseClassifier wraps the timm model
    embed = getattr(inner, "patch_embed", None)
    if isinstance(embed, PatchEmbed):  # timm ViT: its projection conv takes any input size
        return embed.proj
    if isinstance(embed, nn.Module):
        return embed
    return _Features(inner)


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _as_grid(out) -> torch.Tensor:
    """A stem's output as [B, C, H, W]: CNN maps, FAN's (tokens, (H, W)), ViT's [B, N, C] or NHWC tokens."""
    if isinstance(out, tuple):
        tokens, (h, w) = out
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
    if out.dim() == 3:
        side = round(out.shape[1] ** 0.5)
        return out.transpose(1, 2).reshape(out.shape[0], -1, side, out.shape[1] // side)
    return out


@torch.no_grad()
def _stride(stem: nn.Module, size: int) -> int:
    return size // _as_grid(stem(torch.zeros(1, 3, size, size))).shape[-1]


def _centre(stem: nn.Module, stride: int, along_x: bool) -> float:
    """A middle token's receptive-field midpoint minus its lattice position, along one axis: on a strip long
    along that axis (lengthened until the field fits inside it) and a few tokens wide across it."""
    long, short = 16 * stride, 4 * stride
    while True:
        x = torch.randn(1, 3, *((short, long) if along_x else (long, short)),
                        generator=torch.Generator().manual_seed(0), requires_grad=True)
        grid = _as_grid(stem(x))
        middle = grid.shape[-1 if along_x else -2] // 2
        (grid[..., 1, middle] if along_x else grid[..., middle, 1]).sum().backward()
        reach = x.grad.abs().sum(dim=(0, 1, 2) if along_x else (0, 1, 3)).nonzero().flatten()
        first, last = reach.min().item(), reach.max().item()
        if 0 < first and last < long - 1 or long >= 256 * stride:
            return (first + last + 1) / 2 - middle * stride
        long *= 2


def token_geometry(model: nn.Module, img_size: int) -> dict[str, float]:
    """{"stride": s, "centre": c}: token (r, c') of an input of any size sits at (c' s + c, r s + c) input px."""
    stem = copy.deepcopy(local_stem(model)).float().eval()
    stride = _stride(stem, img_size)
    if stride < 1 or img_size % stride:
        raise UserError(f"input size {img_size} is not a multiple of the labeler's stride {stride}")
    centres = [_centre(stem, stride, along_x) for along_x in (True, False)]
    if centres[0] != centres[1]:
        raise UserError(f"the labeler's tokens are centred at x {centres[0]}, y {centres[1]} px; "
                        f"only square lattices are supported")
    return {"stride": stride, "centre": centres[0]}


def input_shift(geometry: dict[str, float]) -> float:
    """How far (input px, to the right and down) the labeler's input must be shifted so that each token's centre
    falls on the centre of its cell of the footprint: s / 2 - centre."""
    return geometry["stride"] / 2 - geometry["centre"]
