"""The labeler's input rendering: PIL on the CPU and the batched torch path (the GPU's) against each other."""

import numpy as np
import pytest
import torch
from PIL import Image

from core.imaging.device import normalise, render_boxes
from core.imaging.pil import labeler_input
from dump.store.schema import footprint_box, make_footprint

FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A 100 x 60 image with structure at every scale: noise over gradients."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 150, 100)[None, :, None] + np.linspace(0, 60, 60)[:, None, None]
    return Image.fromarray(np.clip(rng.random((60, 100, 3)) * 160 + ramp, 0, 255).astype(np.uint8))


def test_the_footprint_is_exactly_the_box_resampled(image):
    for crop_pct, box in ((1.0, (20, 0, 80, 60)), (0.5, (35, 15, 65, 45))):
        footprint = make_footprint(32, crop_pct)
        assert footprint_box(footprint, *image.size) == box
        got = labeler_input(image, box, 32, "bicubic", FILL)
        want = np.asarray(image.crop(box).resize((32, 32), Image.BICUBIC))
        # away from the border the filter sees only pixels inside the box: equal to cropping first, exactly
        # (at the border the resample also weighs the pixels just outside the box, as it should)
        np.testing.assert_array_equal(got[3:-3, 3:-3], want[3:-3, 3:-3])
        assert not np.array_equal(got, want)


def test_a_box_beyond_the_image_shows_the_fill_colour(image):
    out = labeler_input(image, (-40.0, 10.0, -20.0, 30.0), 8, "bicubic", FILL)  # wholly left of the image
    assert (out == np.array(FILL, np.uint8)).all()
    half = labeler_input(image, (-30.0, 0.0, 30.0, 60.0), 16, "bilinear", FILL)  # half outside
    assert (half[:, :6] == np.array(FILL, np.uint8)).all() and not (half[:, 10:] == np.array(FILL, np.uint8)).all()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("box, size", [
    ((20.0, 0.0, 80.0, 60.0), 32),        # the footprint: downscale
    ((37.5, 2.25, 61.25, 26.0), 64),      # fractional box: upscale
    ((-7.5, -3.0, 70.0, 74.5), 24),       # reaching beyond the image on three sides
    ((0.0, 0.0, 100.0, 60.0), 100),       # the whole image, non-square
])
def test_batched_torch_rendering_equals_pil_up_to_rounding(image, interpolation, box, size):
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    other = torch.from_numpy(np.array(image.transpose(Image.Transpose.ROTATE_90))).permute(2, 0, 1)  # 60 x 100
    got = render_boxes([tensor, other], [box, box], size, interpolation, FILL)
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    for rendered, source in zip(got, (image, image.transpose(Image.Transpose.ROTATE_90))):
        want = labeler_input(source, box, size, interpolation, FILL).astype(np.float32)
        diff = np.abs(rendered.permute(1, 2, 0).numpy() - want)
        assert diff.max() <= 1 and diff.mean() < 0.2  # PIL's fixed-point arithmetic


def test_normalise_is_timms():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalise(pixels, mean, std)
    want = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.equal(x, want)
