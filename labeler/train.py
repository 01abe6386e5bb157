"""Train a FAN token labeler (STL's FAN-TL) on shards: class-token CE plus CE of the mean per-patch logits.

`python -m labeler.train --shards shards/demo --model fan_demo_tiny_p8 --epochs E --out DIR` writes DIR/last.pt
(every epoch; its EMA weights are what a label dump uses) and DIR/metrics.jsonl (one JSON object per epoch).
A run resumes from DIR/last.pt (or --resume) and then continues exactly as if it had never stopped.
Defaults follow STL's FAN-TL recipe, or for models named *demo* a recipe tuned for the demo set on a CPU.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.data.transforms import str_to_interp_mode
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

import labeler.fan  # noqa: F401  (registers the FAN models with timm)
from labeler.checkpoint import read_checkpoint, save_checkpoint
from labeler.metrics import TokenCounts, token_accuracy
from shards.errors import UserError, cli
from shards.reader import ShardReader, load_manifest
from train.augment import safe_posterize

# STL's FAN-TL recipe (scripts/fan_token_labeler, per-GPU batch) and the recipe for the demo models on 2 CPU cores.
RECIPES: dict[str, dict[str, Any]] = {
    "stl": dict(epochs=350, batch_size=128, lr=2e-3, warmup_epochs=5, weight_decay=0.05, drop_path=0.05,
                smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.3,
                crop_scale=0.08, hflip=0.5, ema_decay=0.99992),
    "demo": dict(epochs=8, batch_size=32, lr=1e-3, warmup_epochs=1, weight_decay=0.05, drop_path=0.0,
                 smoothing=0.1, mixup=0.0, cutmix=0.0, aa="none", color_jitter=0.0, reprob=0.0, crop_scale=1.0,
                 hflip=0.0, ema_decay=0.998),
}


def recipe_for(model_name: str) -> str:
    return "demo" if "demo" in model_name else "stl"


def build_parser() -> argparse.ArgumentParser:
    def recipe_help(text: str, key: str) -> str:
        return f"{text} (default: {RECIPES['stl'][key]}; demo models: {RECIPES['demo'][key]})"

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json (train and val splits)")
    p.add_argument("--model", required=True, help="a registered FAN model, e.g. fan_demo_tiny_p8, fan_tiny_8_p4_hybrid")
    p.add_argument("--out", type=Path, required=True, help="output folder: last.pt and metrics.jsonl")
    p.add_argument("--epochs", type=int, help=recipe_help("total epochs", "epochs"))
    p.add_argument("--batch-size", type=int, help=recipe_help("batch size", "batch_size"))
    p.add_argument("--lr", type=float, help=recipe_help("peak learning rate (AdamW)", "lr"))
    p.add_argument("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of warmup")
    p.add_argument("--warmup-epochs", type=float, help=recipe_help("linear warmup epochs", "warmup_epochs"))
    p.add_argument("--weight-decay", type=float, help=recipe_help("AdamW weight decay", "weight_decay"))
    p.add_argument("--drop-path", type=float, help=recipe_help("drop-path rate of every FAN block", "drop_path"))
    p.add_argument("--smoothing", type=float, help=recipe_help("label smoothing", "smoothing"))
    p.add_argument("--mixup", type=float, help=recipe_help("Mixup alpha (0 = off)", "mixup"))
    p.add_argument("--cutmix", type=float, help=recipe_help("CutMix alpha (0 = off)", "cutmix"))
    p.add_argument("--aa", help=recipe_help("timm RandAugment config, or 'none'", "aa"))
    p.add_argument("--color-jitter", type=float,
                   help=recipe_help("colour-jitter strength, used only when --aa is 'none'", "color_jitter"))
    p.add_argument("--reprob", type=float, help=recipe_help("random-erasing probability", "reprob"))
    p.add_argument("--crop-scale", type=float, help=recipe_help("smallest area share of RandomResizedCrop", "crop_scale"))
    p.add_argument("--hflip", type=float, help=recipe_help("horizontal flip probability", "hflip"))
    p.add_argument("--ema-decay", type=float, help=recipe_help("EMA decay (reached after timm's EMA warmup)", "ema_decay"))
    p.add_argument("--cls-weight", type=float, default=1.0, help="weight of the class-token CE")
    p.add_argument("--dense-weight", type=float, default=1.0, help="weight of the CE of the mean per-patch logits")
    p.add_argument("--img-size", type=int, help="input side (default: the model's, 64 for demo models, else 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--resume", type=Path, help="checkpoint to resume from (default: OUT/last.pt when it exists)")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs in total, leaving a checkpoint that "
                                                   "a later run with the same arguments resumes from")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the model's recipe (STL's, or the demo one) filling what was not given."""
    args = build_parser().parse_args(argv)
    for key, value in RECIPES[recipe_for(args.model)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class TrainTransform:
    """Sample dict -> (augmented image tensor, class); runs in the DataLoader workers."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self.transform(sample["image"]), sample["cls"]


class EvalTransform:
    """Sample dict -> (image tensor, class[, mask]): resize the short side to size / crop_pct, centre-crop to size.

    The mask (class + 1 per pixel) takes the same resize (nearest) and crop, so it lines up with the input pixels.
    """

    def __init__(self, size: int, crop_pct: float, interpolation: str, mean: tuple, std: tuple, with_mask: bool):
        scale = math.floor(size / crop_pct)
        self.image = T.Compose([T.Resize(scale, str_to_interp_mode(interpolation)), T.CenterCrop(size),
                                T.ToTensor(), T.Normalize(mean, std)])
        self.mask = T.Compose([T.Resize(scale, T.InterpolationMode.NEAREST), T.CenterCrop(size), T.PILToTensor()])
        self.with_mask = with_mask

    def __call__(self, sample: dict[str, Any]) -> tuple:
        out = (self.image(sample["image"]), sample["cls"])
        if not self.with_mask:
            return out
        if sample["mask"] is None:
            raise UserError(f"{sample['key']}: no .mask.png although manifest.json says the dataset has masks")
        return (*out, self.mask(sample["mask"])[0].long())


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def stl_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor, target: torch.Tensor,
             cls_weight: float, dense_weight: float) -> torch.Tensor:
    """STL's FAN-TL objective: both the class token and the mean of the per-patch logits learn the image label."""
    return (cls_weight * soft_cross_entropy(cls_logits, target)
            + dense_weight * soft_cross_entropy(token_logits.mean(1), target))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader(dataset: ShardReader, batch_size: int, workers: int, seed: int, train: bool) -> DataLoader:
    """Workers are seeded from (seed, epoch) alone, so an epoch's augmentations do not depend on what ran before."""
    generator = torch.Generator().manual_seed(seed * 100_003 + dataset.epoch)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=train, generator=generator,
                      pin_memory=torch.cuda.is_available())


def train_one_epoch(model: nn.Module, ema: ModelEmaV3, data: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, mixup: Mixup | None, args: argparse.Namespace, num_classes: int,
                    step: int, device: torch.device, desc: str) -> tuple[float, int]:
    """One pass over the training data; returns (mean loss, global step count)."""
    model.train()
    loss_sum, seen = 0.0, 0
    bar = tqdm(data, desc=desc, total=len(data.dataset) // args.batch_size, leave=False, disable=None)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixup is not None:
            images, target = mixup(images, labels)
        else:
            target = mixup_target(labels, num_classes, smoothing=args.smoothing)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_logits, token_logits, _ = model.forward_dense(images)
        loss = stl_loss(cls_logits, token_logits, target, args.cls_weight, args.dense_weight)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at step {step}; lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        scheduler.step_update(num_updates=step)
        ema.update(model, step=step)
        loss_sum += loss.item() * len(images)
        seen += len(images)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return loss_sum / max(seen, 1), step


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader, device: torch.device, with_masks: bool) -> dict[str, float | None]:
    """top1 (class token), top1_pooled (mean per-patch logits) and, with masks, the token accuracies; in percent."""
    model.eval()
    correct = correct_pooled = seen = 0
    counts = TokenCounts()
    for batch in tqdm(data, desc="eval", leave=False, disable=None):
        images, labels = batch[0].to(device), batch[1].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_logits, token_logits, grid = model.forward_dense(images)
        correct += int((cls_logits.argmax(-1) == labels).sum())
        correct_pooled += int((token_logits.mean(1).argmax(-1) == labels).sum())
        seen += len(labels)
        if with_masks:
            counts += token_accuracy(token_logits.float(), grid, batch[2].to(device), labels)
    metrics = {"top1": 100.0 * correct / seen, "top1_pooled": 100.0 * correct_pooled / seen}
    return {**metrics, **counts.rates()} if with_masks else metrics


def build_data(args: argparse.Namespace, cfg: dict, img_size: int, has_masks: bool) -> tuple[ShardReader, ShardReader]:
    """The shuffled, augmented train split and the val split (with masks when the dataset has them)."""
    train_tf = safe_posterize(create_transform(
        img_size, is_training=True, scale=(args.crop_scale, 1.0), hflip=args.hflip,
        auto_augment=None if args.aa == "none" else args.aa, color_jitter=args.color_jitter,
        interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"], re_prob=args.reprob, re_mode="pixel"))
    train_set = ShardReader(args.shards, "train", shuffle=True, seed=args.seed, transform=TrainTransform(train_tf))
    val_set = ShardReader(args.shards, "val", transform=EvalTransform(
        img_size, cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"], has_masks))
    if len(train_set) < args.batch_size:
        raise UserError(f"{args.shards}: {len(train_set)} training images, fewer than --batch-size {args.batch_size}")
    return train_set, val_set


def resume_point(args: argparse.Namespace) -> Path | None:
    if args.resume is not None:
        return args.resume
    last = args.out / "last.pt"
    return last if last.exists() else None


def check_resumable(ckpt: dict[str, Any], path: Path, args: argparse.Namespace, num_classes: int,
                    img_size: int) -> None:
    """A run resumes only the same model, classes, input size and schedule length it was started with."""
    if ckpt["model"] != args.model:
        raise UserError(f"{path}: checkpoint is of model {ckpt['model']}, not --model {args.model}; "
                        f"pass --model {ckpt['model']} or another --out")
    if ckpt["num_classes"] != num_classes or ckpt["img_size"] != img_size:
        raise UserError(f"{path}: checkpoint has {ckpt['num_classes']} classes at {ckpt['img_size']}px, this run "
                        f"{num_classes} at {img_size}px; use another --out")
    state = ckpt["train_state"]
    if "optimizer" not in state:
        raise UserError(f"{path}: checkpoint holds no training state to resume from; use another --out")
    if state["args"]["epochs"] != args.epochs:
        raise UserError(f"{path}: checkpoint follows a {state['args']['epochs']}-epoch schedule, not --epochs "
                        f"{args.epochs}; pass --epochs {state['args']['epochs']} or another --out")


def rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep the metrics lines of epochs the checkpoint has; a run killed after logging an epoch logs it again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= upto_epoch))


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    manifest = load_manifest(args.shards)
    if not timm.is_model(args.model):
        raise UserError(f"--model {args.model}: not a registered model; FAN models: {', '.join(timm.list_models('fan_*'))}")
    mixing = args.mixup > 0 or args.cutmix > 0
    if mixing and args.batch_size % 2:
        raise UserError(f"--batch-size {args.batch_size}: Mixup/CutMix need an even batch size")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_classes = manifest.num_classes
    seed_everything(args.seed)

    model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path).to(device)
    cfg = model.pretrained_cfg
    img_size = args.img_size or cfg["input_size"][-1]
    train_set, val_set = build_data(args, cfg, img_size, manifest.has_masks)
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True, warmup_power=3 / 4)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=len(train_set) // args.batch_size)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=num_classes) if mixing else None

    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path, last_path = args.out / "metrics.jsonl", args.out / "last.pt"
    start_epoch, step = 0, 0
    resume = resume_point(args)
    if resume is not None:
        ckpt = read_checkpoint(resume)
        check_resumable(ckpt, resume, args, num_classes, img_size)
        state = ckpt["train_state"]
        model.load_state_dict(ckpt["state_dict"])
        ema.module.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"], state["step"]
        set_rng_state(state["rng"])
        rewrite_metrics(metrics_path, start_epoch)
        print(f"resumed from {resume} after epoch {start_epoch}", file=sys.stderr)

    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start_epoch, stop):
        started = time.time()
        train_set.set_epoch(epoch)
        train_loss, step = train_one_epoch(
            model, ema, loader(train_set, args.batch_size, args.workers, args.seed, train=True), optimizer,
            scheduler, mixup, args, num_classes, step, device, desc=f"epoch {epoch + 1}/{args.epochs}")
        scheduler.step(epoch + 1)
        metrics = evaluate(ema.module, loader(val_set, args.batch_size, args.workers, args.seed, train=False),
                           device, manifest.has_masks)
        record = {"epoch": epoch + 1, **metrics, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                  "time": time.time() - started}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        train_state = {"epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": rng_state(),
                       "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        save_checkpoint(last_path, model_name=args.model, num_classes=num_classes, img_size=img_size,
                        model=model, ema=ema.module, train_state=train_state)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
    print(f"{last_path}: {stop}/{args.epochs} epochs", flush=True)


if __name__ == "__main__":
    main()
