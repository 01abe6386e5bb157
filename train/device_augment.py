"""`--augment-on device`: DataLoader workers only draw each sample's augmentation; the training device renders it.

A worker reads the tar bytes and the store row, opens the image's header (shards.reader.open_sample: size and
mode, no decoding) and draws the sample's augmentation exactly as the PIL path draws it (train.augment.Draw, the
same seeds): the mapping, the filter, the photometric ops with their arguments and the erased boxes, packed into
fixed-size arrays (`draw_arrays`). `collate` packs a batch's image bytes into one buffer. On the training device,
`DeviceAugment` decodes the batch's JPEGs at once (torchvision.io.decode_jpeg: nvJPEG on a GPU; images of any
sizes; other formats arrive decoded by the worker), renders every image through its mapping
(core.imaging.device.warp_images), runs the photometric ops (train.photometric), normalises and erases. The mapping
stays in the batch for the label path (train.data.token_label_targets), which resamples the stored maps with it.
The only difference in what is drawn: the erasing noise comes from a device generator seeded per batch.
"""

import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from common.errors import UserError
from core.imaging.device import normalise, to_device, warp_images
from shards.reader import SkipLog, corrupt_error, decode_jpegs
from train.augment import FILTERS, GEOMETRIC_OPS, JITTER_OPS, Draw, LabelAwareTransform
from train.photometric import OP_NAMES, apply_ops

FILTER_NAMES = tuple(FILTERS.values())


def op_slots(transform: LabelAwareTransform) -> int:
    """How many photometric ops a sample can draw: RandAugment's layers, or colour jitter's three."""
    if transform.augment is not None:
        return transform.augment.num_layers
    return len(JITTER_OPS) if transform.color_jitter is not None else 0


def draw_arrays(transform: LabelAwareTransform, draw: Draw) -> dict[str, np.ndarray]:
    """A sample's Draw as fixed-size arrays that collate into a batch: mapping [3, 3], filter (index into
    FILTER_NAMES), ops [L] (index into train.photometric.OP_NAMES, -1 for none) with their args [L], and erase
    [max boxes, 4] (top, left, height, width; height 0 for none)."""
    ops, args = np.full(op_slots(transform), -1, np.int64), np.zeros(op_slots(transform), np.float64)
    for slot, (name, arguments) in enumerate(draw.ops):
        ops[slot], args[slot] = OP_NAMES.index(name), arguments[0] if arguments else 0.0
    erase = np.zeros((transform.erase.max_count if transform.erase is not None else 0, 4), np.int64)
    erase[:len(draw.erase)] = np.reshape(draw.erase, (-1, 4))
    return {"mapping": draw.mapping, "filter": np.int64(FILTER_NAMES.index(FILTERS[draw.resample])), "ops": ops,
            "args": args, "erase": erase}


def encoded_sample(transform: LabelAwareTransform, sample: dict[str, Any]) -> dict[str, Any]:
    """A worker's part of a sample opened by shards.reader.open_sample: its image bytes (a JPEG's own, or the
    pixels a worker decoded), its size and its drawn augmentation, plus a seed for its erasing noise."""
    image, jpeg = sample["image"], sample["jpeg"]
    draw = transform.draw(image)
    return {"data": jpeg if jpeg is not None else np.asarray(image).tobytes(), "jpeg": jpeg is not None,
            "size": np.array([image.height, image.width]), "seed": random.getrandbits(62),
            **draw_arrays(transform, draw), "key": sample["key"]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate, with the samples' image bytes in one uint8 buffer ("data") cut at "offsets" [B + 1]."""
    blobs = [s.pop("data") for s in samples]
    batch = default_collate(samples)
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    view = data.numpy()
    for start, blob in zip(offsets, blobs):
        view[start:start + len(blob)] = np.frombuffer(blob, np.uint8)
    batch["data"], batch["offsets"] = data, torch.from_numpy(offsets)
    return batch


class DeviceAugment:
    """The training device's half: a collated batch of drawn samples -> the batch with "image" (and, for an online
    labeler, "clean": the same mapping at clean_size, no photometric op) on `device`.

    An image that does not decode stops training with shards.reader's one line naming shard and key, or under
    on_error="skip" leaves the batch (reported as the reader reports its skips). `shard_of(row)` names the shard.
    """

    def __init__(self, transform: LabelAwareTransform, device: torch.device, shard_of: Callable[[int], Path], *,
                 clean_size: int | None = None, on_error: str = "raise"):
        unknown = [op.name for op in getattr(transform.augment, "ops", ())
                   if op.name not in GEOMETRIC_OPS and op.name not in OP_NAMES]
        if unknown:
            raise UserError(f"RandAugment ops {unknown} have no device version; use --augment-on workers")
        self.transform, self.device, self.shard_of = transform, torch.device(device), shard_of
        self.clean_size, self.on_error, self.skips = clean_size, on_error, SkipLog()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """The rendered batch, or None when none of its images decodes (under the skip policy)."""
        t = self.transform
        batch = self.decoded(dict(batch))
        images = batch.pop("pixels")
        if not images:
            return None
        mappings = batch["mapping"].numpy().astype(np.float64)
        filters = [FILTER_NAMES[f] for f in batch.pop("filter").tolist()]
        if self.clean_size is not None:  # STL's teacher view: the same mapping, no photometric op, bicubic
            scale = np.diag([t.img_size / self.clean_size, t.img_size / self.clean_size, 1.0])
            clean = warp_images(images, mappings @ scale, self.clean_size, ["bicubic"] * len(images), t.fill)
            batch["clean"] = normalise(clean, t.mean, t.std)
        x = warp_images(images, mappings, t.img_size, filters, t.fill)
        x = normalise(apply_ops(x, batch.pop("ops").numpy(), batch.pop("args").numpy()), t.mean, t.std)
        batch["image"] = self.erase(x, batch.pop("erase").numpy(), batch.pop("seed").tolist())
        return batch

    def decoded(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its images decoded on the device ("pixels", uint8 [3, H, W] each); samples whose image does
        not decode are refused or, under the skip policy, dropped."""
        data, offsets = batch.pop("data"), batch.pop("offsets").tolist()
        blobs = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        jpeg = batch.pop("jpeg").tolist()
        encoded = [i for i, is_jpeg in enumerate(jpeg) if is_jpeg]
        decoded = dict(zip(encoded, decode_jpegs([blobs[i] for i in encoded], self.device)))
        sizes = batch.pop("size").tolist()  # what is not a JPEG comes decoded by the worker: [H, W, 3] pixels
        pixels = [decoded[i] if jpeg[i] else blobs[i].view(*sizes[i], 3).to(self.device, non_blocking=True)
                  .permute(2, 0, 1) for i in range(len(blobs))]
        failed = [i for i, image in enumerate(pixels) if isinstance(image, str)]
        for i in failed:
            shard, key = self.shard_of(int(batch["index"][i])), batch["key"][i]
            if self.on_error == "raise":
                raise corrupt_error(shard, key, pixels[i])
            self.skips.add(str(shard), key, pixels[i])
        keep = [i for i in range(len(pixels)) if i not in failed]
        if failed:
            rows = torch.tensor(keep, dtype=torch.long)
            batch = {k: v[rows] if torch.is_tensor(v) else [v[i] for i in keep] for k, v in batch.items()}
        batch["pixels"] = [pixels[i] for i in keep]
        return batch

    def erase(self, x: torch.Tensor, boxes: np.ndarray, seeds: list[int]) -> torch.Tensor:
        """Random erasing of the drawn boxes [B, E, 4] (top, left, height, width), in order, with noise from a
        generator on the device seeded by the batch's samples."""
        if not boxes[..., 2].any():
            return x
        generator = torch.Generator(x.device).manual_seed(int(np.random.SeedSequence(seeds).generate_state(1)[0]))
        size = x.shape[-1]
        lines = torch.arange(size, device=x.device)
        rows, cols = lines.view(1, 1, size, 1), lines.view(1, 1, 1, size)
        for slot in range(boxes.shape[1]):
            erased = np.flatnonzero(boxes[:, slot, 2])
            if not len(erased):
                continue
            index = to_device(erased, x.device)
            top, left, height, width = to_device(boxes[erased, slot].reshape(-1, 4, 1, 1, 1), x.device).unbind(1)
            inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
            noise = self.transform.erase_noise((len(erased), *x.shape[1:]), generator, x.device)
            x.index_copy_(0, index, torch.where(inside, noise, x.index_select(0, index)))
        return x

    def batches(self, loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The loader's batches, augmented (a batch none of whose images decodes is left out). On CUDA one batch
        ahead, on a side stream: decoding and augmenting the next batch overlap the training step on this one."""
        if self.device.type != "cuda":
            yield from filter(None, map(self, loader))
            return
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        ready = None
        for batch in loader:
            with torch.cuda.stream(side):
                upcoming = self(batch)
            if upcoming is None:
                continue
            if ready is not None:
                yield ready
            main.wait_stream(side)  # queued after the step on `ready`: the next step waits for `upcoming`
            for value in upcoming.values():
                if torch.is_tensor(value) and value.is_cuda:
                    value.record_stream(main)
            ready = upcoming
        if ready is not None:
            yield ready
