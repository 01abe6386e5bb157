"""A dump's labeler model on its device, labelling one batch at a time (uint8 in, normalised there)."""

import threading
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from core.imaging.boxes import fill_colour
from core.imaging.device import normalise, render_boxes, to_device
from dump.batches import Batch, Labelled
from dump.job import PRECISIONS, DumpJob
from labeler.load import load_labeler
from shards.reader import corrupt_error, decode_images


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
