"""The labelling code every engine drives: a tar shard's fixed batches, the labeler that labels one, the shard writer.

A batch is rows [start, stop) of one tar shard, start a multiple of the batch size. Its composition depends on
the manifest and the batch size only, never on scheduling, so a resumed or retried dump labels each sample in
the same batch as an uninterrupted one and writes the same bits (same device and precision). Decoding happens
where the batch is made (CPU: PIL decode + footprint resample to uint8) or on the labeler's device (the batch
then carries the encoded bytes: nvJPEG decode and the resample run there). Either way uint8 goes to the device
and is normalised there. The writer keeps each shard's rows until all of them are in, then writes them (whole
chunks, by this writer alone) and, once they are on disk, the shard's done flag (dump.store.write.write_shard).
"""

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import zarr

from common.errors import UserError
from core.eval_view import shifted
from dump.render import fill_colour, labeler_input, normalise, render_boxes, to_device
from dump.store.schema import footprint_box
from dump.store.write import write_shard
from labeler.load import load_labeler
from shards.manifest import Manifest
from shards.reader import (
    IMAGE_KEYS,
    CorruptSample,
    SkipLog,
    corrupt_error,
    decode_images,
    decode_sample,
    read_shard,
    shard_keys,
)

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


class BatchLabeler:
    """One labeler model on its device: labels batches (thread-safe; on a GPU each calling thread has its stream)."""

    def __init__(self, job: DumpJob, labelled_on: str = "local"):
        self.job, self.labelled_on = job, labelled_on
        self.device = torch.device(job.device)
        if self.device.type == "cpu":
            torch.set_num_threads(job.threads)
        torch.backends.cudnn.benchmark = False  # the same kernels on every run: bitwise resume
        torch.backends.cudnn.deterministic = True
        if self.device.type == "cuda" and job.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError(f"{torch.cuda.get_device_name(self.device)} has no bfloat16; pass --precision fp16")
        self.model, _ = load_labeler(job.checkpoint, self.device, job.sha256)
        self.dtype = PRECISIONS[job.precision]
        self.local = threading.local()

    def stream(self) -> Any:
        """This thread's CUDA stream (copies and compute of two threads overlap), or no stream on the CPU."""
        if self.device.type != "cuda":
            return nullcontext()
        if not hasattr(self.local, "stream"):
            self.local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self.local.stream)

    def __call__(self, batch: Batch) -> Labelled:
        with self.stream(), torch.inference_mode():
            pixels, rows, skipped = self.pixels(batch)
            try:
                scores, classes = self.top_k(pixels) if len(rows) else self.empty()
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"a batch of {self.job.batch_size} at {self.job.footprint['input_size']}px does not fit "
                                f"on {torch.cuda.get_device_name(self.device)}; pass a smaller --batch-size") from None
            scores, classes = to_host(scores), to_host(classes)
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
        return Labelled(batch.position, batch.start, batch.stop, rows, scores.numpy(), classes.numpy(),
                        batch.skipped + skipped, batch.decoded_on, self.labelled_on)

    def top_k(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token top-k logits (descending, float16) and class ids (int32), [n, k, H, W], on the device."""
        x = normalise(pixels, self.job.mean, self.job.std)
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            _, tokens, (h, w) = self.model.forward_dense(x)
        values, ids = tokens.float().topk(self.job.topk, dim=-1)
        n, k = len(x), self.job.topk
        return (values.transpose(1, 2).reshape(n, k, h, w).half(),
                ids.transpose(1, 2).reshape(n, k, h, w).int())

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(0, dtype=torch.float16), torch.zeros(0, dtype=torch.int32)

    def pixels(self, batch: Batch) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """The batch's uint8 (or 0..255 float) [n, 3, S, S] on the device, its decoded rows, rows skipped here."""
        if self.job.decode == "cpu":
            return to_device(batch.pixels, self.device).permute(0, 3, 1, 2), batch.rows, []
        data = to_device(batch.pixels, torch.device("cpu"))  # decoders read encoded bytes from the host
        encoded = [data[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
        images, keep, skipped = self.decode(encoded, batch)
        size, interpolation = self.job.footprint["input_size"], self.job.footprint["interpolation"]
        boxes = [self.job.source_box(im.shape[2], im.shape[1]) for im in images]
        pixels = (render_boxes(images, boxes, size, interpolation, fill_colour(self.job.mean)) if images
                  else torch.zeros(0, 3, size, size, device=self.device))
        return pixels, batch.rows[keep], skipped

    def decode(self, encoded: list[torch.Tensor], batch: Batch) -> tuple[list[torch.Tensor], list[int], list[str]]:
        """Decode on the device (JPEGs all at once with nvJPEG on a GPU); an undecodable image raises or is skipped."""
        decoded, keep, skipped = decode_images(encoded, self.device), [], []
        for i, image in enumerate(decoded):
            if isinstance(image, str):
                if self.job.on_error == "raise":
                    shard = self.job.manifest.root / self.job.shard(batch.position)[0]
                    raise corrupt_error(shard, batch.keys[i], image)
                skipped.append(f"{batch.keys[i]}: {image}")
                continue
            keep.append(i)
        return [decoded[i] for i in keep], keep, skipped


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied (non-blocking, into pinned memory) to the host; the caller syncs its stream."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class ShardWriter:
    """The one writer of a dump's rows: holds each shard's labelled batches until all its rows are in, then
    writes them and, after them, the shard's done flag, in a background thread (labelling goes on meanwhile)."""

    def __init__(self, job: DumpJob):
        self.job = job
        self.group = zarr.open_group(job.store, mode="r+", zarr_format=3)
        self.partial: dict[int, dict[str, Any]] = {}
        self.complete: set[int] = set()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.writes: dict[Future, int] = {}  # writes not yet checked -> their shard's position
        self.reports: list[dict[str, Any]] = []
        self.failed = threading.Event()  # a write failed: the writes queued after it do not run
        self.first_result: float | None = None
        self.first_count = 0

    def add(self, labelled: Labelled) -> None:
        """Take one labelled batch; a shard that is now complete is written in the background.

        A batch seen twice (a retried decode task yields its shard's batches again) counts once: its bits are
        the same. A background write that failed since the last batch stops the dump here (`check`).
        """
        self.check()
        if labelled.position in self.complete:
            return
        if self.first_result is None:
            self.first_result, self.first_count = time.perf_counter(), len(labelled.rows)
        _, count = self.job.shard(labelled.position)
        shard = self.partial.get(labelled.position)
        if shard is None:
            shape = (count, *self.group["scores"].shape[1:])
            shard = self.partial[labelled.position] = {
                "scores": np.full(shape, np.nan, np.float16), "classes": np.full(shape, -1, np.int32),
                "valid": np.zeros(count, np.uint8), "batches": set(), "received": 0, "skipped": [],
                "decoded_on": set(), "labelled_on": set()}
        if labelled.start in shard["batches"]:
            return
        rows = labelled.rows
        if len(rows):
            shard["scores"][rows], shard["classes"][rows], shard["valid"][rows] = labelled.scores, labelled.classes, 1
        shard["batches"].add(labelled.start)
        shard["received"] += labelled.stop - labelled.start
        shard["skipped"] += labelled.skipped
        shard["decoded_on"].add(labelled.decoded_on)
        shard["labelled_on"].add(labelled.labelled_on)
        if shard["received"] == count:
            self.complete.add(labelled.position)
            write = self.thread.submit(self.write_unless_failed, labelled.position, self.partial.pop(labelled.position))
            self.writes[write] = labelled.position

    def write_unless_failed(self, position: int, shard: dict[str, Any]) -> dict[str, Any] | None:
        """`write`, unless an earlier write failed (the dump stops at the first failure)."""
        if self.failed.is_set():
            return None
        try:
            return self.write(position, shard)
        except BaseException:
            self.failed.set()
            raise

    def check(self) -> None:
        """Collect the finished writes; the first that failed is raised as one line (store, shard, OS error). The
        shards written before it stay written (and flagged done), so the same command resumes after the fix."""
        for write in [w for w in self.writes if w.done()]:
            position = self.writes.pop(write)
            error = write.exception()
            if error is not None:
                self.failed.set()
                raise UserError(f"{self.job.store}: writing shard {self.job.shard(position)[0]} failed "
                                f"({first_line(error)}); the shards written before it are kept: fix the cause "
                                f"(e.g. free disk space) and run the same command again to resume") from None
            if write.result() is not None:
                self.reports.append(write.result())

    def write(self, position: int, shard: dict[str, Any]) -> dict[str, Any]:
        """Write a shard's rows, its tar's sha256 and the dump id, durably, then its done flag (store.write_shard)."""
        filename, count = self.job.shard(position)
        keys = shard_keys(self.job.manifest.root / filename)
        write_shard(self.group, position, scores=shard["scores"], classes=shard["classes"], valid=shard["valid"],
                    keys=keys + [""] * (count - len(keys)),
                    sha256=self.job.manifest.shard_digests(self.job.split)[position])
        return {"shard": filename, "rows": count, "labelled": int(shard["valid"].sum()), "skipped": shard["skipped"],
                "decoded_on": sorted(shard["decoded_on"]), "labelled_on": sorted(shard["labelled_on"])}

    def finish(self) -> tuple[list[dict[str, Any]], float]:
        """Wait for every write; (one report per written shard, labelling rate in img/s after the first batch).
        A failed write is raised as its one line (`check`)."""
        self.thread.shutdown(wait=True)
        self.check()
        labelled = sum(r["labelled"] for r in self.reports) - self.first_count
        elapsed = time.perf_counter() - self.first_result if self.first_result is not None else 0.0
        return self.reports, labelled / elapsed if elapsed > 0 and labelled > 0 else 0.0

    def stop(self) -> None:
        """Wait for the writes under way, raising nothing (the dump is ending with another error)."""
        self.thread.shutdown(wait=True)


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def label_all(batches: Iterator[Batch], labeler: Callable[[Batch], Labelled], writer: ShardWriter,
              concurrency: int = 1) -> None:
    """Label batches (up to `concurrency` at once, in threads) and hand the results to the writer."""
    if concurrency == 1:
        for batch in batches:
            writer.add(labeler(batch))
        return
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="labeler") as pool:
        running: list[Future] = []
        for batch in batches:
            running.append(pool.submit(labeler, batch))
            if len(running) > concurrency:
                writer.add(running.pop(0).result())
        for future in running:
            writer.add(future.result())


