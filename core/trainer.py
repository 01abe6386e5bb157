"""A training run as both trainers run it: ranks, the model's optimisation, the epoch loop of core.engine, exact
resumption, and one writer (rank 0) of DIR/metrics.jsonl (one JSON object per epoch) and DIR/last.pt.

A trainer (labeler.train's, train.student's) subclasses `Trainer`: it builds its model and training split,
calls `setup`, and sets `objective` (core.engine.Objective) and `data` (what it learns from, which a resumption
must find unchanged); `finish` runs once the schedule is complete. Rank 0 holds DIR/run.lock while it runs, so a
second trainer on the same DIR is refused; a DIR the trainer creates (or finds empty) is marked as a tokenlabel
run (common.files.write_marker), which is what lets a pipeline clear it.
"""

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from common.files import exclusive_lock, write_marker
from core.checkpoint import read_checkpoint, save_checkpoint
from core.data import TrainSplit, deal, steps_per_epoch
from core.distributed import barrier, leave_distributed, setup_distributed, training_module
from core.engine import Objective, evaluate, train_one_epoch
from core.optim import Optimization
from core.resume import (
    DataIdentity,
    check_resumable,
    check_same_data,
    check_same_run,
    resume_point,
    rewrite_metrics,
    saved_args,
)

RUN_LOCK = "run.lock"


class Trainer:
    """What a run shares between trainers; subclasses set `kind`, `resume_free`, `shards` and `objective`."""

    kind: str                     # the checkpoint's kind: "labeler" or "student"
    resume_free: tuple[str, ...]  # flags that may change between a run and its resumption
    shards: Path                  # the dataset evaluated after each epoch (its val split)
    mean: tuple[float, ...]       # the model's input normalisation
    std: tuple[float, ...]
    objective: Objective
    data: DataIdentity            # what the run learns from: {"train images": (content digest, folder), ...}
    view_shift: float = 0.0       # a labeler's eval-view shift (labeler.receptive); 0 for students
    dense_head_trained: bool = True  # whether the loss trains the model's per-token head (evaluate, checkpoint)

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device, self.rank, self.world = setup_distributed(args.device)
        self.epoch = self.step = 0

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    def setup(self, model: nn.Module, data: TrainSplit, *, model_name: str, num_classes: int, img_size: int,
              model_kwargs: dict[str, Any] | None = None, find_unused: bool = False) -> None:
        """Steps per epoch, optimisation and the module DDP wraps, for `model` trained on `data`."""
        a = self.args
        self.model, self.train_data = model, data
        self.identity = {"model_name": model_name, "num_classes": num_classes, "img_size": img_size,
                         "model_kwargs": model_kwargs or {}, "classes": data.manifest.classes}
        deal(data, a.batch_size, self.world, a.workers)
        self.steps = steps_per_epoch(data, a.batch_size, self.world, a.max_steps, a.workers)
        if a.lr is None:  # DeiT's linear rule: --lr-base per 512 images of global batch
            a.lr = a.lr_base * a.batch_size * self.world / 512
        self.optim = Optimization(model, a, self.steps, self.device)
        self.module = training_module(model, find_unused)

    def loader(self) -> DataLoader:
        """This epoch's training batches; with whole shards dealt, no more workers than this rank has shards."""
        data = self.train_data
        workers = self.args.workers if data.split_samples else min(self.args.workers, len(data.rank_shards()))
        return DataLoader(data, batch_size=self.args.batch_size, num_workers=workers, drop_last=True,
                          collate_fn=data.collate, pin_memory=self.device.type == "cuda")

    def resume(self) -> None:
        a = self.args
        path = resume_point(a)
        if path is None:
            return
        ckpt = read_checkpoint(path)
        check_resumable(ckpt, path, a, self.identity["num_classes"], self.identity["img_size"])
        state = ckpt["train_state"]
        check_same_run(state["args"], a, path, self.resume_free)
        check_same_data(state.get("data"), self.data, path)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optim.ema.module.load_state_dict(ckpt["ema"])
        self.optim.load_state_dict(state)
        self.epoch, self.step = state["epoch"], state["step"]
        if self.main_process:
            rewrite_metrics(a.out / "metrics.jsonl", self.epoch)
            print(f"resumed from {path} after epoch {self.epoch}", file=sys.stderr)

    def save(self) -> None:
        state = {"epoch": self.epoch, "step": self.step, **self.optim.state_dict(), "args": saved_args(self.args),
                 "data": self.data}
        save_checkpoint(self.args.out / "last.pt", **self.identity, model=self.model, ema=self.optim.ema.module,
                        train_state=state, kind=self.kind, dense_head_trained=self.dense_head_trained)

    def evaluate(self, corruptions: tuple[str, ...] = ()) -> dict[str, Any]:
        """core.engine.evaluate on the val split with the EMA weights (clean only, unless corruptions are given)."""
        a = self.args
        return evaluate(self.optim.ema.module, self.shards, self.identity["img_size"], device=self.device,
                        batch_size=a.batch_size, workers=a.workers, corruptions=corruptions, mean=self.mean,
                        std=self.std, shift=self.view_shift, dense_head=self.dense_head_trained)

    def train_epoch(self) -> dict[str, float]:
        a = self.args
        self.train_data.set_epoch(self.epoch)
        metrics, self.step = train_one_epoch(self.objective, self.optim, self.loader(), epoch=self.epoch,
                                             step=self.step, steps=self.steps, log_interval=a.log_interval,
                                             desc=f"epoch {self.epoch + 1}/{a.epochs}", show=self.main_process)
        return metrics

    @contextlib.contextmanager
    def run_folder(self) -> Iterator[None]:
        """DIR, created if need be; on rank 0 its lock, held until the run ends, the run marker of a new DIR, and no
        checkpoint temporaries of a killed writer."""
        out = self.args.out
        new = not out.is_dir() or not any(out.iterdir())
        out.mkdir(parents=True, exist_ok=True)
        busy = f"{out}: another trainer is writing this run folder"
        with exclusive_lock(out / RUN_LOCK, busy) if self.main_process else contextlib.nullcontext():
            if self.main_process:
                if new:
                    write_marker(out, "run", trainer=self.kind)
                for stale in out.glob("last.pt.partial-*"):  # a writer killed mid-save left it; the lock is ours
                    stale.unlink()
            yield

    def run(self) -> None:
        """In the run folder: resume, then train and evaluate epoch after epoch up to --epochs (or --stop-after),
        then `finish`."""
        a = self.args
        with self.run_folder():
            self.resume()
            stop = min(a.epochs, a.stop_after or a.epochs)
            while self.epoch < stop:
                started = time.time()
                train = self.train_epoch()
                self.epoch += 1
                self.write_epoch({"epoch": self.epoch, **self.evaluate(), **train, "lr": self.optim.lr,
                                  "time": time.time() - started})
            if self.main_process:
                print(f"{a.out / 'last.pt'}: {self.epoch}/{a.epochs} epochs", flush=True)
            if self.epoch == a.epochs:
                self.finish()

    def write_epoch(self, record: dict[str, Any]) -> None:
        """Rank 0 appends the epoch's record to metrics.jsonl, saves last.pt and prints the record; all wait."""
        if self.main_process:
            with open(self.args.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.save()
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                           if not isinstance(v, dict)), flush=True)
        barrier()

    def finish(self) -> None:
        """What a complete run does last (nothing by default)."""


def run_training(trainer: type[Trainer], args: argparse.Namespace) -> None:
    """Build and run a trainer; leave the process group however it ends."""
    try:
        trainer(args).run()
    finally:
        leave_distributed()
