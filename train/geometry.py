"""A sample's label lookup: where each student token's sample points fall in the stored map, through the sample's
mapping (core.imaging's coordinates and mappings), and which cells they read with what weight.

A label map of H x W cells covers a footprint (x0, y0, x1, y1) of the original image; cell (r, c) covers
[x0 + c (x1 - x0) / W, x0 + (c + 1) (x1 - x0) / W) x [the same along y], half-open, so every point of the
footprint lies in exactly one cell.
"""

import torch

from common.errors import UserError
from core.imaging.mappings import height_width

RESAMPLE_MODES = ("nearest", "bilinear")


def map_coordinates(mappings: torch.Tensor, footprints: torch.Tensor, map_grid: tuple[int, int],
                    img_size: int | tuple[int, int], grid: tuple[int, int], points: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each token's sample points land in the label map, in cell units: (u, v) [B, points**2, h, w, 2], which
    of them lie inside the footprint [B, points**2, h, w], and the map's size (W, H) (float64, on the device).

    Token (r, c) of an h x w grid over an img_size input covers output pixels [c P_x, (c+1) P_x] x
    [r P_y, (r+1) P_y]; its points sit at the centres of a points x points split of that square (points=1: the
    token centre). Each goes through its sample's mapping (`mappings` [B, 3, 3]) to the original image, then
    into the footprint (`footprints` [B, 4] or [4], (x0, y0, x1, y1)) scaled to the map's H x W cells, so cell
    (r, c) is [c, c+1) x [r, r+1). Computed in float64: cheap, and exact enough that a point never changes
    cell by rounding.
    """
    (sh, sw), (h, w), (mh, mw) = height_width(img_size), grid, map_grid
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
    uv = torch.stack([u, v], dim=-1)
    size = torch.stack([uv.new_full((), mw), uv.new_full((), mh)])  # made on the device, not sent
    return uv, ((uv >= 0) & (uv < size)).all(-1), size


def cell_taps(mappings: torch.Tensor, footprints: torch.Tensor, map_grid: tuple[int, int],
              img_size: int | tuple[int, int], grid: tuple[int, int], points: int = 2,
              mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which cells each token reads, with what weight, and its divisor: a token's label is the mean over its
    points**2 sample points (`map_coordinates`) of what they read; a point outside the footprint reads nothing.

    Returns cells [B, T, h, w] (int64, flat r * W + c), weights [B, T, h, w] (float64) and points inside
    [B, 1, h, w] (float64, at least 1): a token's distribution is sum_t weights[t] map[cells[t]] / inside
    (tests/reference.py's resample_maps is the dense reference). "nearest": a point reads the cell it falls in
    (a token gets the cells it overlaps by about the area it sees of each; points=1 is the token-centre lookup),
    T = points**2 taps, point-major, weight 1 inside the footprint, 0 outside. "bilinear": a point interpolates
    the four cell centres around it (clamped to the outer centres: edge cells extend to the footprint's edge),
    T = 4 points**2 with their bilinear weights, 0 outside.
    """
    if mode not in RESAMPLE_MODES:
        raise UserError(f"token label resampling mode {mode!r} is unknown; use one of {RESAMPLE_MODES}")
    uv, inside, size = map_coordinates(mappings, footprints, map_grid, img_size, grid, points)
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
