"""The labeler's input: a source box of an original image resampled to S x S, on the CPU (PIL) or on any torch device.

A box (x0, y0, x1, y1) is in the original image's continuous pixel coordinates and may reach beyond the image.
Both paths use PIL's resampling filters: output pixel i reads the source around x0 + (i + 0.5) (x1 - x0) / S with
the filter widened by the downscale factor (antialiasing). A box inside the image reads only the image (the
filter's taps are clamped to it and renormalised, as PIL's resize(box=...) does); where a box reaches beyond the
image, the image is extended by the fill colour (the labeler's mean), as train.geometry.warp_image shows
outside pixels. The device path (`render_boxes`) computes the same filter weights as matrices and applies them
by two matmuls per image (in PIL's order, each pass rounded to uint8 levels), so it runs batched on a GPU after nvJPEG
decoding; it differs from PIL by PIL's fixed-point arithmetic only (at most one level).
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from core.eval_view import Box, outside, padding, render_box
from shards.errors import UserError

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "nearest": 0.5}


def fill_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour of the labeler's normalisation mean: what pixels outside the image show."""
    return tuple(int(round(255 * m)) for m in mean)


def check_interpolation(interpolation: str) -> None:
    if interpolation not in RESAMPLE:
        raise UserError(f"labeler interpolation {interpolation!r} is not supported by the dump; "
                        f"use one of {', '.join(RESAMPLE)}")


def labeler_input(image: Image.Image, box: Box, size: int, interpolation: str = "bicubic",
                  fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """The labeler's view of `box` of an RGB image: uint8 [S, S, 3], exactly the box resampled to S x S."""
    return np.asarray(render_box(image, box, size, RESAMPLE[interpolation], fill))


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's filter kernels at offsets x: bicubic (a = -0.5) or triangle (bilinear)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(lengths: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, size: int, interpolation: str,
                     extend: torch.Tensor) -> torch.Tensor:
    """One axis's filter weights for a batch: [B, S, L] over source pixels 0..L-1, L the longest image's length.

    Image b has `lengths[b]` pixels along the axis and its box spans [lo[b], hi[b]). Where `extend[b]` is False
    the taps are clamped to the image and renormalised (PIL); where True they are normalised over the
    fill-extended axis, so a row's weights over the image sum to less than one where it reads beyond the image
    (the rest is the fill colour's share). Weights past an image's own length are zero.
    """
    dtype, longest = torch.float64, int(lengths.max())
    scale = (hi - lo) / size  # [B] source pixels per output pixel
    stretch = scale.clamp(min=1)  # the filter widens when downscaling (antialiasing)
    centre = lo[:, None] + (torch.arange(size, device=lo.device, dtype=dtype) + 0.5) * scale[:, None]  # [B, S]
    reach = math.ceil(float((SUPPORT[interpolation] * stretch + (-lo).clamp(min=0) + (hi - lengths).clamp(min=0)).max())) + 2
    taps = torch.arange(-reach, longest + reach, device=lo.device, dtype=dtype)  # every tap any box's filter reads
    if interpolation == "nearest":  # PIL's nearest reads the one pixel under the centre
        weights = (taps[None, None, :] == centre[..., None].floor()).to(dtype)
    else:
        weights = _filter((taps[None, None, :] + 0.5 - centre[..., None]) / stretch[:, None, None], interpolation)
    image = (taps[None, :] >= 0) & (taps[None, :] < lengths[:, None])  # [B, T]
    weights = torch.where(extend[:, None, None] | image[:, None, :], weights, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    keep = slice(reach, reach + longest)
    return weights[..., keep] * image[:, None, keep]


def render_boxes(images: Sequence[torch.Tensor], boxes: Sequence[Box], size: int, interpolation: str,
                 fill: tuple[int, int, int]) -> torch.Tensor:
    """`labeler_input` for a batch of decoded uint8 [3, H, W] images on any device: float [B, 3, S, S], 0..255 levels.

    The weights of both axes are computed for the whole batch at once; each image then costs two matmuls.
    """
    device = images[0].device
    heights = torch.tensor([im.shape[1] for im in images], dtype=torch.float64, device=device)
    widths = torch.tensor([im.shape[2] for im in images], dtype=torch.float64, device=device)
    box = torch.tensor(boxes, dtype=torch.float64, device=device)  # [B, 4]
    extend = torch.tensor([outside(b, im.shape[2], im.shape[1]) for b, im in zip(boxes, images)], device=device)
    wx = resample_weights(widths, box[:, 0], box[:, 2], size, interpolation, extend).float()
    wy = resample_weights(heights, box[:, 1], box[:, 3], size, interpolation, extend).float()
    colour = torch.tensor(fill, dtype=torch.float32, device=device).view(3, 1, 1)
    out = []
    for b, (image, box_b) in enumerate(zip(images, boxes)):
        h, w = image.shape[1:]
        ry, rx = wy[b, :, :h], wx[b, :, :w]
        # two passes, each rounded and clipped to uint8 levels, in PIL's order (vertical first when the height
        # shrinks more than twice as much as the width, counted on the fill-padded canvas); rows and columns
        # beyond the image are the fill colour, carrying the share of the weights that falls outside it
        pad = 2 * padding(box_b, size, w, h)
        if h + pad - size > 0 and h + pad - size > 2 * (w + pad - size):
            columns = (ry @ image.float() + colour * (1 - ry.sum(1))[:, None]).round_().clamp_(0, 255)  # [3, S, W]
            out.append((columns @ rx.T + colour * (1 - rx.sum(1))).round_().clamp_(0, 255))
        else:
            rows = (image.float() @ rx.T + colour * (1 - rx.sum(1))).round_().clamp_(0, 255)  # [3, H, S]
            out.append((ry @ rows + colour * (1 - ry.sum(1))[:, None]).round_().clamp_(0, 255))
    return torch.stack(out)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or 0..255 float [B, 3, S, S] -> the labeler's float32 input ((x / 255 - mean) / std), on its device."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t
