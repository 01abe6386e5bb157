"""Token-label quality per map cell against object masks: target cells, other-object cells, background cells.

A label map is judged by what each of its cells shows:
- target cells (mostly covered by the object the image is labelled with): is their top-1 the image class?
- other-object cells (mostly covered by another object, e.g. a distractor digit): is their top-1 that object's own
  class? A labeler that repeats the image class everywhere scores 0 here.
- background cells (no object pixel at all): how often do they say the image class, and how confident are they
  compared with object cells?
Cells partly on an object (at most half) are left out. Confidence is the top-1 probability of the softmax over a
cell's top-k logits (k=5 unless said), which is what a label store keeps, so a labeler's report and its store's
agree.
"""

from dataclasses import dataclass

import numpy as np
import torch

BACKGROUND, MIXED = -1, -2  # cell_truth's values for a cell with no object pixel / one that is not scored
OBJECT_SHARE = 0.5  # a cell is on an object when more than this share of its pixels is
QUALITY_K = 5
SUMS = ("target_correct", "target_cells", "other_correct", "other_cells", "background_image_class",
        "background_cells", "object_confidence", "background_confidence")


def cell_truth(mask: np.ndarray, box: tuple[float, float, float, float], grid: tuple[int, int]) -> np.ndarray:
    """What each cell of an H x W map over `box` shows: int64 [H * W], row-major.

    mask: [h, w] class + 1 per pixel (0 = background), in the original image's pixels; box: (x0, y0, x1, y1), the
    map's footprint in that image's continuous coordinates. A pixel belongs to the cell its centre falls in (pixels
    outside the footprint to none). A cell's value is its majority class when object pixels are more than
    OBJECT_SHARE of its pixels, BACKGROUND when it has no object pixel, else MIXED (also for a cell without pixels).
    """
    h, w = mask.shape
    height, width = grid
    x0, y0, x1, y1 = box
    col = np.floor(((np.arange(w) + 0.5) - x0) / (x1 - x0) * width).astype(np.int64)
    row = np.floor(((np.arange(h) + 0.5) - y0) / (y1 - y0) * height).astype(np.int64)
    inside = (row[:, None] >= 0) & (row[:, None] < height) & (col[None, :] >= 0) & (col[None, :] < width)
    cell = (row[:, None] * width + col[None, :])[inside]
    values = mask[inside].astype(np.int64)
    depth = int(values.max(initial=0)) + 1
    counts = np.bincount(cell * depth + values, minlength=height * width * depth).reshape(height * width, depth)
    pixels, objects = counts.sum(1), counts[:, 1:].sum(1)
    majority = counts[:, 1:].argmax(1) if depth > 1 else np.zeros(height * width, np.int64)
    truth = np.where(objects > OBJECT_SHARE * pixels, majority, MIXED)
    return np.where((objects == 0) & (pixels > 0), BACKGROUND, truth)


def top1_confidence(logits: torch.Tensor, k: int = QUALITY_K) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 class, its probability in the softmax over the top-k logits) along the last dim."""
    values, classes = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    return classes[..., 0], values.softmax(-1)[..., 0]


@dataclass
class LabelQuality:
    """Cell counts and confidence sums of the quality report, as one float64 tensor; add with `+`, then `rates()`.

    Kept on the device the predictions are on, so accumulating over batches never waits for the device.
    """

    sums: torch.Tensor

    @classmethod
    def zeros(cls, device: str | torch.device = "cpu") -> "LabelQuality":
        return cls(torch.zeros(len(SUMS), dtype=torch.float64, device=device))

    @classmethod
    def measure(cls, predicted: torch.Tensor, confidence: torch.Tensor, truth: torch.Tensor,
                labels: torch.Tensor) -> "LabelQuality":
        """predicted, confidence, truth [B, N] (truth from `cell_truth`), labels [B]: the image classes."""
        labels = labels.to(truth.device)[:, None]
        obj = truth >= 0
        target, other, background = obj & (truth == labels), obj & (truth != labels), truth == BACKGROUND
        right = predicted.to(truth.device) == truth
        says_image = predicted.to(truth.device) == labels
        confidence = confidence.to(truth.device, torch.float64)
        parts = [(right & target).sum(), target.sum(), (right & other).sum(), other.sum(),
                 (says_image & background).sum(), background.sum(), (confidence * obj).sum(),
                 (confidence * background).sum()]
        return cls(torch.stack([p.to(torch.float64) for p in parts]))

    def __add__(self, other: "LabelQuality") -> "LabelQuality":
        return LabelQuality(self.sums + other.sums.to(self.sums.device))

    def rates(self) -> dict[str, float | None]:
        """Percentages of cells, mean confidences in [0, 1], and the cell counts; None where there is no such cell."""
        s = dict(zip(SUMS, self.sums.tolist()))
        objects = s["target_cells"] + s["other_cells"]

        def share(part: float, whole: float, scale: float = 100.0) -> float | None:
            return scale * part / whole if whole else None

        return {"label_target_acc": share(s["target_correct"], s["target_cells"]),
                "label_other_acc": share(s["other_correct"], s["other_cells"]),
                "label_background_image_class": share(s["background_image_class"], s["background_cells"]),
                "label_object_confidence": share(s["object_confidence"], objects, 1.0),
                "label_background_confidence": share(s["background_confidence"], s["background_cells"], 1.0),
                "label_cells": {"target": int(s["target_cells"]), "other": int(s["other_cells"]),
                                "background": int(s["background_cells"])}}
