"""The one shard reader every stage uses: key, decoded image, class and mask, split across ranks and workers."""

import io
import random
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from common.distributed import rank_and_world
from common.errors import UserError
from shards.manifest import Digesting, Manifest, check_key, load_manifest, shard_keys

IMAGE_KEYS = ("jpg", "jpeg", "png")
ON_ERROR = ("raise", "skip")


@dataclass
class SkipLog:
    """Samples skipped under on_error="skip": (shard, key, reason), reported at the end."""

    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, shard: str, key: str, reason: str) -> None:
        self.skipped.append((shard, key, reason))
        print(f"warning: skipped {shard}: {key}: {reason}", file=sys.stderr)

    def report(self) -> str:
        return f"{len(self.skipped)} sample(s) skipped" + "".join(f"\n  {s}: {k}: {r}" for s, k, r in self.skipped)


class CorruptSample(Exception):
    """A tar member that cannot be decoded; the message says which member and why."""


def _image_key(raw: dict[str, Any]) -> str:
    """The extension of the sample's image member; refuses a sample without an image or a class."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None or "cls" not in raw:
        raise CorruptSample("sample lacks an image (.jpg/.jpeg/.png) or a .cls member")
    return image_key


DECODE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, EOFError, Image.DecompressionBombError)


def rgb_image(data: bytes) -> Image.Image:
    """An image file's bytes decoded to 8-bit RGB by the one rule of every decode path (build's check, the PIL
    path, and the device path for all but RGB and greyscale JPEGs): 16-bit greyscale scaled by 255/65535 and
    rounded (16-bit colour PNGs PIL itself reduces to their high byte), alpha dropped (not composited), palette,
    CMYK and 1-bit images converted by PIL; EXIF orientation is not applied (nor by PIL, torchvision or timm's
    ImageFolder). Raises one of DECODE_ERRORS when the bytes are not such an image."""
    image = Image.open(io.BytesIO(data))
    if image.mode.startswith("I"):  # I;16 (16-bit greyscale PNG), I: PIL's convert would clip at 255
        grey = np.rint(np.asarray(image, np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P":  # via RGBA: PIL warns when a palette with transparency goes straight to RGB
        image = image.convert("RGBA")
    return image.convert("RGB")


def mask_image(data: bytes, size: tuple[int, int]) -> Image.Image:
    """A mask's bytes decoded: mode P or L, class + 1 per pixel (0 background), the size of its image; raises
    ValueError saying what is wrong (or another of DECODE_ERRORS)."""
    mask = Image.open(io.BytesIO(data))
    mask.load()
    if mask.mode not in ("P", "L"):
        raise ValueError(f"mask is mode {mask.mode}, not P or L (one class + 1 per pixel, 0 background)")
    if mask.size != size:
        raise ValueError(f"mask is {mask.width}x{mask.height} but its image {size[0]}x{size[1]}")
    return mask


def describe(error: Exception) -> str:
    """A decode error in a few words (PIL's "cannot identify" names only an in-memory buffer)."""
    text = "not a known image format" if isinstance(error, UnidentifiedImageError) else str(error)[:120]
    return f"{type(error).__name__}: {text}"


def device_decodes(image: Image.Image) -> bool:
    """Whether a device decodes this opened image itself (torchvision.io.decode_jpeg, nvJPEG on a GPU): a JPEG
    in RGB or greyscale. Any other image goes through rgb_image."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode one grouped tar sample into key, RGB image, class and (optional) mask."""
    member = _image_key(raw)
    try:
        image = rgb_image(raw[member])
        member = "mask.png"
        mask = mask_image(raw[member], image.size) if member in raw else None
        member = "cls"
        cls = int(raw[member])
    except DECODE_ERRORS as e:
        raise CorruptSample(f"cannot decode its .{member} ({describe(e)})") from e
    return {"key": raw["__key__"], "image": image, "cls": cls, "mask": mask}


def open_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """`decode_sample` for a device that decodes JPEGs itself: a JPEG it decodes (device_decodes) is only opened
    (its header read: size and mode) and keeps its bytes under "jpeg"; any other image (PNG, CMYK JPEG, ...) is
    decoded here by rgb_image ("jpeg" None). No mask is read."""
    image_key = _image_key(raw)
    try:
        image = Image.open(io.BytesIO(raw[image_key]))
        jpeg = raw[image_key] if device_decodes(image) else None
        if jpeg is None:
            image = rgb_image(raw[image_key])
        cls = int(raw["cls"])
    except DECODE_ERRORS as e:
        raise CorruptSample(f"cannot decode its .{image_key} or .cls ({describe(e)})") from e
    return {"key": raw["__key__"], "image": image, "jpeg": jpeg, "cls": cls, "mask": None}


def corrupt_error(shard: str | Path, key: str, reason: str) -> UserError:
    """The one-line refusal of a sample that does not decode, under on_error="raise"."""
    return UserError(f"{shard}: {key}: {reason}; rebuild the shard or use the skip policy")


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """JPEGs the device decodes (device_decodes), as uint8 CPU tensors of their bytes, decoded all at once by
    torchvision.io.decode_jpeg (nvJPEG on a GPU) to uint8 RGB [3, H, W] on `device`, or for each that does not
    decode the reason; when one of them fails the call, each is decoded alone to find it."""
    rgb = torchvision.io.ImageReadMode.RGB
    try:
        return list(torchvision.io.decode_jpeg(encoded, mode=rgb, device=device)) if encoded else []
    except RuntimeError:
        pass
    images: list[torch.Tensor | str] = []
    for data in encoded:
        try:
            images.append(torchvision.io.decode_jpeg(data, mode=rgb, device=device))
        except RuntimeError as e:
            images.append(f"cannot decode its image ({type(e).__name__})")
    return images


def decode_images(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """Image files of any format (uint8 CPU tensors of their bytes) decoded to uint8 RGB [3, H, W] on `device`,
    or for each that does not decode the reason: JPEGs the device decodes go to decode_jpegs, every other image is
    decoded on the CPU by rgb_image, exactly as the PIL path decodes it (each file's header is parsed to tell)."""
    images: dict[int, torch.Tensor | str] = {}
    for i, data in enumerate(encoded):
        file = data.numpy().tobytes()
        try:
            if not device_decodes(Image.open(io.BytesIO(file))):
                images[i] = torch.from_numpy(np.array(rgb_image(file))).permute(2, 0, 1).to(device)
        except DECODE_ERRORS as e:
            images[i] = f"cannot decode its image ({type(e).__name__})"
    jpegs = [i for i in range(len(encoded)) if i not in images]
    images.update(zip(jpegs, decode_jpegs([encoded[i] for i in jpegs], device)))
    return [images[i] for i in range(len(encoded))]


def read_shard(root: str | Path, split: str, filename: str, on_error: str = "raise",
               skips: SkipLog | None = None, manifest: Manifest | None = None,
               decode: Callable[[dict[str, Any]], dict[str, Any]] = decode_sample,
               keep: Callable[[int], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the decoded samples of one shard in order, each with its row `index` in the split's order; with
    `keep`, only those whose row it keeps (the others are skipped before decoding, but checked and counted).

    The shard must hold exactly the samples the manifest says: a truncated tar, a corrupt image, a count
    mismatch, or (for a tar read to its end) bytes whose sha256, computed while streaming them, is not the
    manifest's, is a UserError naming shard and key, unless on_error="skip" (then each skip goes to `skips`, and
    a changed tar is a warning: corrupt bytes also change the tar).
    An unsafe key (manifest.check_key) is refused either way. `decode` turns a grouped tar sample (member bytes by
    extension) into the sample, raising CorruptSample.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    manifest = manifest or load_manifest(root)
    names = [name for name, _ in manifest.shards(split)]
    if filename not in names:
        raise UserError(f"{filename}: not a shard of split '{split}' in {manifest.root}/manifest.json")
    position = names.index(filename)
    first, expected = manifest.offsets(split)[position], manifest.shards(split)[position][1]
    path = manifest.root / filename
    skips = skips if skips is not None else SkipLog()
    seen, last_key = 0, "(start of shard)"
    try:
        with open(path, "rb") as file:
            stream = Digesting(file)
            members = ({**member, "__url__": str(path)} for member in tar_file_iterator(stream))
            for raw in group_by_keys(members):
                last_key = raw["__key__"]
                check_key(last_key, path)
                index, seen = first + seen, seen + 1
                if seen > expected:
                    raise UserError(f"{path}: holds more samples than the {expected} in manifest.json; rebuild the shards")
                if keep is not None and not keep(index):
                    continue
                try:
                    sample = decode(raw)
                except CorruptSample as e:
                    if on_error == "raise":
                        raise corrupt_error(path, last_key, str(e)) from e
                    skips.add(str(path), last_key, str(e))
                    continue
                sample["index"] = index
                yield sample
            sha256 = stream.hexdigest_to_end()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: a member name twice in a sample
        message = f"{path}: truncated or corrupt tar after key {last_key} ({e})"
        if on_error == "raise":
            raise UserError(message + "; rebuild this shard") from e
        skips.add(str(path), f"after {last_key}", f"{expected - seen} sample(s) unreadable: {e}")
        return
    if seen < expected:
        message = f"{path}: holds {seen} samples but manifest.json says {expected}; the tar is truncated or replaced"
        if on_error == "raise":
            raise UserError(message)
        skips.add(str(path), f"after {last_key}", message)
    elif sha256 != manifest.shard_digests(split)[position]:
        message = f"{path}: changed since manifest.json was written (its sha256 differs from the manifest's)"
        if on_error == "raise":
            raise UserError(message + "; rebuild the shards")
        print(f"warning: {message}; read as it is under the skip policy", file=sys.stderr)  # no sample was skipped


class ShardReader(IterableDataset):
    """Stream a split's samples: shards shuffled per epoch (seed + epoch), dealt to streams (the DataLoader workers
    of each rank, or the rank itself without workers) as whole shards or, with `split_samples`, sample by sample.

    Whole shards: every rank sees the same shard order and takes every world_size-th shard; inside a rank,
    DataLoader workers take every num_workers-th of those (each tar is read once per epoch). split_samples=B:
    every stream reads every shard in that order and keeps only its own samples, skipping the others before
    decoding. The epoch's permutation `perm` of the split's rows (seeded by seed and epoch; the identity
    unshuffled) makes row r sample j = perm[r] // world_size of rank perm[r] % world_size, and a rank's samples go
    to its workers in blocks of B (sample j to worker j // B % num_workers): with B the batch size a rank drops at
    most one partial batch, whatever its workers. Either way `len()` is this rank's exact sample count for the
    epoch. rank and world_size default to torch.distributed's. `annotate` sees every sample in shard order,
    before the shuffle buffer (where per-shard side data, such as a label store's chunk, is cheapest to join);
    `transform` runs after it, in the worker. `decode` turns each grouped tar sample into the sample
    (decode_sample, or open_sample where the training device decodes the JPEGs).
    """

    def __init__(self, root: str | Path, split: str, *, shuffle: bool = False, seed: int = 0, buffer: int = 512,
                 annotate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 transform: Callable[[dict[str, Any]], Any] | None = None, on_error: str = "raise",
                 rank: int | None = None, world_size: int | None = None, split_samples: int | None = None,
                 decode: Callable[[dict[str, Any]], dict[str, Any]] = decode_sample):
        self.manifest = load_manifest(root)
        self.rank, self.world_size, self.split_samples = rank, world_size, split_samples
        self.split, self.shuffle, self.seed, self.buffer = split, shuffle, seed, buffer
        self.annotate, self.transform, self.on_error, self.decode = annotate, transform, on_error, decode
        self.epoch = 0
        self.skips = SkipLog()
        self.manifest.split(split)  # fail now, naming the split, rather than in a worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_shards(self) -> list[tuple[str, int]]:
        """The split's (shard, sample count) in this epoch's order."""
        shards = self.manifest.shards(self.split)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards

    def rank_shards(self) -> list[tuple[str, int]]:
        """This rank's shards when whole shards are dealt."""
        rank, world = self.node()
        return self.epoch_shards()[rank::world]

    def stream_rows(self, worker: int, workers: int) -> np.ndarray:
        """Whether each row of the split is this rank's worker `worker`'s (of `workers`) when samples are split."""
        rank, world = self.node()
        rows = self.manifest.count(self.split)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(rows) if self.shuffle else np.arange(rows)
        return (order % world == rank) & (order // world // self.split_samples % workers == worker)

    def node(self) -> tuple[int, int]:
        default_rank, default_world = rank_and_world()
        return (default_rank if self.rank is None else self.rank,
                default_world if self.world_size is None else self.world_size)

    def __len__(self) -> int:
        if self.split_samples:
            rank, world = self.node()
            return len(range(rank, self.manifest.count(self.split), world))
        return sum(count for _, count in self.rank_shards())

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine, keep = self.rank_shards()[worker::workers], None
        if self.split_samples:
            mine, keep = self.epoch_shards(), self.stream_rows(worker, workers).__getitem__
        samples = (sample for name, _ in mine
                   for sample in read_shard(self.manifest.root, self.split, name, self.on_error, self.skips,
                                            self.manifest, self.decode, keep))
        if self.annotate:
            samples = map(self.annotate, samples)
        if self.shuffle:
            rank, _ = self.node()
            samples = shuffled(samples, self.buffer, random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}"))
        for sample in samples:
            yield self.transform(sample) if self.transform else sample
        if self.skips.skipped:
            print(f"{self.manifest.root} [{self.split}]: {self.skips.report()}", file=sys.stderr)


def shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle buffer: fill to `size`, then emit a random element for each new one."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        buffer[slot], sample = sample, buffer[slot]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def split_keys(root: str | Path, split: str) -> list[str]:
    """The split's keys in shard order, read from tar headers only (no decoding)."""
    manifest = load_manifest(root)
    return [key for name, _ in manifest.shards(split) for key in shard_keys(manifest.root / name)]
