"""The training split both trainers read, and how many full batches every rank gets from it each epoch.

Shards are shuffled per epoch and dealt to ranks, then to DataLoader workers (shards.reader.ShardReader), so
each sample is read at most once per epoch across ranks; its transform runs with the global RNGs seeded by
(seed, epoch, row) (core.seeding).
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


def steps_per_epoch(data: ShardReader, batch_size: int, world: int, cap: int | None = None, workers: int = 0) -> int:
    """Full batches that every rank holds in every epoch: ranks must take equal steps.

    Rank r reads shards r, r + world, ... of the epoch's shuffled order, and each of its DataLoader workers (at
    most one per shard; none: the process itself) batches its own shards and drops its last partial batch. Two
    bounds hold whatever the epoch: a worker dealt k shards holds at least the k smallest, and w workers lose
    less than one batch each to their partial batches out of at least the rank's n smallest shards.
    """
    counts = sorted(count for _, count in data.manifest.shards(data.split))
    least = []
    for rank in range(world):
        held = len(counts[rank::world])
        streams = max(1, min(workers, held))
        per_worker = sum(sum(counts[:len(range(w, held, streams))]) // batch_size for w in range(streams))
        least.append(max(per_worker, sum(counts[:held]) // batch_size - (streams - 1)))
    steps = min(least)
    if steps == 0:
        raise UserError(f"{data.manifest.root}: {len(counts)} {data.split} shards over {world} rank(s) and "
                        f"--workers {workers} leave a rank or worker with no full batch: fewer than --batch-size "
                        f"{batch_size} images; lower the batch size or the workers")
    return min(steps, cap) if cap else steps
