"""One spatial mapping per sample: build it, render the image with it, and resample label maps with it.

Coordinates are continuous pixel coordinates: pixel (row i, col j) covers [j, j+1] x [i, i+1] and its centre is
(j + 0.5, i + 0.5). A mapping is a 3x3 matrix M taking an output (student input) point (x, y, 1) to the point
M @ (x, y, 1) of the ORIGINAL image. Mappings compose by matrix product: if op A is applied first and op B then,
on A's output, the sample's mapping is M_A @ M_B (each op's matrix takes its output to its input).

A label map of H x W cells covers a footprint (x0, y0, x1, y1) of the original image; cell (r, c) covers
[x0 + c (x1 - x0) / W, x0 + (c + 1) (x1 - x0) / W) x [the same along y], half-open, so every point of the
footprint lies in exactly one cell.
"""

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UserError
from dump.render import SUPPORT, resample_image, resample_weights, to_device, vertical_first

RESAMPLE_MODES = ("nearest", "bilinear")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def affine(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    """The mapping (x, y) -> (a x + b y + c, d x + e y + f) as a 3x3 float64 matrix."""
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def crop_mapping(left: float, top: float, width: float, height: float, out_size: int | tuple[int, int]) -> np.ndarray:
    """Resize the box [left, left+width] x [top, top+height] to an output of out_size (int or (h, w))."""
    out_h, out_w = _pair(out_size)
    return affine(width / out_w, 0.0, left, 0.0, height / out_h, top)


def hflip_mapping(width: float) -> np.ndarray:
    """Mirror a canvas of this width left to right."""
    return affine(-1.0, 0.0, width, 0.0, 1.0, 0.0)


def _about_center(linear: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A linear map applied about the centre of a canvas of this size (int or (h, w))."""
    h, w = _pair(size)
    center = np.array([w / 2, h / 2])
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = center - linear @ center
    return m


def rotate_mapping(degrees: float, size: int | tuple[int, int]) -> np.ndarray:
    """Rotate a canvas about its centre by `degrees` counter-clockwise on screen (as PIL's Image.rotate does)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return _about_center(np.array([[c, -s], [s, c]]), size)


def shear_mapping(shear_x: float, shear_y: float, size: int | tuple[int, int]) -> np.ndarray:
    """Shear a canvas about its centre, with the sign of timm's ShearX (x_in = x + f y) and ShearY (y_in = y + f x)."""
    return _about_center(np.array([[1.0, shear_x], [shear_y, 1.0]]), size)


def translate_mapping(dx: float, dy: float) -> np.ndarray:
    """Read the input at (x + dx, y + dy), as timm's Translate ops do (the content moves by (-dx, -dy))."""
    return affine(1.0, 0.0, dx, 0.0, 1.0, dy)


def center_crop_mapping(image_wh: tuple[int, int], out_size: int, crop_pct: float = 1.0) -> np.ndarray:
    """The eval view: the centred square of side crop_pct * shorter side, resized to out_size x out_size.

    This is timm's "resize the shorter side to S / crop_pct, centre-crop S" without its integer rounding; a
    labeler that saw its input this way has this square as its footprint.
    """
    width, height = image_wh
    side = crop_pct * min(width, height)
    return crop_mapping((width - side) / 2, (height - side) / 2, side, side, out_size)


def _preimage_box(mapping: np.ndarray, out_w: int, out_h: int) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) in the source of the output canvas [0, out_w] x [0, out_h]."""
    corners = mapping @ np.array([[0, out_w, 0, out_w], [0, 0, out_h, out_h], [1, 1, 1, 1]], dtype=np.float64)
    return corners[0].min(), corners[1].min(), corners[0].max(), corners[1].max()


def _resize_box(m: np.ndarray, width: int, height: int, out_w: int, out_h: int
                ) -> tuple[float, float, float, float] | None:
    """The source box of an axis-aligned mapping that stays inside the image (RandomResizedCrop, flips): rendering
    it is one antialiased resize of that box, as timm does it. None for any other mapping."""
    x0, y0, x1, y1 = _preimage_box(m, out_w, out_h)
    tol = 1e-3
    if m[0, 1] == 0 and m[1, 0] == 0 and x0 > -tol and y0 > -tol and x1 < width + tol and y1 < height + tol:
        return max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    return None


def _shrink(m: np.ndarray) -> tuple[float, float]:
    """Source pixels per output pixel along the source's x and y axes; > 1 means the mapping shrinks the image."""
    inv = np.linalg.inv(m[:2, :2])
    return 1 / np.hypot(inv[0, 0], inv[1, 0]), 1 / np.hypot(inv[0, 1], inv[1, 1])


def _warp_region(m: np.ndarray, width: int, height: int, out_w: int, out_h: int, min_margin: float = 0.0
                 ) -> tuple[tuple[int, int, int, int], tuple[int, int], np.ndarray] | None:
    """What an affine warp reads: the integer region (x0, y0, x1, y1) of the image around the mapping's preimage
    (with a margin for the interpolation kernel, clipped to the image), the (height, width) to resize it to first
    (antialiased, so that the warp itself shrinks by at most 1 along each source axis), and the mapping from output
    pixels to pixels of that resized region. None when the output shows nothing of the image."""
    shrink_x, shrink_y = _shrink(m)
    margin = max(3 * max(shrink_x, shrink_y), min_margin)  # room for the warp's interpolation kernel
    x0, y0, x1, y1 = _preimage_box(m, out_w, out_h)
    bx0, by0 = max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin))
    bx1, by1 = min(width, math.ceil(x1 + margin)), min(height, math.ceil(y1 + margin))
    if bx1 <= bx0 or by1 <= by0:
        return None
    rh, rw = math.ceil((by1 - by0) / max(shrink_y, 1.0)), math.ceil((bx1 - bx0) / max(shrink_x, 1.0))
    return (bx0, by0, bx1, by1), (rh, rw), np.linalg.inv(crop_mapping(bx0, by0, bx1 - bx0, by1 - by0, (rh, rw))) @ m


def warp_image(img: Image.Image, mapping: np.ndarray, size: int | tuple[int, int], resample: int,
               fill: tuple[int, ...]) -> Image.Image:
    """Render the output whose point (x, y) shows `img` at mapping @ (x, y, 1); outside `img` shows `fill`.

    PIL's resize(box=...) and transform(AFFINE) both use the continuous pixel convention above (verified in
    tests/test_geometry.py), so the rendered image realises the mapping exactly. An axis-aligned mapping inside
    the image (RandomResizedCrop, flips) is one antialiased resize, as timm does it; any other mapping is one
    affine warp, preceded, when it shrinks the image, by an antialiased resize of the region it reads, so that
    downscaling does not alias. `warp_images` does the same for a batch of tensors on any device.
    """
    out_h, out_w = _pair(size)
    m = np.asarray(mapping, dtype=np.float64)
    box = _resize_box(m, *img.size, out_w, out_h)
    if box is not None:
        out = img.resize((out_w, out_h), resample, box=box)
        if m[0, 0] < 0:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if m[1, 1] < 0:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return out
    if max(_shrink(m)) > 1:
        region = _warp_region(m, *img.size, out_w, out_h)
        if region is None:
            return Image.new(img.mode, (out_w, out_h), fill)
        (bx0, by0, bx1, by1), (rh, rw), m = region
        img = img.resize((rw, rh), resample, box=(bx0, by0, bx1, by1))
    return img.transform((out_w, out_h), Image.Transform.AFFINE, tuple(m[:2].ravel()), resample=resample,
                         fillcolor=fill)


def _resized(images: Sequence[torch.Tensor], boxes: np.ndarray, sizes: np.ndarray, interpolation: str,
             colour: torch.Tensor, flips: np.ndarray) -> list[torch.Tensor]:
    """Each image's box (x0, y0, x1, y1) resized as PIL's resize(box=...) does it to its own (h, w), as float levels
    [3, h, w], mirrored where `flips` (per image: left-right, top-bottom) says. The weights of the group come from
    one dump.render.resample_weights call per axis at the group's largest size, each box stretched to keep its own
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
    """`warp_image` for decoded uint8 [3, H, W] images of any sizes on one device: float [B, 3, h, w] of 0..255 levels.

    `mappings` [B, 3, 3] (host) and `filters` ("bicubic", "bilinear", "nearest" per image) as warp_image takes them.
    An axis-aligned mapping inside its image is PIL's resize of its box (dump.render's weights: PIL's result up to
    its fixed-point rounding). Every other mapping reads the region warp_image's affine path reads, resized the
    same way, and all of them go through one F.grid_sample per filter (border padding: taps beyond the image
    repeat its edge, as PIL's), with `fill` wherever the mapping leaves the image. grid_sample's bicubic kernel is
    Keys' a = -0.75 where PIL's is a = -0.5 (tests/test_device_augment.py measures what that changes). Planning is
    on the host; nothing here waits for the device.
    """
    out_h, out_w = _pair(size)
    device = images[0].device
    colour = to_device(np.array(fill, dtype=np.float32).reshape(3, 1, 1), device)
    out: list[torch.Tensor] = [colour.expand(3, out_h, out_w)] * len(images)  # the fill, unless rendered below
    resize, warp = defaultdict(list), defaultdict(list)  # filter -> [(index, box, flips)], [(index, region, mapping)]
    for b, (image, m) in enumerate(zip(images, np.asarray(mappings, dtype=np.float64))):
        height, width = image.shape[1:]
        box = _resize_box(m, width, height, out_w, out_h)
        region = None if box is not None else _warp_region(m, width, height, out_w, out_h, min_margin=3.0)
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


def map_coordinates(mappings: torch.Tensor, footprints: torch.Tensor, map_grid: tuple[int, int],
                    img_size: int | tuple[int, int], grid: tuple[int, int], points: int = 1) -> torch.Tensor:
    """Where each token's sample points land in the label map, in cell units: [B, points**2, h, w, 2] as (u, v).

    Token (r, c) of an h x w grid over an img_size input covers output pixels [c P_x, (c+1) P_x] x
    [r P_y, (r+1) P_y]; its points sit at the centres of a points x points split of that square (points=1: the
    token centre). Each goes through its sample's mapping (`mappings` [B, 3, 3]) to the original image, then
    into the footprint (`footprints` [B, 4] or [4], (x0, y0, x1, y1)) scaled to the map's H x W cells, so cell
    (r, c) is [c, c+1) x [r, r+1). Computed in float64: cheap, and exact enough that a point never changes
    cell by rounding.
    """
    (sh, sw), (h, w), (mh, mw) = _pair(img_size), grid, map_grid
    device = mappings.device
    a, b, c, d, e, f = mappings.to(torch.float64).reshape(-1, 1, 1, 1, 9)[..., :6].unbind(-1)  # each [B, 1, 1, 1]
    x0, y0, x1, y1 = footprints.to(device, torch.float64).reshape(-1, 1, 1, 1, 4).unbind(-1)
    sub = (torch.arange(points, dtype=torch.float64, device=device) + 0.5) / points
    ys = (torch.arange(h, dtype=torch.float64, device=device)[None, :] + sub[:, None]) * (sh / h)  # [s, h]
    xs = (torch.arange(w, dtype=torch.float64, device=device)[None, :] + sub[:, None]) * (sw / w)  # [s, w]
    y = ys[:, None, :, None].expand(points, points, h, w).reshape(-1, h, w)  # [s*s, h, w]
    x = xs[None, :, None, :].expand(points, points, h, w).reshape(-1, h, w)
    u = (a * x + b * y + c - x0) / (x1 - x0) * mw
    v = (d * x + e * y + f - y0) / (y1 - y0) * mh
    return torch.stack([u, v], dim=-1)


def _map_points(mappings: torch.Tensor, footprints: torch.Tensor, map_grid: tuple[int, int],
                img_size: int | tuple[int, int], grid: tuple[int, int], points: int,
                mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sample points (u, v) [B, P, h, w, 2], which lie inside the footprint [B, P, h, w], and (W, H) float64."""
    if mode not in RESAMPLE_MODES:
        raise UserError(f"token label resampling mode {mode!r} is unknown; use one of {RESAMPLE_MODES}")
    uv = map_coordinates(mappings, footprints, map_grid, img_size, grid, points)
    size = torch.stack([uv.new_full((), map_grid[1]), uv.new_full((), map_grid[0])])  # made on the device, not sent
    return uv, ((uv >= 0) & (uv < size)).all(-1), size


def resample_maps(probs: torch.Tensor, mappings: torch.Tensor, footprints: torch.Tensor,
                  img_size: int | tuple[int, int], grid: tuple[int, int], points: int = 2,
                  mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token class distributions [B, K, h, w] and a validity mask [B, h, w] from per-cell ones [B, K, H, W].

    Each token averages its points**2 sample points (see `map_coordinates`). mode="nearest": a point reads the
    cell it falls in, so the token gets the cells it overlaps weighted by (approximately, points**2 samples)
    the area it sees of each: a cell is the labeler's verdict on its whole patch. mode="bilinear": a point
    interpolates between the four nearest cell centres (edge cells extend to the footprint's edge).
    points=1 with "nearest" is the plain token-centre lookup.

    A point outside the footprint contributes nothing; a token is valid when at least one point lands inside
    the footprint on a labelled cell (cells with all-zero distributions, i.e. skipped rows, carry no label).
    Invalid tokens get all-zero distributions. Runs batched on the tensors' device (F.grid_sample with
    align_corners=False: normalised -1 and +1 are the map's outer edges, so u cells -> 2 u / W - 1).
    """
    uv, inside, size = _map_points(mappings.to(probs.device), footprints, probs.shape[2:], img_size, grid, points,
                                   mode)
    # nearest: the centre of the cell a point falls in (no rounding ties inside grid_sample); bilinear: clamped
    # to the outer cell centres (border padding); outside points go far off the map, where zero padding reads 0
    uv = uv.floor() + 0.5 if mode == "nearest" else uv.clamp(min=0.5).minimum(size - 0.5)
    norm = torch.where(inside[..., None], uv / size * 2 - 1, -4.0).to(probs.dtype)
    out = sum(F.grid_sample(probs, norm[:, i], mode=mode, padding_mode="zeros", align_corners=False)
              for i in range(norm.shape[1]))
    if points > 1:
        out /= inside.sum(1, keepdim=True).clamp(min=1).to(probs.dtype)
    return out, out.sum(1) > 0


def cell_taps(mappings: torch.Tensor, footprints: torch.Tensor, map_grid: tuple[int, int],
              img_size: int | tuple[int, int], grid: tuple[int, int], points: int = 2,
              mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`resample_maps` as a sparse operator: which cells each token reads, with what weight, and its divisor.

    Returns cells [B, T, h, w] (int64, flat r * W + c), weights [B, T, h, w] (float64) and points inside
    [B, 1, h, w] (float64, at least 1): a token's distribution is sum_t weights[t] map[cells[t]] / inside, as
    resample_maps computes it (which divides only when points > 1). "nearest": T = points**2 taps, point-major,
    weight 1 for a point inside the footprint, 0 outside. "bilinear": T = 4 points**2, the four cell centres
    around each point (clamped to the outer centres as there) with their bilinear weights, 0 outside.
    """
    uv, inside, size = _map_points(mappings, footprints, map_grid, img_size, grid, points, mode)
    mw = map_grid[1]
    count = inside.sum(1, keepdim=True).clamp(min=1).to(uv.dtype)
    if mode == "nearest":
        cell = torch.minimum(uv.floor(), size - 1).clamp(min=0).long()
        return cell[..., 1] * mw + cell[..., 0], inside.to(uv.dtype), count
    x = uv.clamp(min=0.5).minimum(size - 0.5) - 0.5  # in cell-centre units, in [0, W - 1]
    lo = x.floor()
    frac = x - lo
    lo = lo.long()
    hi = torch.minimum(lo + 1, size.long() - 1)  # at the last centre frac = 0: the clamped tap weighs nothing
    ends = torch.stack([lo, hi])  # [2, B, P, h, w, 2]: the centres left/above and right/below
    shares = torch.stack([1 - frac, frac])
    cells = ends[:, None, ..., 1] * mw + ends[None, :, ..., 0]  # [2 (row), 2 (column), B, P, h, w]
    weights = shares[:, None, ..., 1] * shares[None, :, ..., 0] * inside
    b, p, h, w = inside.shape
    return (cells.permute(2, 0, 1, 3, 4, 5).reshape(b, 4 * p, h, w),
            weights.permute(2, 0, 1, 3, 4, 5).reshape(b, 4 * p, h, w), count)
