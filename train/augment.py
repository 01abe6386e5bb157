"""Label-aware student transforms: every spatial op of a sample becomes one mapping, shared by image and label map.

Train view, in timm's order: RandomResizedCrop, horizontal flip, RandAugment (timm's op choice and magnitudes,
from a config string such as "rand-m9-mstd0.5-inc1"). The geometric RandAugment ops (Rotate, ShearX/Y,
TranslateX/Y, TranslateX/YRel) act on the output canvas and are folded into the mapping instead of warping
pixels; the image is then rendered once from the original with the whole mapping (core.imaging.pil.warp_image),
and the photometric ops run on that warped image, in their drawn order. Then ToTensor, Normalize and timm's
RandomErasing, none of which moves a pixel. Every random draw of a sample (`LabelAwareTransform.draw`: the mapping,
the filter, the photometric ops with their arguments, the erased boxes) comes before any pixel work, in the same
order as the chain draws them, so the same draw can be rendered by PIL in a DataLoader worker (`render`) or on the
training device (train.device_augment). Two deliberate differences from timm's chain of separate warps:
rotations and shears turn about the canvas centre (timm shears about the top-left corner, which also shifts
the image), and where they bring in image content from outside the crop window the real content shows
(like LV-ViT, whose RandAugment runs before its crop); only points outside the original image get the fill.

Each transform returns (image tensor [3, S, S], mapping float32 [3, 3]); see core.imaging for the mapping's
convention and train.geometry.cell_taps for turning it into per-token labels in the training step.
"""

import math
import random
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import NAME_TO_OP, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision.transforms import ColorJitter
from torchvision.transforms.functional import normalize, to_tensor

from common.errors import UserError
from core.imaging.boxes import centre_box, check_crop_pct, fill_colour
from core.imaging.mappings import (
    crop_mapping,
    hflip_mapping,
    rotate_mapping,
    shear_mapping,
    translate_mapping,
)
from core.imaging.pil import RESAMPLE, centre_view, warp_image
from core.posterize import POSTERIZE_OPS, posterize

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")


@dataclass(frozen=True)
class Draw:
    """One sample's drawn augmentation, everything but the erasing noise: rendering it is deterministic."""

    mapping: np.ndarray                    # float32 [3, 3]: output pixel -> original image (core.imaging)
    resample: int                          # the PIL filter the image is warped with
    ops: tuple[tuple[str, tuple], ...]     # photometric ops (timm names) with their arguments, in running order
    erase: tuple[tuple[int, int, int, int], ...]  # random erasing's boxes (top, left, height, width), in order


@dataclass(frozen=True)
class _Canvas:
    """Stands in for the image while RandAugment's ops run: the mapping so far on an S x S canvas, and the
    photometric ops applied so far with their drawn arguments."""

    size: int
    mapping: np.ndarray
    ops: tuple[tuple[str, tuple], ...] = ()

    def then(self, op: np.ndarray) -> "_Canvas":
        return _Canvas(self.size, self.mapping @ op, self.ops)

    def paint(self, name: str, args: tuple) -> "_Canvas":
        return _Canvas(self.size, self.mapping, self.ops + ((name, args),))


def _rotate(canvas: _Canvas, degrees: float, **_) -> _Canvas:
    return canvas.then(rotate_mapping(degrees, canvas.size))


def _shear_x(canvas: _Canvas, factor: float, **_) -> _Canvas:
    return canvas.then(shear_mapping(factor, 0.0, canvas.size))


def _shear_y(canvas: _Canvas, factor: float, **_) -> _Canvas:
    return canvas.then(shear_mapping(0.0, factor, canvas.size))


def _translate_x(canvas: _Canvas, pixels: float, **_) -> _Canvas:
    return canvas.then(translate_mapping(pixels, 0.0))


def _translate_y(canvas: _Canvas, pixels: float, **_) -> _Canvas:
    return canvas.then(translate_mapping(0.0, pixels))


def _translate_x_rel(canvas: _Canvas, pct: float, **_) -> _Canvas:
    return canvas.then(translate_mapping(pct * canvas.size, 0.0))


def _translate_y_rel(canvas: _Canvas, pct: float, **_) -> _Canvas:
    return canvas.then(translate_mapping(0.0, pct * canvas.size))


# timm RandAugment op name -> the same op acting on the mapping; every other op is photometric
GEOMETRIC_OPS = {
    "Rotate": _rotate,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}


def _record(canvas: _Canvas, *args, name: str, **_) -> _Canvas:
    """A photometric op as RandAugment drew it (it passed its probability; its arguments from the drawn magnitude)."""
    return canvas.paint(name, args)


# timm's PIL function of every photometric op (posterize made safe at 0 bits)
PIL_OPS = {**NAME_TO_OP, **dict.fromkeys(POSTERIZE_OPS, posterize)}
# ColorJitter's ops by its fn_idx (brightness, contrast, saturation; hue is off), as the same PIL enhancements
JITTER_OPS = ("Brightness", "Contrast", "Color")
FILTERS = {pil: name for name, pil in RESAMPLE.items()}  # PIL filter -> its name


def _erase_boxes(erase: RandomErasing, height: int, width: int) -> tuple[tuple[int, int, int, int], ...]:
    """The boxes (top, left, height, width) timm's RandomErasing erases in a height x width image, drawn exactly as
    it draws them (Python's random); the noise that fills them is drawn where they are applied."""
    if random.random() > erase.probability:
        return ()
    count = erase.min_count if erase.min_count == erase.max_count else random.randint(erase.min_count, erase.max_count)
    boxes = []
    for _ in range(count):
        for _ in range(10):
            area = random.uniform(erase.min_area, erase.max_area) * height * width / count
            aspect = math.exp(random.uniform(*erase.log_aspect_ratio))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                boxes.append((random.randint(0, height - h), random.randint(0, width - w), h, w))
                break
    return tuple(boxes)


def _pil_resample(interpolation: str) -> int | tuple[int, int]:
    """A PIL filter, or the (bilinear, bicubic) pair to choose from per sample for "random"."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation {interpolation!r} is unknown; use one of {INTERPOLATIONS}")
    if interpolation == "random":
        return Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
    return str_to_pil_interp(interpolation)


def _label_aware_rand_augment(config: str, img_size: int, fill: tuple[int, ...], interpolation: str):
    """timm's RandAugment for `config`, its ops acting on a _Canvas: the geometric ones on its mapping, the
    photometric ones recorded with their drawn arguments."""
    if not config.startswith("rand"):
        raise UserError(f"auto_augment {config!r}: only RandAugment configs ('rand-...') are label-aware; "
                        "use e.g. 'rand-m9-mstd0.5-inc1' or none")
    hparams = {"translate_const": int(img_size * 0.45), "img_mean": fill}
    if interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    try:
        augment = rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as e:
        raise UserError(f"auto_augment {config!r} is not a valid timm RandAugment config ({e!r})") from None
    for op in augment.ops:
        op.aug_fn = GEOMETRIC_OPS[op.name] if op.name in GEOMETRIC_OPS else partial(_record, name=op.name)
    return augment


class LabelAwareTransform:
    """Training view of one image: (normalised tensor [3, S, S], mapping float32 [3, 3] output -> original).

    Picklable; per-sample work is drawing parameters, composing 3x3 matrices and one warp of the image.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", color_jitter: float | None = 0.4,
                 interpolation: str = "bicubic", mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: tuple[float, ...] = IMAGENET_DEFAULT_STD, re_prob: float = 0.25, re_mode: str = "pixel",
                 re_count: int = 1):
        self.img_size = img_size
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.resample = _pil_resample(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)
        self.fill = fill_colour(self.mean)
        self.augment = (_label_aware_rand_augment(auto_augment, img_size, self.fill, interpolation)
                        if auto_augment else None)
        # as in timm, colour jitter only when RandAugment is off
        self.color_jitter = ColorJitter(*(color_jitter,) * 3) if color_jitter and not auto_augment else None
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu") if re_prob > 0 else None

    def draw(self, img: Image.Image) -> Draw:
        """Every random draw of the sample, in the chain's order; only the image's size is read (it may be opened
        without decoding)."""
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        canvas = _Canvas(self.img_size, crop_mapping(left, top, width, height, self.img_size))
        if random.random() < self.hflip:
            canvas = canvas.then(hflip_mapping(self.img_size))
        photometric = []
        if self.augment is not None:
            augment = self.augment
            replace = augment.choice_weights is None
            for op in np.random.choice(augment.ops, augment.num_layers, replace=replace, p=augment.choice_weights):
                if op.name in GEOMETRIC_OPS:
                    canvas = op(canvas)
                else:
                    photometric.append(op)
        resample = random.choice(self.resample) if isinstance(self.resample, tuple) else self.resample
        for op in photometric:  # drawn after the whole mapping, as the chain draws them when it runs them
            canvas = op(canvas)
        if self.color_jitter is not None:
            jitter = self.color_jitter
            order, *factors = ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, None)
            for fn in order.tolist():
                if fn < len(JITTER_OPS) and factors[fn] is not None:
                    canvas = canvas.paint(JITTER_OPS[fn], (factors[fn],))
        erase = _erase_boxes(self.erase, self.img_size, self.img_size) if self.erase is not None else ()
        return Draw(canvas.mapping.astype(np.float32), resample, canvas.ops, erase)

    def render(self, img: Image.Image, draw: Draw) -> torch.Tensor:
        """The drawn view of an RGB image with PIL: warp, photometric ops, ToTensor, Normalize, erasing (its noise
        from torch's global RNG, as timm's)."""
        out = warp_image(img, draw.mapping, self.img_size, draw.resample, self.fill)
        for name, args in draw.ops:
            out = PIL_OPS[name](out, *args)
        x = normalize(to_tensor(out), self.mean, self.std)
        for top, left, h, w in draw.erase:
            x[:, top:top + h, left:left + w] = self.erase_noise((3, h, w))
        return x

    def erase_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """What random erasing writes into a [..., 3, h, w] region: per-pixel normal noise ("pixel"), one normal
        colour per box ("rand") or zeros ("const"), as timm's RandomErasing."""
        if self.erase.per_pixel:
            return torch.randn(shape, generator=generator, device=device)
        if self.erase.rand_color:
            return torch.randn((*shape[:-2], 1, 1), generator=generator, device=device)
        return torch.zeros((*shape[:-2], 1, 1), device=device)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        img = img if img.mode == "RGB" else img.convert("RGB")
        draw = self.draw(img)
        return self.render(img, draw), draw.mapping

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, augment={self.augment}, color_jitter={self.color_jitter}, "
                f"erase={self.erase})")


class LabelAwareEvalTransform:
    """Eval view (core.imaging.boxes: the centred square of side crop_pct * shorter side at S x S) with its mapping, as
    (normalised tensor [3, S, S], mapping float32 [3, 3]). crop_pct=1 is the view a labeler's footprint
    describes (dump.store.schema.footprint_box)."""

    def __init__(self, img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD):
        if interpolation == "random":
            raise UserError("interpolation 'random' is for training; use 'bicubic' or 'bilinear' for eval")
        self.img_size, self.crop_pct = img_size, check_crop_pct(crop_pct)
        self.resample = _pil_resample(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        img = img if img.mode == "RGB" else img.convert("RGB")
        x0, y0, x1, y1 = centre_box(*img.size, self.crop_pct)
        mapping = crop_mapping(x0, y0, x1 - x0, y1 - y0, self.img_size).astype(np.float32)
        out = centre_view(img, self.img_size, self.crop_pct, self.resample)
        return normalize(to_tensor(out), self.mean, self.std), mapping

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, crop_pct={self.crop_pct})"
