"""The engine both trainers run, in DeiT's shape: `train_one_epoch` over an objective, and `evaluate`.

An objective is the trainer's own part of a step: `objective(batch, epoch, step) -> (loss, parts)` draws the
step's randomness from its seed (core.seeding.step_seed), moves the batch to the device, runs the model under
autocast and returns the loss and its detached parts (FAN-TL: labeler.objective; token labels:
train.objective). Everything else of a step is here and in core.optim.
"""

import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.errors import UserError
from core.corruptions import SEVERITIES
from core.distributed import mean_over_ranks, sum_over_ranks, world_size
from core.eval_data import EvalPasses
from core.label_quality import MIXED, LabelQuality, top1_confidence
from core.optim import Optimization
from shards.manifest import load_manifest

Objective = Callable[[Any, int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_step(objective: Objective, optim: Optimization, batch: Any, epoch: int, step: int) -> dict[str, torch.Tensor]:
    """One optimizer step on `batch` as step `step` of `epoch` draws it; the loss and its parts, detached, on
    the device (reading them is the caller's choice: it waits for the device)."""
    loss, parts = objective(batch, epoch, step)
    optim.step(loss, step + 1)
    return {"loss": loss.detach(), **{f"loss_{name}": value for name, value in parts.items()}}


def train_one_epoch(objective: Objective, optim: Optimization, batches: Iterable[dict[str, Any]], *, epoch: int,
                    step: int, steps: int, log_interval: int = 50, desc: str = "", show: bool = True
                    ) -> tuple[dict[str, float], int]:
    """`steps` optimizer steps; returns (train_* means over steps and ranks, samples, time) and the new global step.

    The loss parts add up on the device; the host reads them only every `log_interval` steps and at the end,
    where a non-finite loss stops the run.
    """
    started, seen, sums, checked = time.time(), 0, None, step
    bar = tqdm(total=steps, desc=desc, leave=False, disable=None if show else True)
    for done, batch in enumerate(islice(batches, steps), start=1):
        parts = train_step(objective, optim, batch, epoch, step)
        step += 1
        seen += len(batch["cls"])
        values = torch.stack(list(parts.values())).double()
        sums = values if sums is None else sums + values
        bar.update()
        if done % log_interval == 0 or done == steps:
            means = dict(zip(parts, (sums / done).tolist()))
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(f"loss is {means['loss']} over steps {checked + 1}-{step} of epoch "
                                         f"{epoch + 1}; lower --lr or check the data")
            checked = step
            bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{optim.lr:.2e}")
    bar.close()
    if sums is None or done != steps:
        raise RuntimeError(f"the training data gave {0 if sums is None else done} of {steps} batches in epoch {epoch + 1}")
    seconds, world = time.time() - started, world_size()
    means = dict(zip(parts, mean_over_ranks(sums / steps).tolist()))
    return {**{f"train_{name}": value for name, value in means.items()}, "world_size": world,
            "train_samples": seen * world, "train_time": seconds, "train_samples_per_s": seen * world / seconds}, step


@torch.no_grad()
def evaluate(model: nn.Module, shards: str | Path, img_size: int, *, split: str = "val",
             device: str | torch.device = "cpu", batch_size: int = 256, workers: int = 2,
             corruptions: tuple[str, ...] = (), severities: tuple[int, ...] = SEVERITIES, crop_pct: float = 1.0,
             mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
             shift: float = 0.0, dense_head: bool = True) -> dict[str, Any]:
    """A labeler's or student's accuracies on a split, in percent, from its `forward_dense`.

    Clean: top1 (class head), top1_combined (class logits + 0.5 x per-class max over token logits, the score
    LV-ViT and STL report), top1_pooled (the mean token logits) and, where the shards have masks, the
    label-quality report of core.label_quality (per token cell; `shift` is the labeler's view shift,
    labeler.receptive). Then, per corruption and severity, class-head top-1 (`corrupted`) and their mean
    (corrupt_acc). Under torchrun every rank evaluates its shards of the split and the counts are summed, so
    every rank gets the whole split's result.
    With dense_head=False (a model whose per-token head was never trained: a --no-token-labels student) the
    results hold nothing read from the token logits, and `dense_head_trained` says why.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    grid = None
    if load_manifest(shards).has_masks:  # the token grid, to tell what each token's cell shows
        grid = tuple(model.forward_dense(torch.zeros(1, 3, img_size, img_size, device=device))[2])
    settings = [(None, 0)] + [(name, severity) for name in corruptions for severity in severities]
    data = EvalPasses(shards, split, img_size, settings, crop_pct=crop_pct, mean=mean, std=std, shift=shift,
                      grid=grid)
    shards_per_pass = len(data.readers[0].rank_shards())
    loader = DataLoader(data, batch_size=batch_size, num_workers=min(workers, shards_per_pass),
                        pin_memory=device.type == "cuda")
    counts = torch.zeros(4, len(settings), dtype=torch.long, device=device)  # class, combined, pooled, all
    quality = LabelQuality.zeros(device)
    count = partial(torch.bincount, minlength=len(settings))
    bar = tqdm(total=len(data), desc=f"eval {split}", leave=False, unit="img", disable=None)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["cls"].to(device, non_blocking=True)
        setting = batch["setting"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_logits, token_logits, grid = model.forward_dense(images)
        cls_logits, token_logits = cls_logits.float(), token_logits.float()
        combined = cls_logits + 0.5 * token_logits.max(dim=1).values
        for row, logits in enumerate((cls_logits, combined, token_logits.mean(1))):
            counts[row] += count(setting[logits.argmax(-1) == labels])
        counts[3] += count(setting)
        if grid is not None:  # label quality of the clean pass (corrupted samples' cells count as not scored)
            truth = torch.where((setting == 0)[:, None], batch["truth"].to(device, non_blocking=True), MIXED)
            quality = quality + LabelQuality.measure(*top1_confidence(token_logits), truth, labels)
        bar.update(len(labels))
    bar.close()
    counts, quality = sum_over_ranks(counts).tolist(), LabelQuality(sum_over_ranks(quality.sums))
    correct, combined, pooled, total = counts
    if total[0] == 0:
        raise UserError(f"{shards}: split '{split}' yielded no samples")
    accuracy = [100.0 * c / n for c, n in zip(correct, total)]
    results: dict[str, Any] = {"top1": accuracy[0], "top1_combined": 100.0 * combined[0] / total[0],
                               "top1_pooled": 100.0 * pooled[0] / total[0], **(quality.rates() if grid is not None else {})}
    if not dense_head:  # an untrained head's token logits would only add noise to these scores
        results = {"top1": results["top1"]}
    results["dense_head_trained"] = dense_head
    if len(settings) > 1:
        results["corrupted"] = {f"{name}/{severity}": acc for (name, severity), acc in zip(settings[1:], accuracy[1:])}
        results["corrupt_acc"] = float(np.mean(accuracy[1:]))
    return results
