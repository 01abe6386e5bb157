"""The one eval view and footprint rule: the centred square of side crop_pct x the shorter side, at S x S.

This is timm's eval crop (shorter side to S / crop_pct, then the central S x S) without its integer rounding:
the box is exact in continuous pixel coordinates (pixel (row i, col j) covers [j, j+1] x [i, i+1]) and is
resampled to S x S in one antialiased resize. A labeler's map covers this box (its footprint); evaluation of
labelers and students, and the dump's labeler input, all see it.
"""

from PIL import Image

from shards.errors import UserError


def check_crop_pct(crop_pct: float) -> float:
    """crop_pct itself, refused in one line unless it is in (0, 1]."""
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return crop_pct


def centre_box(width: int, height: int, crop_pct: float = 1.0) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the centred square of side crop_pct x min(width, height), in continuous pixel coordinates."""
    side = crop_pct * min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def centre_view(image: Image.Image, size: int, crop_pct: float = 1.0,
                resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """`image`'s centre_box resampled to size x size (masks: pass Image.NEAREST)."""
    return image.resize((size, size), resample=resample, box=centre_box(*image.size, crop_pct))
