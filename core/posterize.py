"""timm's posterize made safe at 0 bits, for every transform that draws RandAugment ops (labelers and students)."""

from typing import Any

from PIL import Image

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also at 0 bits (black, as Pillow < 13 gave; Pillow 13 raises, and timm's
    PosterizeIncreasing asks for 0 bits whenever the drawn magnitude reaches 10)."""
    if bits_to_keep >= 8:
        return img
    mask = (0xFF << (8 - max(bits_to_keep, 0))) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def safe_posterize(transform: Any) -> Any:
    """`transform` (a timm create_transform Compose, or a RandAugment) with its posterize ops made safe at 0 bits."""
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if op.name in POSTERIZE_OPS:
                op.aug_fn = posterize
    return transform
