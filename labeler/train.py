"""Train a token labeler on shards from image labels only: STL's FAN-TL, or any timm classifier LV-ViT's way.

`python -m labeler.train --shards shards/demo --model fan_demo_tiny_p8 --epochs E --out DIR` writes DIR/last.pt
(every epoch; its EMA weights are what a label dump uses) and DIR/metrics.jsonl (one JSON object per epoch:
epoch, the evaluation of core.engine on the val split, with the label-quality report where the dataset has
masks, train losses, world_size, train_samples, lr, time). The objective is the CE of the image label against
the mean of the per-position logits, plus (FAN-TL) the class token's CE. A FAN model is FAN-TL; any other timm
model is applied at every position of its features (labeler.dense; the demo CNN is cnn_demo_s8).
`--pretrained-file PATH` starts from a local weights file; with `--epochs 0` it only writes the checkpoint (and
evaluates it), so a pretrained timm classifier becomes a labeler without training.
A run resumes from DIR/last.pt (or --resume) and then continues exactly as if it had never stopped. Under
`torchrun --nproc_per_node N -m labeler.train ...` it trains with DDP: --batch-size is per process, each rank
reads its own shards, rank 0 alone writes. Defaults follow STL's FAN-TL recipe, or for models named *demo* a
recipe tuned for the demo set on a CPU.
"""

import argparse
from pathlib import Path
from typing import Any

from timm.data import Mixup, create_transform
from timm.utils import random_seed

import labeler  # noqa: F401  (registers the FAN models with timm)
from common.errors import UserError, cli
from core.data import TrainSplit
from core.flags import HelpFormatter, add_training_flags, check_training_args
from core.posterize import safe_posterize
from core.resume import dataset_identity
from core.trainer import Trainer, run_training
from labeler.dense import DenseClassifier, build_labeler
from labeler.objective import FanTLObjective
from labeler.receptive import input_shift, token_geometry
from shards.manifest import load_manifest

# STL's FAN-TL recipe (scripts/fan_token_labeler, per-GPU batch) and the recipe for the demo models on 2 CPU cores.
RECIPES: dict[str, dict[str, Any]] = {
    "stl": dict(epochs=350, batch_size=128, lr_base=1e-3, warmup_epochs=5, weight_decay=0.05, drop_path=0.05,
                smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.3,
                crop_scale=0.08, ema_decay=0.99992),
    "demo": dict(epochs=8, batch_size=32, lr=1e-3, warmup_epochs=1, weight_decay=0.05, drop_path=0.0,
                 smoothing=0.1, mixup=0.0, cutmix=0.0, aa="none", color_jitter=0.0, reprob=0.0, crop_scale=1.0,
                 hflip=0.0, ema_decay=0.998),
}


def recipe_for(model_name: str) -> str:
    return "demo" if "demo" in model_name else "stl"


def build_parser() -> argparse.ArgumentParser:
    def recipe_note(flag: str) -> str:
        key = flag.replace("-", "_")
        stl, demo = RECIPES["stl"].get(key), RECIPES["demo"].get(key)
        return f" (default: {stl}; demo models: {demo})" if stl is not None or demo is not None else ""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json (train and val splits)")
    p.add_argument("--model", required=True, help="a FAN model (FAN-TL; fan_demo_tiny_p8, fan_small_12_p4_hybrid, ...), the "
                                                  "demo CNN cnn_demo_s8, or any timm CNN / ViT classifier")
    p.add_argument("--out", type=Path, required=True, help="output folder: last.pt and metrics.jsonl")
    add_training_flags(p, {"min-lr": 1e-6}, recipe_note)
    p.add_argument("--mixup", type=float, help="Mixup alpha (0 = off)" + recipe_note("mixup"))
    p.add_argument("--cutmix", type=float, help="CutMix alpha (0 = off)" + recipe_note("cutmix"))
    p.add_argument("--cls-weight", type=float, help="weight of the class-token CE (default: 1 for FAN; 0 for other "
                                                    "models, whose class logits are the pooled position logits)")
    p.add_argument("--dense-weight", type=float, default=1.0, help="weight of the CE of the pooled per-patch logits")
    p.add_argument("--pool-share", type=float, default=1.0, help="per class, pool the mean of this share of the "
                                                                 "largest per-patch logits (1: STL's mean)")
    p.add_argument("--img-size", type=int, help="input side (default: the model's, 64 for demo models, else 224)")
    p.add_argument("--pretrained-file", type=Path, help="start from this local weights file (safetensors or a torch "
                                                        "state dict of the model); --epochs 0: no training")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the model's recipe (STL's, or the demo one) filling what was not given."""
    args = build_parser().parse_args(argv)
    for key, value in RECIPES[recipe_for(args.model)].items():
        if getattr(args, key) is None and not (key == "lr_base" and args.lr is not None):
            setattr(args, key, value)
    check_training_args(args, allow_no_epochs=args.pretrained_file is not None)
    if not 0 < args.pool_share <= 1:
        raise UserError(f"--pool-share {args.pool_share}: must be in (0, 1]")
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
        mixing = a.mixup > 0 or a.cutmix > 0
        if mixing and a.batch_size % 2:
            raise UserError(f"--batch-size {a.batch_size}: Mixup/CutMix need an even batch size")
        self.shards, num_classes = a.shards, manifest.num_classes
        self.data = dataset_identity(manifest)
        if a.hflip is None:
            a.hflip = 0.5 if manifest.hflip else 0.0
        random_seed(a.seed)  # the model's initialisation
        model = build_labeler(a.model, num_classes, a.pretrained_file, drop_path_rate=a.drop_path).to(self.device)
        if a.cls_weight is None:
            a.cls_weight = 0.0 if isinstance(model, DenseClassifier) else 1.0
        cfg = model.pretrained_cfg
        img_size = a.img_size or cfg["input_size"][-1]
        self.view_shift = input_shift(token_geometry(model, img_size))
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
                                        cls_weight=a.cls_weight, dense_weight=a.dense_weight,
                                        pool_share=a.pool_share, device=self.device,
                                        amp_dtype=self.optim.amp_dtype, seed=a.seed, rank=self.rank)

    def finish(self) -> None:
        """With --epochs 0 (a --pretrained-file labeler): the checkpoint of the file's weights, and their evaluation."""
        if self.args.epochs == 0 and not (self.args.out / "metrics.jsonl").is_file():
            self.write_epoch({"epoch": 0, **self.evaluate()})


@cli
def main(argv: list[str] | None = None) -> None:
    run_training(LabelerRun, parse_args(argv))


if __name__ == "__main__":
    main()
