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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shards.errors import UserError

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


def warp_image(img: Image.Image, mapping: np.ndarray, size: int | tuple[int, int], resample: int,
               fill: tuple[int, ...]) -> Image.Image:
    """Render the output whose point (x, y) shows `img` at mapping @ (x, y, 1); outside `img` shows `fill`.

    PIL's resize(box=...) and transform(AFFINE) both use the continuous pixel convention above (verified in
    tests/test_geometry.py), so the rendered image realises the mapping exactly. An axis-aligned mapping inside
    the image (RandomResizedCrop, flips) is one antialiased resize, as timm does it; any other mapping is one
    affine warp, preceded, when it shrinks the image, by an antialiased resize of the region it reads, so that
    downscaling does not alias.
    """
    out_h, out_w = _pair(size)
    m = np.asarray(mapping, dtype=np.float64)
    width, height = img.size
    x0, y0, x1, y1 = _preimage_box(m, out_w, out_h)
    tol = 1e-3
    if m[0, 1] == 0 and m[1, 0] == 0 and x0 > -tol and y0 > -tol and x1 < width + tol and y1 < height + tol:
        box = (max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height))
        out = img.resize((out_w, out_h), resample, box=box)
        if m[0, 0] < 0:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if m[1, 1] < 0:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return out
    inv = np.linalg.inv(m[:2, :2])
    # source pixels per output pixel along the source's x and y axes; > 1 means the warp shrinks the image
    shrink_x, shrink_y = 1 / np.hypot(inv[0, 0], inv[1, 0]), 1 / np.hypot(inv[0, 1], inv[1, 1])
    if max(shrink_x, shrink_y) > 1:
        margin = 3 * max(shrink_x, shrink_y)  # room for the warp's interpolation kernel
        bx0, by0 = max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin))
        bx1, by1 = min(width, math.ceil(x1 + margin)), min(height, math.ceil(y1 + margin))
        if bx1 <= bx0 or by1 <= by0:
            return Image.new(img.mode, (out_w, out_h), fill)
        rw = math.ceil((bx1 - bx0) / max(shrink_x, 1.0))
        rh = math.ceil((by1 - by0) / max(shrink_y, 1.0))
        img = img.resize((rw, rh), resample, box=(bx0, by0, bx1, by1))
        m = np.linalg.inv(crop_mapping(bx0, by0, bx1 - bx0, by1 - by0, (rh, rw))) @ m
    return img.transform((out_w, out_h), Image.Transform.AFFINE, tuple(m[:2].ravel()), resample=resample,
                         fillcolor=fill)


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
