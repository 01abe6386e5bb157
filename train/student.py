"""Train a student from offline token labels: `python -m train.student --labels STORE --model MODEL --epochs E --out DIR`.

Loss = class cross-entropy + beta x mean token cross-entropy against the stored labeler maps, re-applied through
each sample's recorded spatial transforms. `--no-token-labels` trains the same student on image labels only,
everything else equal. `--online-labeler CKPT` runs a labeler inside the loop instead (STL's design), to measure
what the offline store saves. Writes DIR/last.pt each epoch (resumable exactly), DIR/metrics.jsonl (one JSON
object per epoch) and, at the end, DIR/eval.json (train.checkpoint_eval, val split). Runs under torchrun for DDP.
"""

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import random_seed

from common.errors import UserError, cli
from core.corruptions import CORRUPTIONS, check_corruptions
from core.flags import HelpFormatter, add_training_flags, check_training_args
from core.resume import dataset_identity
from core.trainer import Trainer, run_training
from dump.store.reader import SHARDS_HELP, open_store
from labeler.load import load_labeler
from shards.manifest import load_manifest
from train.augment import INTERPOLATIONS, LabelAwareTransform
from train.checkpoint_eval import EVAL_JSON
from train.data import AUGMENT_ON, StudentData, resolve_labels
from train.models import build_student, model_input_size
from train.objective import COMPILE_MODES, MIX_MODES, TL_ALIGN_MODES, StepConfig, StudentObjective
from train.targets import TOKEN_TARGET_KINDS

DEFAULTS = {"batch-size": 64, "lr-base": 5e-4, "min-lr": 1e-5, "warmup-epochs": 1, "weight-decay": 0.05,
            "drop-path": 0.1, "smoothing": 0.1, "aa": "rand-m9-mstd0.5-inc1", "color-jitter": 0.4, "reprob": 0.25,
            "crop-scale": 0.08, "ema-decay": 0.998}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--labels", type=Path, required=True, help="a label store (.zarr), or a dataset folder holding exactly one "
                                                  "under labels/ (with --no-token-labels or --online-labeler: any "
                                                  "dataset folder)")
    a("--shards", type=Path, help=SHARDS_HELP)
    a("--model", required=True, help="timm vit_*/deit_*/volo_* or a FAN model (fan_demo_tiny_p8, ...)")
    a("--out", type=Path, required=True, help="run folder: last.pt, metrics.jsonl, eval.json")
    add_training_flags(p, DEFAULTS, required=("epochs",))
    a("--no-token-labels", action="store_true", help="baseline: class loss only, everything else equal")
    a("--online-labeler", type=Path, help="labeler checkpoint run inside the loop on the clean view (STL's online "
                                          "teacher) instead of the store")
    a("--img-size", type=int, help="input side (default: the store's or online labeler's input size, else the "
                                    "model's own: 64 for the demo models)")
    a("--patch-size", type=int, help="ViT/DeiT patch size override")
    a("--interpolation", choices=INTERPOLATIONS, default="bicubic", help="resampling of the train view "
                                                                         "(random: bilinear or bicubic per sample)")
    a("--augment-on", choices=AUGMENT_ON, help="where the train view is rendered: workers (PIL, in the DataLoader "
                                               "workers) or device (the workers only draw it; JPEG decoding, warp, "
                                               "colour ops and erasing batched on the training device); default: "
                                               "device on CUDA, workers on the CPU")
    a("--beta", type=float, default=1.0, help="weight of the mean token cross-entropy")
    a("--target", choices=TOKEN_TARGET_KINDS, default="gumbel", help="token targets from the stored maps")
    a("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    a("--map-weight", type=float, default=0.0, help="blend of the map's pooled label into the class target")
    a("--points", type=int, default=2, help="sample points per token side when resampling the stored map")
    a("--mix", choices=MIX_MODES, default="none", help="batch mixing; mixtoken mixes after patch embedding")
    a("--mixup-alpha", type=float, default=0.8, help="Mixup's Beta(alpha, alpha)")
    a("--cutmix-alpha", type=float, default=1.0, help="CutMix's and MixToken's Beta(alpha, alpha)")
    a("--mix-prob", type=float, default=1.0, help="share of mixed batches (cutmix, mixup, both)")
    a("--switch-prob", type=float, default=0.5, help="with --mix both: share of CutMix batches")
    a("--tl-align", choices=TL_ALIGN_MODES, default="off",
      help="TL-Align: paper (source-image labels, class target) or dense (the token maps, both targets)")
    a("--compile", nargs="?", const="default", choices=list(COMPILE_MODES), metavar="MODE",
      help="torch.compile the label path, the loss and the student's forward (not under MixToken draws or TL-Align, "
           "which hook into the model); MODE: default, reduce-overhead (CUDA graphs), max-autotune, or aot_eager "
           "(graph capture without code generation: a quick check). Off unless given: on CPU it did not pay")
    a("--final-corruptions", nargs="*", default=list(CORRUPTIONS),
      help="ImageNet-C corruptions of the final evaluation (severities 1, 3, 5); none or no name: clean only")
    return p


def check_args(a: argparse.Namespace) -> None:
    """Refuse values that would fail late or silently (one line naming the flag)."""
    check_training_args(a)
    for name, ok, rule in (("beta", a.beta >= 0, "at least 0"), ("points", a.points >= 1, "at least 1")):
        if not ok:
            raise UserError(f"--{name} {getattr(a, name)}: must be {rule}")
    if a.online_labeler is not None and a.no_token_labels:
        raise UserError("--online-labeler and --no-token-labels exclude each other")
    check_corruptions(a.final_corruptions)


class Run(Trainer):
    """A student's training run: the student, its label-aware data, the token-label objective, eval.json."""

    kind = "student"
    # flags that may differ between a run and its resumption without changing what it computes
    resume_free = ("labels", "shards", "online_labeler", "out", "resume", "stop_after", "workers", "device",
                   "final_corruptions", "log_interval", "compile")
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        a = args
        token_labels = self.dense_head_trained = not a.no_token_labels
        self.shards, store = resolve_labels(a.labels, token_labels and a.online_labeler is None, a.shards)
        manifest = load_manifest(self.shards)
        manifest.split("val")  # refuse a dataset without a val split now, not after training
        num_classes = manifest.num_classes
        if a.hflip is None:
            a.hflip = 0.5 if manifest.hflip else 0.0
        self.data = dataset_identity(manifest)
        self.labeler, labeler_input, store_input = None, None, None
        if a.online_labeler is not None:
            self.labeler, meta = load_labeler(a.online_labeler, self.device)
            if meta["num_classes"] != num_classes:
                raise UserError(f"{a.online_labeler}: labeler has {meta['num_classes']} classes, the shards "
                                f"{num_classes}; pass a labeler trained on {self.shards}")
            labeler_input, store = meta["img_size"], None
            self.data["online labeler"] = (meta["sha256"], str(a.online_labeler))
        if store is not None:
            opened = open_store(store)
            store_input = opened.footprint.get("input_size")
            if token_labels:
                self.data["label store"] = (opened.dump_id, str(store))
        self.img_size = a.img_size or store_input or labeler_input or model_input_size(a.model)[-1]
        model_kwargs = {"drop_path_rate": a.drop_path}
        if a.patch_size:
            model_kwargs["patch_size"] = a.patch_size
        random_seed(a.seed)  # the model's initialisation
        self.student = build_student(a.model, num_classes, self.img_size, **model_kwargs).to(self.device)
        self.grid = self.student.grid()
        transform = LabelAwareTransform(self.img_size, scale=(a.crop_scale, 1.0), hflip=a.hflip,
                                        auto_augment=None if a.aa == "none" else a.aa, color_jitter=a.color_jitter,
                                        interpolation=a.interpolation, re_prob=a.reprob, mean=self.mean, std=self.std)
        a.augment_on = a.augment_on or ("device" if self.device.type == "cuda" else "workers")
        # the online labeler sees the clean view at its own input size (STL: same crop and flips, no colour ops)
        self.train_data = StudentData(self.shards, store if token_labels else None, transform, seed=a.seed,
                                      clean_size=labeler_input, augment_on=a.augment_on)
        self.augment = self.train_data.device_stage(self.device) if a.augment_on == "device" else None
        self.setup(self.student, self.train_data, model_name=a.model, num_classes=num_classes,
                   img_size=self.img_size, model_kwargs=model_kwargs, find_unused=not token_labels)
        cfg = StepConfig(num_classes=num_classes, img_size=self.img_size, grid=self.grid, token_labels=token_labels,
                         beta=a.beta, target=a.target, tau=a.tau, smoothing=a.smoothing, map_weight=a.map_weight,
                         points=a.points, mix=a.mix, mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
                         mix_prob=a.mix_prob, switch_prob=a.switch_prob, tl_align=a.tl_align, seed=a.seed,
                         rank=self.rank)
        self.objective = StudentObjective(cfg, self.student, self.module, self.device, labeler=self.labeler,
                                          amp_dtype=self.optim.amp_dtype, compile=a.compile)

    def loader(self) -> Iterable[dict[str, Any]]:
        """This epoch's training batches; with --augment-on device, augmented on the device as they come."""
        batches = super().loader()
        return batches if self.augment is None else self.augment.batches(batches)

    def finish(self) -> None:
        """eval.json: the final evaluation, with the --final-corruptions."""
        a = self.args
        results = self.evaluate(check_corruptions(a.final_corruptions))
        if not self.main_process:
            return
        results["checkpoint"] = str(a.out / "last.pt")
        (a.out / EVAL_JSON).write_text(json.dumps(results, indent=1) + "\n")
        print(f"{a.out / EVAL_JSON}: " + ", ".join(f"{key} {results[key]:.2f}" for key in
                                                   ("top1", "top1_combined", "corrupt_acc") if key in results), flush=True)


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    run_training(Run, args)


if __name__ == "__main__":
    main()
