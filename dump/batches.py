"""A tar shard's fixed batches, and what a labeler makes of one, as Ray Data rows.

A batch is rows [start, stop) of one tar shard, start a multiple of the batch size. Its composition depends on
the manifest and the batch size only, never on scheduling, so a resumed or retried dump labels each sample in
the same batch as an uninterrupted one and writes the same bits (same device and precision). Decoding happens
where the batch is made (CPU: PIL decode + footprint resample to uint8) or on the labeler's device (the batch
then carries the encoded bytes: nvJPEG decode and the resample run there; dump.batch_labeler).
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from core.imaging.boxes import fill_colour
from core.imaging.pil import labeler_input
from dump.job import DumpJob
from shards.reader import IMAGE_KEYS, CorruptSample, SkipLog, decode_sample, read_shard


class Row:
    """A dataclass as one Ray Data row (lists of strings as JSON text), and back."""

    def to_columns(self) -> dict[str, np.ndarray]:
        """This row as a one-row batch: each field a length-1 column."""
        columns = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                columns[f.name] = value[None]
            else:
                columns[f.name] = np.array([json.dumps(value) if isinstance(value, list) else value])
        return columns

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Any:
        """The dataclass from a row's values (as Ray Data's iter_rows gives them, or a one-row batch's [0])."""
        values = {}
        for f in fields(cls):
            value = row[f.name]
            values[f.name] = (json.loads(value) if f.type == list[str] else
                              np.asarray(value) if f.type is np.ndarray else f.type(value))
        return cls(**values)


@dataclass
class Batch(Row):
    """Rows [start, stop) of tar shard `position`; `rows` (shard-relative) of them decoded, the rest skipped.

    CPU decode: `pixels` uint8 [n, S, S, 3]. Device decode: `pixels` is the n encoded images end to end, image i
    at bytes offsets[i]:offsets[i + 1].
    """

    position: int
    start: int
    stop: int
    rows: np.ndarray
    keys: list[str]
    pixels: np.ndarray
    offsets: np.ndarray
    skipped: list[str] = field(default_factory=list)  # "key: reason" of rows skipped as corrupt
    decoded_on: str = "local"


@dataclass
class Labelled(Row):
    """The labeler's top-k maps of a batch's decoded rows: scores float16 and classes int32, [n, k, H, W]."""

    position: int
    start: int
    stop: int
    rows: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    skipped: list[str]
    decoded_on: str
    labelled_on: str


def shard_batches(job: DumpJob, position: int, decoded_on: str = "local") -> Iterator[Batch]:
    """The fixed batches of one tar shard, decoded for the job (a corrupt sample raises or is skipped, per job)."""
    filename, count = job.shard(position)
    first = job.manifest.offsets(job.split)[position]
    skips = SkipLog()
    decode = encoded_image if job.decode == "device" else lambda raw: rendered_image(job, raw)
    samples = read_shard(job.manifest.root, job.split, filename, job.on_error, skips, job.manifest, decode)
    upcoming = next(samples, None)
    for start in range(0, count, job.batch_size):
        stop = min(start + job.batch_size, count)
        group = []
        while upcoming is not None and upcoming["index"] - first < stop:
            group.append(upcoming)
            upcoming = next(samples, None)
        images = [s["image"] for s in group]
        if job.decode == "device":
            offsets = np.cumsum([0] + [len(b) for b in images], dtype=np.int64)
            pixels = np.frombuffer(b"".join(images), dtype=np.uint8)
        else:
            size = job.footprint["input_size"]
            offsets = np.zeros(0, np.int64)
            pixels = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        skipped = [f"{key}: {reason}" for _, key, reason in skips.skipped]
        skips.skipped.clear()
        yield Batch(position, start, stop, np.array([s["index"] - first for s in group], np.int64),
                    [s["key"] for s in group], pixels, offsets, skipped, decoded_on)


def rendered_image(job: DumpJob, raw: dict[str, Any]) -> dict[str, Any]:
    """A tar sample decoded with PIL and its footprint resampled to the labeler's uint8 input."""
    sample = decode_sample(raw)
    image = sample["image"]
    size, interpolation = job.footprint["input_size"], job.footprint["interpolation"]
    pixels = labeler_input(image, job.source_box(*image.size), size, interpolation, fill_colour(job.mean))
    return {"key": sample["key"], "image": pixels}


def encoded_image(raw: dict[str, Any]) -> dict[str, Any]:
    """A tar sample's image bytes as they are, for decoding on the labeler's device."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise CorruptSample("sample lacks an image (.jpg/.jpeg/.png)")
    return {"key": raw["__key__"], "image": raw[image_key]}
