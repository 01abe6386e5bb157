"""Train a FAN token labeler (STL's FAN-TL) on shards: class-token CE plus CE of the mean per-patch logits.

`python -m labeler.train --shards shards/demo --model fan_demo_tiny_p8 --epochs E --out DIR` writes DIR/last.pt
(every epoch; its EMA weights are what a label dump uses) and DIR/metrics.jsonl (one JSON object per epoch:
epoch, the evaluation of core.engine on the val split, train losses, world_size, train_samples, lr, time).
A run resumes from DIR/last.pt (or --resume) and then continues exactly as if it had never stopped. Under
`torchrun --nproc_per_node N -m labeler.train ...` it trains with DDP: --batch-size is per process, each rank
reads its own shards, rank 0 alone writes. Defaults follow STL's FAN-TL recipe, or for models named *demo* a
recipe tuned for the demo set on a CPU.
"""

import argparse
from pathlib import Path
from typing import Any

import timm
from timm.data import Mixup, create_transform
from timm.utils import random_seed

import labeler  # noqa: F401  (registers the FAN models with timm)
from core.data import TrainSplit
from core.flags import HelpFormatter, add_training_flags, check_training_args
from core.posterize import safe_posterize
from core.trainer import Trainer, run_training
from labeler.objective import FanTLObjective
from shards.errors import UserError, cli
from shards.manifest import load_manifest

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
    def recipe_note(flag: str) -> str:
        key = flag.replace("-", "_")
        return f" (default: {RECIPES['stl'][key]}; demo models: {RECIPES['demo'][key]})" if key in RECIPES["stl"] else ""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json (train and val splits)")
    p.add_argument("--model", required=True, help="a registered FAN model, e.g. fan_demo_tiny_p8, fan_tiny_8_p4_hybrid")
    p.add_argument("--out", type=Path, required=True, help="output folder: last.pt and metrics.jsonl")
    add_training_flags(p, {"min-lr": 1e-6}, recipe_note)
    p.add_argument("--mixup", type=float, help="Mixup alpha (0 = off)" + recipe_note("mixup"))
    p.add_argument("--cutmix", type=float, help="CutMix alpha (0 = off)" + recipe_note("cutmix"))
    p.add_argument("--cls-weight", type=float, default=1.0, help="weight of the class-token CE")
    p.add_argument("--dense-weight", type=float, default=1.0, help="weight of the CE of the mean per-patch logits")
    p.add_argument("--img-size", type=int, help="input side (default: the model's, 64 for demo models, else 224)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the model's recipe (STL's, or the demo one) filling what was not given."""
    args = build_parser().parse_args(argv)
    for key, value in RECIPES[recipe_for(args.model)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_training_args(args)
    return args


class LabelerSample:
    """Worker-side: the sample's image through timm's training transform, and its class."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": self.transform(sample["image"]), "cls": sample["cls"]}


class LabelerRun(Trainer):
    """FAN-TL training of one labeler: timm's augmentation and Mixup/CutMix, the FAN-TL objective."""

    kind = "labeler"
    resume_free = ("shards", "out", "resume", "stop_after", "workers", "device", "log_interval")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        a = args
        manifest = load_manifest(a.shards)
        manifest.split("val")  # refuse a dataset without a val split now, not after training
        if not timm.is_model(a.model):
            raise UserError(f"--model {a.model}: not a registered model; FAN models: "
                            f"{', '.join(timm.list_models('fan_*'))}")
        mixing = a.mixup > 0 or a.cutmix > 0
        if mixing and a.batch_size % 2:
            raise UserError(f"--batch-size {a.batch_size}: Mixup/CutMix need an even batch size")
        self.shards, num_classes = a.shards, manifest.num_classes
        random_seed(a.seed)  # the model's initialisation
        model = timm.create_model(a.model, num_classes=num_classes, drop_path_rate=a.drop_path).to(self.device)
        cfg = model.pretrained_cfg
        img_size = a.img_size or cfg["input_size"][-1]
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        transform = safe_posterize(create_transform(
            img_size, is_training=True, scale=(a.crop_scale, 1.0), hflip=a.hflip,
            auto_augment=None if a.aa == "none" else a.aa, color_jitter=a.color_jitter,
            interpolation=cfg["interpolation"], mean=self.mean, std=self.std, re_prob=a.reprob, re_mode="pixel"))
        data = TrainSplit(a.shards, LabelerSample(transform), seed=a.seed)
        self.setup(model, data, model_name=a.model, num_classes=num_classes, img_size=img_size)
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.smoothing,
                      num_classes=num_classes) if mixing else None
        self.objective = FanTLObjective(self.module, num_classes, smoothing=a.smoothing, mixup=mixup,
                                        cls_weight=a.cls_weight, dense_weight=a.dense_weight, device=self.device,
                                        amp_dtype=self.optim.amp_dtype, seed=a.seed, rank=self.rank)


@cli
def main(argv: list[str] | None = None) -> None:
    run_training(LabelerRun, parse_args(argv))


if __name__ == "__main__":
    main()
