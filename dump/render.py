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

from common.errors import UserError
from core.eval_view import Box, outside, padding, render_box

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


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array (maybe read-only, from Ray's object store) on the device: on a GPU through pinned memory and a
    non-blocking copy (the host does not wait for the device)."""
    if device.type != "cuda":
        return torch.from_numpy(np.require(array, requirements="W"))
    pinned = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
    pinned.numpy()[...] = array
    return pinned.to(device, non_blocking=True)


def resample_weights(lengths: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: int, interpolation: str,
                     extend: np.ndarray, device: torch.device) -> torch.Tensor:
    """One axis's filter weights for a batch, on `device`: [B, S, L] over source pixels 0..L-1, L the longest image's
    length.

    Image b has `lengths[b]` pixels along the axis and its box spans [lo[b], hi[b]) (host arrays, float64; `extend`
    bool). Where `extend[b]` is False the taps are clamped to the image and renormalised (PIL); where True they are
    normalised over the fill-extended axis, so a row's weights over the image sum to less than one where it reads
    beyond the image (the rest is the fill colour's share). Weights past an image's own length are zero. Only the
    taps within each output pixel's filter support are computed (as PIL's coefficients), then scattered.
    """
    dtype, longest = torch.float64, int(lengths.max())
    window = math.ceil(2 * SUPPORT[interpolation] * float(np.maximum((hi - lo) / size, 1.0).max())) + 2
    lengths, lo, hi, extend = (to_device(np.asarray(a), device) for a in (lengths, lo, hi, extend))
    scale = (hi - lo) / size  # [B] source pixels per output pixel
    stretch = scale.clamp(min=1)  # the filter widens when downscaling (antialiasing)
    centre = lo[:, None] + (torch.arange(size, device=device, dtype=dtype) + 0.5) * scale[:, None]  # [B, S]
    first = (centre - SUPPORT[interpolation] * stretch[:, None]).floor()
    taps = first[..., None] + torch.arange(window, device=device, dtype=dtype)  # [B, S, window]: the support
    if interpolation == "nearest":  # PIL's nearest reads the one pixel under the centre
        weights = (taps == centre[..., None].floor()).to(dtype)
    else:
        weights = _filter((taps + 0.5 - centre[..., None]) / stretch[:, None, None], interpolation)
    image = (taps >= 0) & (taps < lengths[:, None, None])
    weights = torch.where(extend[:, None, None] | image, weights, 0.0)
    weights = torch.where(image, weights / weights.sum(-1, keepdim=True), 0.0)
    dense = torch.zeros(*centre.shape, longest, dtype=dtype, device=device)
    return dense.scatter_add_(-1, taps.clamp(0, longest - 1).long(), weights)


def render_boxes(images: Sequence[torch.Tensor], boxes: Sequence[Box], size: int, interpolation: str,
                 fill: tuple[int, int, int]) -> torch.Tensor:
    """`labeler_input` for a batch of decoded uint8 [3, H, W] images on any device: float [B, 3, S, S], 0..255 levels.

    The weights of both axes are computed for the whole batch at once; each image then costs two matmuls. Nothing
    here waits for the device.
    """
    device = images[0].device
    heights = np.array([im.shape[1] for im in images], dtype=np.float64)
    widths = np.array([im.shape[2] for im in images], dtype=np.float64)
    box = np.array(boxes, dtype=np.float64)  # [B, 4]
    extend = np.array([outside(b, im.shape[2], im.shape[1]) for b, im in zip(boxes, images)])
    wx = resample_weights(widths, box[:, 0], box[:, 2], size, interpolation, extend, device).float()
    wy = resample_weights(heights, box[:, 1], box[:, 3], size, interpolation, extend, device).float()
    colour = torch.tensor(fill, dtype=torch.float32, device=device).view(3, 1, 1)
    out = []
    for b, (image, box_b) in enumerate(zip(images, boxes)):
        h, w = image.shape[1:]
        pad = 2 * padding(box_b, size, w, h)  # PIL's pass order is decided on the fill-padded canvas
        vertical = vertical_first(h + pad, w + pad, size, size)
        out.append(resample_image(image, wy[b, :, :h], wx[b, :, :w], colour, vertical))
    return torch.stack(out)


def vertical_first(height: int, width: int, out_height: int, out_width: int) -> bool:
    """Whether PIL's resize of a height x width image to out_height x out_width runs its vertical pass first (when
    the height shrinks more than twice as much as the width)."""
    return height - out_height > 0 and height - out_height > 2 * (width - out_width)


def resample_image(image: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor, colour: torch.Tensor,
                   vertical: bool) -> torch.Tensor:
    """Two resampling passes, [..., 3, H, W] -> float [..., 3, h, w] of 0..255 levels, by the weights ry [..., 1, h, H]
    and rx [..., 1, w, W] (resample_weights' rows; without leading dims, [h, H] and [w, W]), each pass rounded and
    clipped to uint8 levels in PIL's order (`vertical`: vertical_first); the weights' shortfall from 1 in a row is
    the fill `colour` [3, 1, 1]."""
    if vertical:
        columns = (ry @ image.float() + colour * (1 - ry.sum(-1))[..., None]).round_().clamp_(0, 255)  # [.., 3, h, W]
        return (columns @ rx.transpose(-1, -2) + colour * (1 - rx.sum(-1))[..., None, :]).round_().clamp_(0, 255)
    rows = (image.float() @ rx.transpose(-1, -2) + colour * (1 - rx.sum(-1))[..., None, :]).round_().clamp_(0, 255)
    return (ry @ rows + colour * (1 - ry.sum(-1))[..., None]).round_().clamp_(0, 255)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or 0..255 float [B, 3, S, S] -> the model's float32 input ((x / 255 - mean) / std), on its device."""
    mean_t, std_t = (to_device(np.array(v, dtype=np.float32).reshape(1, 3, 1, 1), pixels.device) for v in (mean, std))
    return (pixels.float() / 255.0 - mean_t) / std_t
