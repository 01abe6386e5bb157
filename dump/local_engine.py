"""The dump without Ray: decode processes (a torch DataLoader over the pending shards) feed one labeler here.

For one machine without a Ray installation (the benchmark on a GPU node uses it); the Ray engine spreads the same
decoders and labelers over a cluster. Both write the same bits.
"""

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.errors import UserError
from dump.batch_labeler import BatchLabeler
from dump.batches import Batch, Labelled, shard_batches
from dump.job import DumpJob
from dump.writer import ShardWriter


class PendingShards(IterableDataset):
    """The fixed batches of the pending shards; DataLoader worker i decodes every n-th shard."""

    def __init__(self, job: DumpJob, positions: list[int]):
        self.job, self.positions = job, positions

    def __iter__(self) -> Iterator[Batch | UserError]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            for position in self.positions[worker::workers]:
                yield from shard_batches(self.job, position)
        except UserError as e:  # handed over as a value: DataLoader would re-raise it with a traceback in the text
            yield e


def run_local(job: DumpJob, pending: list[int], writer: ShardWriter, workers: int | None = None) -> None:
    """Label the pending shards: `workers` decode processes (default: every CPU), the labeler in this process."""
    labeler = BatchLabeler(job)
    workers = os.cpu_count() if workers is None else workers
    loader = DataLoader(PendingShards(job, pending), batch_size=None, num_workers=min(workers, len(pending)),
                        prefetch_factor=4 if workers else None)

    def batches() -> Iterator[Batch]:
        for item in loader:
            if isinstance(item, UserError):
                raise item
            yield item

    label_all(batches(), labeler, writer, concurrency=2 if labeler.device.type == "cuda" else 1)


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
