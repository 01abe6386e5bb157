"""Evaluation samples: each image's eval view (core.imaging.boxes), optionally corrupted, and what its cells show.

One DataLoader streams a split once per setting (clean first, then each corruption and severity), every sample
tagged with its setting, so its workers start once and never idle between passes. Under torchrun each rank
reads its own shards of the split (the counts are summed over ranks).
"""

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import IterableDataset

from common.errors import UserError
from core.corruptions import corrupt_pixels
from core.imaging.boxes import centre_box, check_crop_pct, fill_colour
from core.imaging.pil import centre_view
from core.label_quality import cell_truth
from shards.reader import ShardReader


class EvalTransform:
    """Sample dict -> {"image": normalised [3, S, S], "cls"[, "truth": long [H * W]]}: the eval view (shifted by
    `shift` rendered pixels for a labeler whose tokens are off-centre), then an optional corruption (seeded by the
    key) on its uint8 pixels. With a token `grid`, also what each cell of the view's box shows according to the
    sample's mask (core.label_quality.cell_truth)."""

    def __init__(self, img_size: int, corruption: str | None = None, severity: int = 0, *, crop_pct: float = 1.0,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 shift: float = 0.0, grid: tuple[int, int] | None = None):
        self.img_size, self.corruption, self.severity = img_size, corruption, severity
        self.crop_pct, self.shift, self.grid = check_crop_pct(crop_pct), shift, grid
        self.fill = fill_colour(mean)
        self.mean = np.array(mean, np.float32) * 255
        self.std = np.array(std, np.float32) * 255

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        view = centre_view(sample["image"], self.img_size, self.crop_pct, shift=self.shift, fill=self.fill)
        pixels = np.asarray(view)
        if self.corruption:
            pixels = corrupt_pixels(pixels, sample["key"], self.corruption, self.severity)
        image = torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).astype(np.float32))
        out = {"image": image, "cls": sample["cls"]}
        if self.grid is not None:
            if sample["mask"] is None:
                raise UserError(f"{sample['key']}: no .mask.png although manifest.json says the dataset has masks")
            box = centre_box(*sample["image"].size, self.crop_pct)
            out["truth"] = torch.from_numpy(cell_truth(np.asarray(sample["mask"]), box, self.grid))
        return out


class EvalPasses(IterableDataset):
    """A split once per setting ((None, 0) = clean, else (corruption, severity)), each sample with its `setting`."""

    def __init__(self, shards: str | Path, split: str, img_size: int, settings: Sequence[tuple[str | None, int]],
                 **view: Any):
        self.readers = [ShardReader(shards, split, transform=EvalTransform(img_size, name, severity, **view))
                        for name, severity in settings]

    def __len__(self) -> int:
        return sum(len(reader) for reader in self.readers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for setting, reader in enumerate(self.readers):
            for sample in reader:
                yield {**sample, "setting": setting}
