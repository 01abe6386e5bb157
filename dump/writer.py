"""The one writer of a dump: a shard's rows once all are in (whole chunks, by it alone), then its done flag."""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr

from common.errors import UserError, first_line
from dump.batches import Labelled
from dump.job import DumpJob
from dump.store.write import write_shard
from shards.reader import shard_keys


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
        """Write a shard's rows, its tar's sha256 and the dump id, durably, then its done flag (write_shard)."""
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
