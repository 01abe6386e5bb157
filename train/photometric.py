"""RandAugment's photometric ops on batched tensors on any device, computed as PIL computes them.

Images are float [n, 3, H, W] tensors holding 0..255 levels (what PIL's uint8 images hold); each op takes a batch
and one argument per image (a host array: timm's drawn level argument, see train.augment.Draw) and returns levels.
Lookup-table ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast) build
one table per image and channel and gather through it; blends follow PIL's Image.blend (float32, truncated) with
PIL's degenerate images (black, the rounded mean grey, the greyscale image, the SMOOTH-filtered image);
GaussianBlur is PIL's box passes in its fixed-point arithmetic. Each equals PIL's result exactly
(tests/test_device_augment.py).
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.imaging.device import to_device

LEVELS = 256


def _factor(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """The per-image arguments as float32 [n, 1, 1, 1] on x's device (PIL blends in float32)."""
    return to_device(args.astype(np.float32).reshape(-1, 1, 1, 1), x.device)


def _through(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each image's channels through their own lookup table [n, 3 or 1, 256]."""
    n, c, h, w = x.shape
    return table.expand(n, c, LEVELS).gather(2, x.long().view(n, c, h * w)).view(n, c, h, w).to(x.dtype)


def _ramp(x: torch.Tensor) -> torch.Tensor:
    """The 256 input levels, [1, 1, 256] float64 on x's device."""
    return torch.arange(LEVELS, dtype=torch.float64, device=x.device).view(1, 1, LEVELS)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor): degenerate + factor (x - degenerate), truncated to levels."""
    return (degenerate + factor * (x - degenerate)).floor_().clamp_(0, 255)


def grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion, [n, 1, H, W] levels (fixed point: exact in float32, below 2**24)."""
    r, g, b = x.unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor_()[:, None]


def auto_contrast(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255]; a flat channel stays."""
    lo, hi = x.amin((2, 3)).double()[..., None], x.amax((2, 3)).double()[..., None]
    scale = 255.0 / (hi - lo).clamp(min=1)
    table = (_ramp(x) * scale - lo * scale).floor().clamp(0, 255)
    return _through(x, torch.where(hi > lo, table, _ramp(x)))


def equalize(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """ImageOps.equalize: each channel's cumulative histogram, in PIL's integer steps."""
    n = x.shape[0]
    bins = x.long().flatten(2) + LEVELS * torch.arange(3 * n, device=x.device).view(n, 3, 1)
    hist = torch.bincount(bins.flatten(), minlength=3 * n * LEVELS).view(n, 3, LEVELS)
    last = (hist > 0).long().mul(torch.arange(LEVELS, device=x.device)).argmax(-1, keepdim=True)  # top used level
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    table = ((step // 2 + hist.cumsum(-1) - hist) // step.clamp(min=1)).clamp(0, 255)
    return _through(x, torch.where(step > 0, table.double(), _ramp(x)))


def invert(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """Keep the top `bits` bits (0 bits: black, as core.posterize)."""
    keep = 2.0 ** (8 - np.clip(args, 0, 8))
    step = to_device(keep.reshape(-1, 1, 1), x.device)
    return _through(x, (_ramp(x) / step).floor() * step)


def solarize(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """Invert the levels at or above the threshold."""
    threshold = to_device(args.astype(np.float64).reshape(-1, 1, 1), x.device)
    return _through(x, torch.where(_ramp(x) < threshold, _ramp(x), 255 - _ramp(x)))


def solarize_add(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """Add to the levels below 128, capped at 255."""
    add = to_device(args.astype(np.float64).reshape(-1, 1, 1), x.device)
    return _through(x, torch.where(_ramp(x) < 128, (_ramp(x) + add).clamp(max=255), _ramp(x)))


def brightness(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """ImageEnhance.Brightness: a blend with black."""
    return blend(torch.zeros_like(x[:1, :1, :1, :1]), x, _factor(x, args))


def contrast(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """ImageEnhance.Contrast: a blend with the image's mean grey, rounded to a level."""
    mean = grey(x).double().mean((1, 2, 3), keepdim=True).add_(0.5).floor_().float()
    return blend(mean, x, _factor(x, args))


def color(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """ImageEnhance.Color: a blend with the greyscale image."""
    return blend(grey(x), x, _factor(x, args))


def desaturate(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """timm's Desaturate: ImageEnhance.Color at 1 - factor, within [0, 1]."""
    return color(x, np.clip(1.0 - args, 0.0, 1.0))


def sharpness(x: torch.Tensor, args: np.ndarray) -> torch.Tensor:
    """ImageEnhance.Sharpness: a blend with ImageFilter.SMOOTH's output (kernel 1 1 1 / 1 5 1 / 1 1 1 over 13,
    rounded; the border row and column stay)."""
    rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # 3 x 3 sums, exact in float32
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = ((box + 4 * x[..., 1:-1, 1:-1]) / 13).add_(0.5).floor_()
    return blend(degenerate, x, _factor(x, args))


def _box_radius(radius: float, passes: int = 3) -> np.float32:
    """The extended box radius of PIL's GaussianBlur(radius) in `passes` passes (Gwosdek et al.), in PIL's float32."""
    f = np.float32
    sigma2 = f(radius) * f(radius) / f(passes)
    whole = np.floor((np.sqrt(f(12) * sigma2 + f(1)) - f(1)) / f(2))
    part = (f(2) * whole + f(1)) * (whole * (whole + f(1)) - f(3) * sigma2) / (f(6) * (sigma2 - (whole + f(1)) ** 2))
    return whole + part


def _box_taps(radius: np.float32, half: int) -> np.ndarray:
    """One box pass's 24-bit fixed-point weights (PIL's BoxBlur): 2 half + 1 taps, the box's middle 2 r + 1 equal,
    the next two the fractional part's share, then zeros."""
    whole = int(radius)
    middle = int(np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1)))
    edge = ((1 << 24) - (2 * whole + 1) * middle) // 2
    taps = np.zeros(2 * half + 1)
    taps[half - whole - 1:half + whole + 2] = [edge] + [middle] * (2 * whole + 1) + [edge]
    return taps


def gaussian_blur(x: torch.Tensor, args: np.ndarray, passes: int = 3) -> torch.Tensor:
    """ImageFilter.GaussianBlur(radius): PIL's box passes, rows then columns, each with its fixed-point weights,
    rounding and repeated edges; each image with its own radius."""
    n, c, h, w = x.shape
    radii = [_box_radius(float(r), passes) for r in args]
    half = int(max(radii)) + 1
    taps = np.repeat(np.stack([_box_taps(r, half) for r in radii]), c, axis=0)  # one kernel per image and channel
    taps = to_device(taps, x.device).view(n * c, 1, 1, -1)
    flat = x.double().reshape(1, n * c, h, w)
    for kernel, pad in ((taps, (half, half, 0, 0)), (taps.transpose(2, 3), (0, 0, half, half))):
        for _ in range(passes):
            flat = F.conv2d(F.pad(flat, pad, mode="replicate"), kernel, groups=n * c).add_(1 << 23).div_(1 << 24)
            flat = flat.floor_()
    return flat.view(n, c, h, w).to(x.dtype)


# timm RandAugment op name -> the op on tensors (every photometric op a RandAugment config can draw)
TENSOR_OPS: dict[str, Callable[[torch.Tensor, np.ndarray], torch.Tensor]] = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Posterize": posterize, "PosterizeIncreasing": posterize, "PosterizeOriginal": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness, "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness, "Desaturate": desaturate, "GaussianBlur": gaussian_blur,
}
OP_NAMES = tuple(TENSOR_OPS)  # an op's code is its index here


def apply_ops(x: torch.Tensor, codes: np.ndarray, args: np.ndarray) -> torch.Tensor:
    """Each image's photometric ops in order: codes [n, L] (index into OP_NAMES, -1 for none) and their arguments
    [n, L], on the host; each op runs once per slot on the images that drew it (x is updated in place)."""
    for slot in range(codes.shape[1]):
        for code in np.unique(codes[:, slot]):
            if code < 0:
                continue
            op = TENSOR_OPS[OP_NAMES[code]]
            rows = np.flatnonzero(codes[:, slot] == code)
            if len(rows) == len(x):
                x = op(x, args[rows, slot])
                continue
            index = to_device(rows, x.device)
            x.index_copy_(0, index, op(x.index_select(0, index), args[rows, slot]))
    return x
