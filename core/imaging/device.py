"""Resampling on any torch device as PIL resamples: pil.labeler_input (`render_boxes`) and pil.warp_image
(`warp_images`) for batches of decoded uint8 images (on a GPU, after nvJPEG decoding). PIL's filter weights are
matrices (`resample_weights`), applied by two matmuls per image in PIL's pass order, each pass rounded to uint8
levels (`resample_image`): the result differs from PIL's by PIL's fixed-point arithmetic only (at most one level).
"""

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.imaging.boxes import SUPPORT, Box, outside, padding
from core.imaging.mappings import affine, height_width, resize_box, warp_region


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array (maybe read-only, from Ray's object store) on the device: on a GPU through pinned memory and a
    non-blocking copy (the host does not wait for the device)."""
    if device.type != "cuda":
        return torch.from_numpy(np.require(array, requirements="W"))
    pinned = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
    pinned.numpy()[...] = array
    return pinned.to(device, non_blocking=True)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or 0..255 float [B, 3, S, S] -> the model's float32 input ((x / 255 - mean) / std), on its device."""
    mean_t, std_t = (to_device(np.array(v, dtype=np.float32).reshape(1, 3, 1, 1), pixels.device) for v in (mean, std))
    return (pixels.float() / 255.0 - mean_t) / std_t


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's filter kernels at offsets x: bicubic (a = -0.5) or triangle (bilinear)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


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
    """pil.labeler_input for a batch of decoded uint8 [3, H, W] images on any device: float [B, 3, S, S], 0..255 levels.

    The weights of both axes are computed for the whole batch at once; each image then costs two matmuls. Nothing
    here waits for the device.
    """
    device = images[0].device
    heights, widths = np.array([im.shape[1:] for im in images], dtype=np.float64).T
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


def _resized(images: Sequence[torch.Tensor], boxes: np.ndarray, sizes: np.ndarray, interpolation: str,
             colour: torch.Tensor, flips: np.ndarray) -> list[torch.Tensor]:
    """Each image's box (x0, y0, x1, y1) resized as PIL's resize(box=...) does it to its own (h, w), as float levels
    [3, h, w], mirrored where `flips` (per image: left-right, top-bottom) says. The weights of the group come from
    one resample_weights call per axis at the group's largest size, each box stretched to keep its own
    pixel pitch (an image's first h rows are its own); images of one size to one size are resized together."""
    device = images[0].device
    top_h, top_w = (int(n) for n in sizes.max(0))
    pitch = (boxes[:, 2:] - boxes[:, :2]) / sizes[:, ::-1]  # source pixels per resized pixel, (x, y)
    lo, hi = boxes[:, :2], boxes[:, :2] + pitch * [top_w, top_h]
    lengths = np.array([im.shape[1:] for im in images], dtype=np.float64)  # (H, W)
    inside = np.zeros(len(images), dtype=bool)
    wx = resample_weights(lengths[:, 1], lo[:, 0], hi[:, 0], top_w, interpolation, inside, device).float()
    wy = resample_weights(lengths[:, 0], lo[:, 1], hi[:, 1], top_h, interpolation, inside, device).float()
    groups = defaultdict(list)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        groups[(*image.shape[1:], int(h), int(w))].append(i)
    # the source pixels any output pixel of an image reads: its box widened by the filter's reach
    reach = SUPPORT[interpolation] * np.maximum(pitch, 1.0) + 1
    first, last = np.floor(boxes[:, :2] - reach).clip(min=0), np.ceil(boxes[:, 2:] + reach)
    out: list[torch.Tensor] = [colour] * len(images)
    for (height, width, h, w), members in groups.items():
        index = to_device(np.array(members), device)
        x0, y0 = first[members].min(0).astype(int)
        x1, y1 = np.minimum(last[members].max(0), (width, height)).astype(int)
        ry, rx = wy[index, :h, y0:y1], wx[index, :w, x0:x1]
        for axis, weights in ((0, rx), (1, ry)):
            if flips[members, axis].any():
                mirror = to_device(flips[members, axis].reshape(-1, 1, 1), device)
                weights.copy_(torch.where(mirror, weights.flip(1), weights))
        stacked = torch.stack([images[i][:, y0:y1, x0:x1] for i in members])
        resized = resample_image(stacked, ry[:, None], rx[:, None], colour, vertical_first(height, width, h, w))
        for i, view in zip(members, resized):
            out[i] = view
    return out


def _normalised(width: float, height: float) -> np.ndarray:
    """Pixel coordinates of a width x height canvas -> F.grid_sample's (align_corners=False: -1 and 1 are its edges)."""
    return affine(2 / width, 0.0, -1.0, 0.0, 2 / height, -1.0)


def warp_images(images: Sequence[torch.Tensor], mappings: np.ndarray, size: int | tuple[int, int],
                filters: Sequence[str], fill: tuple[int, ...]) -> torch.Tensor:
    """pil.warp_image for decoded uint8 [3, H, W] images of any sizes on one device: float [B, 3, h, w] of 0..255 levels.

    `mappings` [B, 3, 3] (host) and `filters` ("bicubic", "bilinear", "nearest" per image) as warp_image takes them.
    An axis-aligned mapping inside its image is PIL's resize of its box (resample_weights: PIL's result up to
    its fixed-point rounding). Every other mapping reads the region warp_image's affine path reads, resized the
    same way, and all of them go through one F.grid_sample per filter (border padding: taps beyond the image
    repeat its edge, as PIL's), with `fill` wherever the mapping leaves the image. grid_sample's bicubic kernel is
    Keys' a = -0.75 where PIL's is a = -0.5 (tests/test_device_augment.py measures what that changes). Planning is
    on the host; nothing here waits for the device.
    """
    out_h, out_w = height_width(size)
    device = images[0].device
    colour = to_device(np.array(fill, dtype=np.float32).reshape(3, 1, 1), device)
    out: list[torch.Tensor] = [colour.expand(3, out_h, out_w)] * len(images)  # the fill, unless rendered below
    resize, warp = defaultdict(list), defaultdict(list)  # filter -> [(index, box, flips)], [(index, region, mapping)]
    for b, (image, m) in enumerate(zip(images, np.asarray(mappings, dtype=np.float64))):
        height, width = image.shape[1:]
        box = resize_box(m, width, height, out_w, out_h)
        region = None if box is not None else warp_region(m, width, height, out_w, out_h, min_margin=3.0)
        if box is not None:
            resize[filters[b]].append((b, box, (m[0, 0] < 0, m[1, 1] < 0)))
        elif region is not None:  # else it shows only the fill
            warp[filters[b]].append((b, region, m))
    for interpolation, group in resize.items():
        index, boxes, flips = zip(*group)
        sizes = np.array([(out_h, out_w)] * len(index))
        for b, view in zip(index, _resized([images[b] for b in index], np.array(boxes), sizes, interpolation, colour,
                                           np.array(flips))):
            out[b] = view
    for interpolation, group in warp.items():
        index, regions, maps = zip(*group)
        boxes, sizes, residuals = (np.array(part, dtype=np.float64) for part in zip(*regions))
        sizes = sizes.astype(np.int64)
        parts = _resized([images[b] for b in index], boxes, sizes, interpolation, colour,
                         np.zeros((len(index), 2), dtype=bool))
        top_h, top_w = (int(n) for n in sizes.max(0))
        canvas = torch.cat([F.pad(p[None], (0, top_w - p.shape[2], 0, top_h - p.shape[1]), mode="replicate")
                            for p in parts])
        # output pixel centres -> the resized regions (to sample) and the original images (to fill outside them)
        pixels = np.linalg.inv(_normalised(out_w, out_h))
        inner = _normalised(top_w, top_h) @ residuals @ pixels
        source = np.stack([_normalised(images[b].shape[2], images[b].shape[1]) @ m for b, m in zip(index, maps)])
        source = source @ pixels
        thetas = to_device(np.stack([inner, source])[:, :, :2].astype(np.float32), device)  # [2, n, 2, 3]
        shape = (len(index), 3, out_h, out_w)
        grid = F.affine_grid(thetas[0], shape, align_corners=False)
        at = F.affine_grid(thetas[1], shape, align_corners=False)
        outside = ((at < -1) | (at >= 1)).any(-1)[:, None]
        rendered = F.grid_sample(canvas, grid, mode=interpolation, padding_mode="border", align_corners=False)
        for b, view in zip(index, torch.where(outside, colour, rendered.clamp(0, 255).floor_())):
            out[b] = view
    return torch.stack(out)
