"""The training split both trainers read, how it is dealt to ranks and workers, and how many full batches every
rank gets from it each epoch.

Shards are shuffled per epoch and dealt to ranks, then to DataLoader workers, whole or, where they are few, sample
by sample (shards.reader.ShardReader; `deal` chooses), so each sample is read at most once per epoch across ranks;
its transform runs with the global RNGs seeded by (seed, epoch, row) (core.seeding).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import UserError
from core.seeding import seed_all
from shards.reader import ShardReader


class SeededTransform:
    """A worker-side sample transform whose random draws are seeded by (seed, epoch, the sample's row)."""

    def __init__(self, transform: Callable[[dict[str, Any]], Any], seed: int):
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __call__(self, sample: dict[str, Any]) -> Any:
        seed_all(self.seed, self.epoch, sample["index"], cuda=False)
        return self.transform(sample)


class TrainSplit(ShardReader):
    """A shuffled split (default: train) whose samples go through `transform` seeded per sample; `collate` is the
    DataLoader's collate_fn for its batches (None: torch's default)."""

    collate: Callable[[list[Any]], Any] | None = None

    def __init__(self, root: str | Path, transform: Callable[[dict[str, Any]], Any], *, seed: int = 0,
                 split: str = "train", **reader_kwargs):
        super().__init__(root, split, shuffle=True, seed=seed, transform=SeededTransform(transform, seed),
                         **reader_kwargs)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.transform.epoch = epoch


WHOLE_SHARDS_KEEP = 0.9  # whole shards are dealt while they give at least this share of split samples' steps


def deal(data: ShardReader, batch_size: int, world: int, workers: int) -> None:
    """Choose how `data` is dealt (its split_samples). Samples are split within shards, in blocks of the batch
    size, when whole shards are few: fewer than the streams (world x workers, or world without workers: some
    would idle), or giving under WHOLE_SHARDS_KEEP of the steps split samples give (a short shard, one shard more
    than a rank's share). Otherwise whole shards are dealt: each tar is read once per epoch, not once per stream."""
    shards = data.manifest.shards(data.split)
    split = split_sample_steps(data.manifest.count(data.split), batch_size, world)
    whole = whole_shard_steps(sorted(count for _, count in shards), batch_size, world, workers)
    few = len(shards) < world * max(1, workers) or whole < WHOLE_SHARDS_KEEP * split
    data.split_samples = batch_size if few else None


def steps_per_epoch(data: ShardReader, batch_size: int, world: int, cap: int | None = None, workers: int = 0) -> int:
    """Full batches that every rank holds in every epoch of `data` as `deal` dealt it: ranks must take equal steps."""
    if data.split_samples:
        steps = split_sample_steps(data.manifest.count(data.split), batch_size, world)
    else:
        steps = whole_shard_steps(sorted(count for _, count in data.manifest.shards(data.split)), batch_size, world,
                                  workers)
    if steps == 0:
        raise UserError(f"{data.manifest.root}: {data.manifest.count(data.split)} {data.split} images over {world} "
                        f"rank(s) leave a rank no full batch: fewer than --batch-size {batch_size} images; lower the "
                        "batch size")
    return min(steps, cap) if cap else steps


def split_sample_steps(samples: int, batch_size: int, world: int) -> int:
    """Exactly the full batches of every rank when samples are split in blocks of the batch size: the last rank
    holds the fewest rows (samples // world), and only its last block may be partial."""
    return samples // world // batch_size


def whole_shard_steps(counts: list[int], batch_size: int, world: int, workers: int) -> int:
    """The full batches every rank holds whatever the epoch when whole shards are dealt (`counts`: the shards'
    sample counts, ascending).

    Rank r reads shards r, r + world, ... of the epoch's shuffled order, and each of its DataLoader workers (at
    most one per shard; none: the process itself) batches its own shards and drops its last partial batch. Two
    bounds hold whatever the epoch: a worker dealt k shards holds at least the k smallest, and w workers lose
    less than one batch each to their partial batches out of at least the rank's n smallest shards.
    """
    least = []
    for rank in range(world):
        held = len(counts[rank::world])
        streams = max(1, min(workers, held))
        per_worker = sum(sum(counts[:len(range(w, held, streams))]) // batch_size for w in range(streams))
        least.append(max(per_worker, sum(counts[:held]) // batch_size - (streams - 1)))
    return min(least)
