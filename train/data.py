"""The label-aware data path: shards + label store -> batches of images with their stored maps and mappings.

In the DataLoader workers each sample gets its row of the store (joined by its row index, one whole tar-shard
chunk read per shard) and its augmented image with the one mapping (output pixel -> original image) that its
spatial transforms compose to: rendered there with PIL (augment_on="workers"), or only drawn there and rendered
on the training device (augment_on="device", train.device_augment). On the training device, `token_label_targets`
resamples the stored top-k maps through each mapping onto the student's token grid and draws the token targets,
batched.
Augmentation is seeded per (seed, epoch, sample row) (core.data.TrainSplit), so a sample looks the same
whatever the number of workers or ranks, and a resumed run sees exactly what an uninterrupted one would.
"""

import bisect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import normalize, to_tensor

from common.errors import UserError
from core.data import TrainSplit
from core.imaging.pil import warp_image
from dump.store.checks import check_matches
from dump.store.reader import LabelStore, open_store, store_shards
from dump.store.schema import footprint_box
from shards.manifest import MANIFEST, load_manifest
from shards.reader import decode_sample, open_sample
from train.augment import LabelAwareTransform
from train.device_augment import DeviceAugment, collate, encoded_sample
from train.targets import HardTokens, stored_token_targets


def resolve_labels(path: str | Path, need_store: bool = True, shards: str | Path | None = None
                   ) -> tuple[Path, Path | None]:
    """(shard folder, label store) from `--labels` and `--shards`: a store, whose shards are `shards` or those
    store_shards finds (its <dataset>/labels/ folder, else the dataset it records); or a dataset
    folder holding exactly one store under labels/ (with several, they are listed)."""
    path = Path(path)
    if path.suffix == ".zarr" or (path / "zarr.json").is_file():
        return store_shards(open_store(path), shards), path
    if shards is not None:
        raise UserError(f"--shards {shards}: give it with a label store in --labels, not with a dataset folder ({path})")
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path}: neither a label store (.zarr) nor a shard folder with {MANIFEST}")
    stores = sorted((path / "labels").glob("*.zarr"))
    if not need_store:
        return path, None
    if not stores:
        raise UserError(f"{path}/labels: no label store; run `python -m dump.dump_labels --shards {path} ...` "
                        "or train with --no-token-labels")
    if len(stores) > 1:
        raise UserError(f"{path}/labels holds {len(stores)} stores ({', '.join(s.name for s in stores)}); "
                        "pass one of them to --labels")
    return path, stores[0]


class StoreJoin:
    """Annotate each sample (in shard order) with its stored row; reads one whole tar-shard chunk at a time."""

    def __init__(self, store: LabelStore, offsets: list[int]):
        self.store, self.offsets = store, offsets
        self.rows: tuple[int, int] = (0, 0)
        self.chunk: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        row = sample["index"]
        start, stop = self.rows
        if not start <= row < stop:
            shard = bisect.bisect_right(self.offsets, row) - 1
            self.rows = self.store.shard_rows(shard)
            self.chunk = self.store.read_rows(*self.rows)
        scores, classes = self.chunk
        sample["scores"], sample["classes"] = scores[row - self.rows[0]], classes[row - self.rows[0]]
        return sample


class StudentSample:
    """Worker-side transform: augmented image (or, on_device, what the device needs to render it: see
    train.device_augment), its mapping, the footprint of its map, and the stored row."""

    def __init__(self, transform: LabelAwareTransform, footprint: dict[str, Any] | None,
                 clean_size: int | None = None, on_device: bool = False):
        self.transform, self.footprint, self.on_device = transform, footprint, on_device
        self.clean_size = clean_size  # online-teacher mode: also the clean view through the same mapping

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.on_device:
            out = encoded_sample(self.transform, sample)
        else:
            image, mapping = self.transform(sample["image"])
            out = {"image": image, "mapping": mapping}
            if self.clean_size is not None:
                out["clean"] = clean_view(sample["image"], mapping, self.transform.img_size, self.clean_size,
                                          self.transform)
        out |= {"cls": sample["cls"], "index": sample["index"]}
        if self.footprint is not None:
            out["footprint"] = np.asarray(footprint_box(self.footprint, *sample["image"].size), np.float32)
            out["scores"], out["classes"] = sample["scores"], sample["classes"]
        return out


AUGMENT_ON = ("workers", "device")


class StudentData(TrainSplit):
    """Training split of a dataset for a student: shards joined with a label store (or none, for baselines).

    augment_on="device": the workers only draw each sample's augmentation (train.device_augment); batches need
    `collate` (set here) and then `device_stage(device)` on the training device.
    """

    def __init__(self, shards: str | Path, store: Path | None, transform: LabelAwareTransform, *, seed: int = 0,
                 clean_size: int | None = None, split: str = "train", augment_on: str = "workers", **reader_kwargs):
        if augment_on not in AUGMENT_ON:
            raise UserError(f"--augment-on {augment_on}: use one of {', '.join(AUGMENT_ON)}")
        manifest = load_manifest(shards)
        self.store = None
        if store is not None:
            self.store = open_store(store)
            check_matches(self.store, manifest, split)
        annotate = StoreJoin(self.store, manifest.offsets(split)) if self.store else None
        on_device = augment_on == "device"
        sample = StudentSample(transform, self.store.footprint if self.store else None, clean_size, on_device)
        super().__init__(shards, sample, seed=seed, split=split, annotate=annotate,
                         decode=open_sample if on_device else decode_sample, **reader_kwargs)
        self.collate = collate if on_device else None
        self.view, self.clean_size = transform, clean_size

    def shard_of(self, row: int) -> Path:
        """The tar shard holding the split's row."""
        offsets = self.manifest.offsets(self.split)
        return self.manifest.root / self.manifest.shards(self.split)[bisect.bisect_right(offsets, row) - 1][0]

    def device_stage(self, device: str | torch.device) -> DeviceAugment:
        """The training device's half of augment_on="device"."""
        return DeviceAugment(self.view, torch.device(device), self.shard_of, clean_size=self.clean_size,
                             on_error=self.on_error)


def token_label_targets(batch: dict[str, torch.Tensor], num_classes: int, img_size: int, grid: tuple[int, int], *,
                        kind: str = "gumbel", tau: float = 1.0, smoothing: float = 0.1, points: int = 2,
                        generator: torch.Generator | None = None, pooled: bool = True
                        ) -> tuple[torch.Tensor | HardTokens, torch.Tensor, torch.Tensor | None]:
    """(token targets, valid [B, h, w], pooled label [B, K], or None with pooled=False) for a batch on device.

    Works on the stored top-k directly (train.targets.stored_token_targets): no dense [B, K, H, W] map is built,
    and for hard targets (Gumbel, argmax) no [B, K, h, w] tensor either.
    """
    return stored_token_targets(batch["scores"], batch["classes"], batch["mapping"], batch["footprint"], num_classes,
                                img_size, grid, kind=kind, tau=tau, smoothing=smoothing, points=points,
                                generator=generator, pooled=pooled)


def clean_view(image: Image.Image, mapping: np.ndarray, img_size: int, size: int,
               transform: LabelAwareTransform) -> torch.Tensor:
    """The image through the same mapping with no photometric op, rendered at `size` (STL's teacher view)."""
    scale = np.diag([img_size / size, img_size / size, 1.0])
    view = warp_image(image, mapping @ scale, size, Image.BICUBIC, transform.fill)
    return normalize(to_tensor(view), transform.mean, transform.std)
