"""Boxes of an original image: the one eval view and footprint rule, the token shift, what lies beyond the image.

The eval view is the centred square of side crop_pct x the shorter side, at S x S: timm's eval crop (shorter side
to S / crop_pct, then the central S x S) without its integer rounding, the box exact in continuous pixel
coordinates and resampled to S x S in one antialiased resize. A labeler's map covers this box (its footprint);
evaluation of labelers and students, and the dump's labeler input, all see it. A labeler whose token lattice is
off-centre (labeler.receptive) sees the box shifted by a fraction of a token, so that each token's centre falls on
the centre of its cell; where a box reaches beyond the image, the image is extended by the fill colour.
"""

import math
from collections.abc import Sequence

from common.errors import UserError

Box = tuple[float, float, float, float]
SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "nearest": 0.5}  # source pixels a PIL filter reaches (x the downscale)


def check_crop_pct(crop_pct: float) -> float:
    """crop_pct itself, refused in one line unless it is in (0, 1]."""
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return crop_pct


def centre_box(width: int, height: int, crop_pct: float = 1.0) -> Box:
    """(x0, y0, x1, y1): the centred square of side crop_pct x min(width, height), in continuous pixel coordinates."""
    side = crop_pct * min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def shifted(box: Box, shift: float, size: int) -> Box:
    """`box` moved right and down by `shift` pixels of its size x size rendering."""
    x0, y0, x1, y1 = box
    dx, dy = shift * (x1 - x0) / size, shift * (y1 - y0) / size
    return x0 + dx, y0 + dy, x1 + dx, y1 + dy


def outside(box: Box, width: int, height: int) -> bool:
    """Whether the box reaches beyond a width x height image."""
    x0, y0, x1, y1 = box
    return x0 < 0 or y0 < 0 or x1 > width or y1 > height


def padding(box: Box, size: int, width: int, height: int) -> int:
    """Fill pixels to add on each side of an image that `box` reaches beyond (0 for a box inside it): enough that
    the widest resampling filter never reaches the padded canvas's own edge."""
    if not outside(box, width, height):
        return 0
    x0, y0, x1, y1 = box
    scale = max((x1 - x0) / size, (y1 - y0) / size, 1.0)
    return math.ceil(max(-x0, -y0, x1 - width, y1 - height) + max(SUPPORT.values()) * scale) + 1


def fill_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """What pixels beyond the image show: the normalisation mean as uint8 RGB, timm's rule (min(255, round(255 m)),
    Python's round: halves to even)."""
    return tuple(min(255, round(255 * m)) for m in mean)
