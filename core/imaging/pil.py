"""Rendering with PIL: a box of an image resampled to S x S (the eval view, the dump's labeler input), and an image
warped through a mapping (a student's training view)."""

import numpy as np
from PIL import Image

from core.imaging.boxes import Box, centre_box, padding, shifted
from core.imaging.mappings import height_width, resize_box, shrink, warp_region

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}  # name -> PIL filter


def render_box(image: Image.Image, box: Box, size: int, resample: int = Image.Resampling.BICUBIC,
               fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """`box` of `image` resampled to size x size; beyond the image, the image is extended by `fill`."""
    width, height = image.size
    pad = padding(box, size, width, height)
    if pad:
        canvas = Image.new(image.mode, (width + 2 * pad, height + 2 * pad), fill if image.mode == "RGB" else 0)
        canvas.paste(image, (pad, pad))
        image, box = canvas, tuple(v + pad for v in box)
    return image.resize((size, size), resample=resample, box=box)


def centre_view(image: Image.Image, size: int, crop_pct: float = 1.0, resample: int = Image.Resampling.BICUBIC,
                shift: float = 0.0, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """`image`'s centre_box, shifted by `shift` rendered pixels, resampled to size x size (masks: Image.NEAREST)."""
    return render_box(image, shifted(centre_box(*image.size, crop_pct), shift, size), size, resample, fill)


def labeler_input(image: Image.Image, box: Box, size: int, interpolation: str = "bicubic",
                  fill: tuple[int, ...] = (0, 0, 0)) -> np.ndarray:
    """The labeler's view of `box` of an RGB image: uint8 [S, S, 3], exactly the box resampled to S x S (the
    reference of core.imaging.device.render_boxes)."""
    return np.asarray(render_box(image, box, size, RESAMPLE[interpolation], fill))


def warp_image(img: Image.Image, mapping: np.ndarray, size: int | tuple[int, int], resample: int,
               fill: tuple[int, ...]) -> Image.Image:
    """Render the output whose point (x, y) shows `img` at mapping @ (x, y, 1); outside `img` shows `fill`.

    PIL's resize(box=...) and transform(AFFINE) both use the continuous pixel convention of core.imaging
    (verified in tests/test_geometry.py), so the rendered image realises the mapping exactly. An axis-aligned
    mapping inside the image (RandomResizedCrop, flips) is one antialiased resize, as timm does it; any other
    mapping is one affine warp, preceded, when it shrinks the image, by an antialiased resize of the region it
    reads, so that downscaling does not alias. core.imaging.device.warp_images does the same for a batch of
    tensors on any device.
    """
    out_h, out_w = height_width(size)
    m = np.asarray(mapping, dtype=np.float64)
    box = resize_box(m, *img.size, out_w, out_h)
    if box is not None:
        out = img.resize((out_w, out_h), resample, box=box)
        if m[0, 0] < 0:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if m[1, 1] < 0:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return out
    if max(shrink(m)) > 1:
        region = warp_region(m, *img.size, out_w, out_h)
        if region is None:
            return Image.new(img.mode, (out_w, out_h), fill)
        (bx0, by0, bx1, by1), (rh, rw), m = region
        img = img.resize((rw, rh), resample, box=(bx0, by0, bx1, by1))
    return img.transform((out_w, out_h), Image.Transform.AFFINE, tuple(m[:2].ravel()), resample=resample,
                         fillcolor=fill)
