"""A dump's job: what every decoder and labeler of one dump is given, the same for all of them."""

from dataclasses import dataclass
from typing import Any

import torch

from core.imaging.boxes import shifted
from dump.store.schema import footprint_box
from shards.manifest import Manifest

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODERS = ("cpu", "device")  # where images are decoded and resampled: the batch's maker, or the labeler's device


@dataclass(frozen=True)
class DumpJob:
    """Everything a decoder or labeler needs; the same for all of them, so any of them produces the same bytes."""

    manifest: Manifest
    split: str
    checkpoint: str
    store: str
    topk: int
    footprint: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    threads: int
    on_error: str
    device: str  # "cpu" or "cuda"
    precision: str  # a key of PRECISIONS
    decode: str  # one of DECODERS
    sha256: str  # of the checkpoint the driver read: a labeler refuses a file with other bytes (replaced meanwhile)

    def shard(self, position: int) -> tuple[str, int]:
        """(file name, sample count) of tar shard `position` of the split."""
        return self.manifest.shards(self.split)[position]

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of an original image the labeler sees: the store's footprint, shifted by the labeler's
        token offset (labeler.receptive) so that each token's centre lands on the centre of its cell."""
        footprint = self.footprint
        return shifted(footprint_box(footprint, width, height), footprint["shift"], footprint["input_size"])
