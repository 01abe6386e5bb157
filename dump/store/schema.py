"""What a label store is: a Zarr v3 group of per-image top-k token-label maps, one chunk per tar shard.

Layout (N rows in the split's shard order, k labels per token, an H x W token grid):

    scores   float16 [N, k, H, W]  top-k raw logits per token, descending along k; NaN in skipped rows
    classes  int16   [N, k, H, W]  their class ids (int32 when K > 32767); -1 in skipped rows
    keys     str     [N]           sample keys ("" for an unreadable sample whose key is unknown)
    valid    uint8   [N]           1 = labelled, 0 = sample skipped as corrupt (see attribute "skipped")
    shard_sha256 str [num_shards]  sha256 of each tar shard's bytes as labelled, written with its rows
    dump_id  str     [num_shards]  the store's dump id (attribute "dump_id"), written with each tar shard's rows
    done     uint8   [num_shards]  completion flag of each tar shard, written after its rows are durable

Rows are chunked along N with `chunk_rows` rows per chunk, chosen so that every tar-shard boundary falls on a
chunk boundary: the first shard's count when all shards but the last have equal counts (one chunk = one tar
shard), else the gcd of those counts (a tar shard then spans several chunks). Either way each chunk belongs to
exactly one tar shard, so one writer alone ever writes it (zarr-python 3 has no locking; two writers of one
chunk lose data). A map's geometry is its `footprint`: the region of the original image the labeler saw,
resized to the labeler's input (`footprint_box`): the centred square of the shorter side (crop "center", LV-ViT's
and the dump's), or the whole image, its aspect ratio not kept (crop "whole", ReLabel's).
"""

import json
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from common.errors import UserError
from core.imaging.boxes import centre_box, check_crop_pct
from shards.manifest import Manifest

FORMAT = "tokenlabel-labels"
VERSION = 2  # 2: content digests (dataset.content_digest, shard_sha256) and dump ids
VALUE_KIND = "logits"
NOT_IDENTITY = ("complete", "skipped", "dump_id")  # the run state of a store and which dump made it; the rest is
# what it is made from and how: a dump resumes a store only where all of that is the same
ROW_ARRAYS = ("scores", "classes", "keys", "valid")  # chunked along the rows, `chunk_rows` rows per chunk
SHARD_ARRAYS = ("shard_sha256", "dump_id", "done")  # one element, one chunk, per tar shard; `done` written last
# a footprint's crop -> its "resize" words, which say to a reader of the attributes what the map covers
CROPS = {"center": "shorter side to input_size/crop_pct",
         "whole": "the whole image to input_size x input_size, aspect ratio not kept"}
REGION = ("crop", "crop_pct")  # the footprint fields that fix footprint_box: which pixels the map's cells cover
CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")  # byte-shuffled fp16/int16 then zstd, lossless


def make_footprint(input_size: int, crop_pct: float = 1.0, interpolation: str = "bicubic",
                   shift: float = 0.0, crop: str = "center") -> dict[str, Any]:
    """The rule that turned an original image into the labeler's S x S input: crop "center", the centred square of
    side crop_pct x the shorter side (core.imaging.boxes.centre_box); crop "whole", the whole image resized to
    S x S, its aspect ratio not kept (crop_pct 1 only).

    The map's cells tile the footprint box; `shift` (labeler input pixels, right and down) is how far the box the
    labeler saw was moved so that each token's receptive-field centre falls on its cell's centre
    (labeler.receptive)."""
    if crop not in CROPS:
        raise UserError(f"footprint crop {crop!r} is unknown; use one of {', '.join(CROPS)}")
    if crop == "whole" and crop_pct != 1.0:
        raise UserError(f"crop_pct {crop_pct}: a whole-image footprint has no crop; leave it at 1.0")
    region = {"crop": crop} if crop == "whole" else {"crop": crop, "crop_pct": check_crop_pct(crop_pct)}
    return {"resize": CROPS[crop], **region, "input_size": input_size, "interpolation": interpolation, "shift": shift}


def footprint_box(footprint: Mapping[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in the original image's continuous pixel coordinates that the map covers.

    Crop "center": resizing the shorter side to S / crop_pct and centre-cropping S x S covers a centred square of
    side crop_pct * min(width, height) (core.imaging.boxes.centre_box). Crop "whole": the whole image, (0, 0,
    width, height), so on a non-square image a cell is width / W x height / H pixels. The dump resamples exactly
    this box to S x S, and the map's H x W tokens tile it evenly.
    """
    crop = footprint.get("crop")
    if crop == "whole":
        return 0.0, 0.0, float(width), float(height)
    if crop != "center":
        raise UserError(f"unknown footprint crop {crop!r}; this store needs a newer tokenlabel")
    return centre_box(width, height, footprint["crop_pct"])


def chunk_rows(counts: list[int]) -> int:
    """Rows per chunk such that every tar-shard boundary is a chunk boundary (see the module docstring)."""
    return counts[0] if len(counts) == 1 else math.gcd(*counts[:-1])


def flatten(attrs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested attributes as {"labeler.sha256": ...}, for naming exactly which field differs."""
    flat = {}
    for name, value in attrs.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def identity_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'field: store has A, now B' for each identity attribute (all but NOT_IDENTITY) that differs."""
    have = flatten({k: v for k, v in stored.items() if k not in NOT_IDENTITY})
    want = flatten({k: v for k, v in wanted.items() if k not in NOT_IDENTITY})
    return [f"{name}: store has {have.get(name)!r}, now {want.get(name)!r}"
            for name in sorted(set(have) | set(want)) if have.get(name) != want.get(name)]


def dataset_attrs(manifest: Manifest, split: str) -> dict[str, Any]:
    """What a store records of the shards it labels: their keys' and their bytes' digests, layout, classes, and
    `root` (the shard folder, absolute) where they were."""
    return {"split": split, "digest": manifest.digest(split), "content_digest": manifest.content_digest(split),
            "count": manifest.count(split), "num_classes": manifest.num_classes,
            "shards": [list(s) for s in manifest.shards(split)], "root": str(manifest.root.resolve())}


def store_attrs(*, num_classes: int, k: int, grid: tuple[int, int], footprint: Mapping[str, Any],
                labeler: Mapping[str, Any], dataset: Mapping[str, Any], producer: Mapping[str, Any]) -> dict[str, Any]:
    """All attributes of a new store but its dump id, as JSON would give them back (so they compare equal to a
    stored copy)."""
    counts = [count for _, count in dataset["shards"]]
    attrs = {"format": FORMAT, "version": VERSION, "value": VALUE_KIND, "num_classes": num_classes, "k": k,
             "grid": list(grid), "chunk_rows": chunk_rows(counts), "footprint": footprint, "labeler": labeler,
             "dataset": dataset, "producer": producer, "complete": False, "skipped": []}
    return json.loads(json.dumps(attrs))


def create_store(path: str | Path, attrs: Mapping[str, Any]) -> zarr.Group:
    """Create the empty store (arrays, `store_attrs` attributes and a new dump id) at `path`, which must not exist.

    Callers create it in a temporary folder (dump.store.write.publishing), so a store path never holds a
    half-made group.
    """
    counts = [count for _, count in attrs["dataset"]["shards"]]
    n, rows, k, grid = sum(counts), attrs["chunk_rows"], attrs["k"], tuple(attrs["grid"])
    class_dtype = "int16" if attrs["num_classes"] <= np.iinfo(np.int16).max else "int32"
    group = zarr.open_group(Path(path), mode="w-", zarr_format=3,
                            attributes={**attrs, "dump_id": uuid.uuid4().hex})
    maps = {"shape": (n, k, *grid), "chunks": (rows, k, *grid), "compressors": CODEC}
    group.create_array("scores", dtype="float16", fill_value=np.nan, dimension_names=("row", "k", "y", "x"), **maps)
    group.create_array("classes", dtype=class_dtype, fill_value=-1, dimension_names=("row", "k", "y", "x"), **maps)
    group.create_array("keys", shape=(n,), chunks=(rows,), dtype=str)
    group.create_array("valid", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
    for name in ("shard_sha256", "dump_id"):
        group.create_array(name, shape=(len(counts),), chunks=(1,), dtype=str)
    group.create_array("done", shape=(len(counts),), chunks=(1,), dtype="uint8", fill_value=0)
    return group


def shard_range(shards: list[list[Any]], position: int) -> tuple[int, int]:
    """[start, stop) rows of tar shard `position` of a store's `dataset.shards` ([file, count] pairs)."""
    start = sum(count for _, count in shards[:position])
    return start, start + shards[position][1]


def shard_chunks(arrays: Mapping[str, zarr.Array], attrs: Mapping[str, Any], position: int) -> list[str]:
    """Storage keys (relative to the store) of every chunk of tar shard `position`, its `done` flag's last."""
    start, stop = shard_range(attrs["dataset"]["shards"], position)
    rows = attrs["chunk_rows"]
    keys = [f"{name}/{arrays[name].metadata.encode_chunk_key((i,) + (0,) * (arrays[name].ndim - 1))}"
            for name in ROW_ARRAYS for i in range(start // rows, (stop - 1) // rows + 1)]
    return keys + [f"{name}/{arrays[name].metadata.encode_chunk_key((position,))}" for name in SHARD_ARRAYS]

