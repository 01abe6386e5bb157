"""ImageNet-C corruptions for evaluation (the `corrupt-tta` package): names, seeded application, and mCE."""

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from corrupt_tta import corrupt, corruption_dict

from common.errors import UserError

# one or two of each ImageNet-C family (noise, blur, weather, digital); all fast on small images
CORRUPTIONS = ("gaussian_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog", "snow", "contrast",
               "jpeg_compression")
SEVERITIES = (1, 3, 5)


def check_corruptions(names: Sequence[str], severities: Sequence[int] = SEVERITIES) -> tuple[str, ...]:
    """The corruption names of a command line, checked against corrupt-tta's (none, or `none` alone: clean only)."""
    names = () if list(names) == ["none"] else tuple(names)
    unknown = [name for name in names if name not in corruption_dict]
    if unknown:
        raise UserError(f"unknown corruption {unknown[0]!r}; choose from {', '.join(corruption_dict)} (or none)")
    bad = [s for s in severities if not 1 <= s <= 5]
    if bad:
        raise UserError(f"corruption severity {bad[0]} is out of range; ImageNet-C severities are 1 to 5")
    return names


def corrupt_pixels(pixels: np.ndarray, key: str, name: str, severity: int) -> np.ndarray:
    """uint8 [H, W, 3] pixels under corruption `name` at `severity`, with its noise seeded by the sample's key."""
    np.random.seed(zlib.crc32(f"{key}/{name}/{severity}".encode()))
    return np.clip(corrupt(pixels, severity, name), 0, 255).astype(np.uint8)


def check_baseline(baseline: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse a baseline eval that lacks any of the corruption/severity results `keys` ("name/severity")."""
    missing = [k for k in keys if k not in baseline.get("corrupted", {})]
    if not keys or missing:
        raise UserError(f"baseline eval has no result for {missing[0] if missing else 'any corruption'}; "
                        "evaluate both with the same --corruptions and --severities")


def mean_corruption_error(results: dict[str, Any], baseline: dict[str, Any]) -> float:
    """ImageNet-C mCE: per corruption, summed errors over severities relative to the baseline's; mean, in %."""
    check_baseline(baseline, list(results.get("corrupted", {})))
    ratios = []
    for name in sorted({key.split("/")[0] for key in results["corrupted"]}):
        keys = [k for k in results["corrupted"] if k.split("/")[0] == name]
        error = sum(100 - results["corrupted"][k] for k in keys)
        base_error = sum(100 - baseline["corrupted"][k] for k in keys)
        ratios.append(error / max(base_error, 1e-9))
    return 100.0 * float(np.mean(ratios))
