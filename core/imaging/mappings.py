"""3x3 mappings from output pixels to original-image points: the builders of each spatial op, and what an output
canvas reads of the image through one (the box of a plain resize, or the region of an affine warp)."""

import math

import numpy as np

from core.imaging.boxes import Box


def height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def affine(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    """The mapping (x, y) -> (a x + b y + c, d x + e y + f) as a 3x3 float64 matrix."""
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def crop_mapping(left: float, top: float, width: float, height: float, out_size: int | tuple[int, int]) -> np.ndarray:
    """Resize the box [left, left+width] x [top, top+height] to an output of out_size (int or (h, w))."""
    out_h, out_w = height_width(out_size)
    return affine(width / out_w, 0.0, left, 0.0, height / out_h, top)


def hflip_mapping(width: float) -> np.ndarray:
    """Mirror a canvas of this width left to right."""
    return affine(-1.0, 0.0, width, 0.0, 1.0, 0.0)


def _about_center(linear: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A linear map applied about the centre of a canvas of this size (int or (h, w))."""
    h, w = height_width(size)
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


def _preimage_box(mapping: np.ndarray, out_w: int, out_h: int) -> Box:
    """Bounding box (x0, y0, x1, y1) in the source of the output canvas [0, out_w] x [0, out_h]."""
    corners = mapping @ np.array([[0, out_w, 0, out_w], [0, 0, out_h, out_h], [1, 1, 1, 1]], dtype=np.float64)
    return corners[0].min(), corners[1].min(), corners[0].max(), corners[1].max()


def resize_box(m: np.ndarray, width: int, height: int, out_w: int, out_h: int) -> Box | None:
    """The source box of an axis-aligned mapping that stays inside the image (RandomResizedCrop, flips): rendering
    it is one antialiased resize of that box, as timm does it. None for any other mapping."""
    x0, y0, x1, y1 = _preimage_box(m, out_w, out_h)
    tol = 1e-3
    if m[0, 1] == 0 and m[1, 0] == 0 and x0 > -tol and y0 > -tol and x1 < width + tol and y1 < height + tol:
        return max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    return None


def shrink(m: np.ndarray) -> tuple[float, float]:
    """Source pixels per output pixel along the source's x and y axes; > 1 means the mapping shrinks the image."""
    inv = np.linalg.inv(m[:2, :2])
    return 1 / np.hypot(inv[0, 0], inv[1, 0]), 1 / np.hypot(inv[0, 1], inv[1, 1])


def warp_region(m: np.ndarray, width: int, height: int, out_w: int, out_h: int, min_margin: float = 0.0
                ) -> tuple[tuple[int, int, int, int], tuple[int, int], np.ndarray] | None:
    """What an affine warp reads: the integer region (x0, y0, x1, y1) of the image around the mapping's preimage
    (with a margin for the interpolation kernel, clipped to the image), the (height, width) to resize it to first
    (antialiased, so that the warp itself shrinks by at most 1 along each source axis), and the mapping from output
    pixels to pixels of that resized region. None when the output shows nothing of the image."""
    shrink_x, shrink_y = shrink(m)
    margin = max(3 * max(shrink_x, shrink_y), min_margin)  # room for the warp's interpolation kernel
    x0, y0, x1, y1 = _preimage_box(m, out_w, out_h)
    bx0, by0 = max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin))
    bx1, by1 = min(width, math.ceil(x1 + margin)), min(height, math.ceil(y1 + margin))
    if bx1 <= bx0 or by1 <= by0:
        return None
    rh, rw = math.ceil((by1 - by0) / max(shrink_y, 1.0)), math.ceil((bx1 - bx0) / max(shrink_x, 1.0))
    return (bx0, by0, bx1, by1), (rh, rw), np.linalg.inv(crop_mapping(bx0, by0, bx1 - bx0, by1 - by0, (rh, rw))) @ m
