"""Train a student from offline token labels: `python -m train.student --labels STORE --model MODEL --epochs E --out DIR`.

Loss = class cross-entropy + beta x mean token cross-entropy against the stored labeler maps, re-applied through
each sample's recorded spatial transforms. `--no-token-labels` trains the same student on image labels only,
everything else equal. `--online-labeler CKPT` runs a labeler inside the loop instead (STL's design), to measure
what the offline store saves. Writes DIR/last.pt each epoch (resumable exactly), DIR/metrics.jsonl (one JSON
object per epoch) and, at the end, DIR/eval.json (train.eval on the val split). Runs under torchrun for DDP.
"""

import argparse
import json
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dump.store import open_store
from labeler.checkpoint import load_labeler, read_checkpoint, save_checkpoint
from labeler.train import check_resumable, resume_point, rewrite_metrics
from shards.errors import UserError, cli
from shards.manifest import load_manifest
from shards.reader import ShardReader
from train.augment import INTERPOLATIONS, LabelAwareTransform
from train.data import StudentData, resolve_labels
from train.engine import MIX_MODES, TL_ALIGN_MODES, StepConfig, StepRunner, TrainForward
from train.eval import CORRUPTIONS, EVAL_JSON, check_corruptions, evaluate
from train.students import build_student
from train.targets import TOKEN_TARGET_KINDS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; a flag's help ends with its default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--labels", type=Path, required=True, help="a label store <dataset>/labels/NAME.zarr, or a dataset folder "
                                                  "holding exactly one (with --no-token-labels or --online-labeler: "
                                                  "any dataset folder)")
    a("--model", required=True, help="timm vit_*/deit_*/volo_* or a FAN model (fan_demo_tiny_p8, ...)")
    a("--epochs", type=int, required=True, help="total epochs of the schedule")
    a("--out", type=Path, required=True, help="run folder: last.pt, metrics.jsonl, eval.json")
    a("--no-token-labels", action="store_true", help="baseline: class loss only, everything else equal")
    a("--online-labeler", type=Path, help="labeler checkpoint run inside the loop on the clean view (STL's online "
                                          "teacher) instead of the store")
    a("--img-size", type=int, help="input side (default: the store's or online labeler's input size, else 224)")
    a("--patch-size", type=int, help="ViT/DeiT patch size override")
    a("--batch-size", type=int, default=64, help="per process")
    a("--opt", default="adamw", help="timm optimizer name (timm.optim.list_optimizers())")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    a("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of warmup")
    a("--warmup-epochs", type=float, default=1, help="linear warmup epochs")
    a("--weight-decay", type=float, default=0.05, help="decoupled weight decay (AdamW)")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    a("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment config, or 'none'")
    a("--color-jitter", type=float, default=0.4, help="colour-jitter strength, used only with --aa none (as timm); "
                                                      "0: off")
    a("--reprob", type=float, default=0.25, help="random-erasing probability (image only)")
    a("--crop-scale", type=float, default=0.08, help="smallest area share of RandomResizedCrop")
    a("--hflip", type=float, default=0.5, help="horizontal flip probability")
    a("--interpolation", choices=INTERPOLATIONS, default="bicubic", help="resampling of the train view "
                                                                         "(random: bilinear or bicubic per sample)")
    a("--beta", type=float, default=1.0, help="weight of the mean token cross-entropy")
    a("--target", choices=TOKEN_TARGET_KINDS, default="gumbel", help="token targets from the stored maps")
    a("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    a("--smoothing", type=float, default=0.1, help="label smoothing of class and token targets")
    a("--map-weight", type=float, default=0.0, help="blend of the map's pooled label into the class target")
    a("--points", type=int, default=2, help="sample points per token side when resampling the stored map")
    a("--mix", choices=MIX_MODES, default="none", help="batch mixing; mixtoken mixes after patch embedding")
    a("--mixup-alpha", type=float, default=0.8, help="Mixup's Beta(alpha, alpha)")
    a("--cutmix-alpha", type=float, default=1.0, help="CutMix's and MixToken's Beta(alpha, alpha)")
    a("--mix-prob", type=float, default=1.0, help="share of mixed batches (cutmix, mixup, both)")
    a("--switch-prob", type=float, default=0.5, help="with --mix both: share of CutMix batches")
    a("--tl-align", choices=TL_ALIGN_MODES, default="off",
      help="TL-Align: paper (source-image labels, class target) or dense (the token maps, both targets)")
    a("--ema-decay", type=float, default=0.998, help="EMA decay (after timm's EMA warmup); eval uses the EMA")
    a("--clip-grad", type=float, help="max gradient norm (off by default)")
    a("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto", help="auto: bf16/fp16 on CUDA, off on CPU")
    a("--seed", type=int, default=0, help="seeds the initialisation, data order, augmentation and draws")
    a("--workers", type=int, default=2, help="DataLoader worker processes (per process)")
    a("--device", help="default: cuda when available, else cpu")
    a("--resume", type=Path, help="checkpoint to resume from (default: OUT/last.pt when it exists)")
    a("--stop-after", type=int, help="stop after this many epochs in total (resumable)")
    a("--final-corruptions", nargs="*", default=list(CORRUPTIONS),
      help="ImageNet-C corruptions of the final evaluation (severities 1, 3, 5); none or no name: clean only")
    a("--max-steps", type=int, help="cap on steps per epoch (smoke tests and benchmarks)")
    return p


def check_args(a: argparse.Namespace) -> None:
    """Refuse values that would fail late or silently (one line naming the flag)."""
    checks = {"epochs": (a.epochs >= 1, "at least 1"), "batch_size": (a.batch_size >= 1, "at least 1"),
              "workers": (a.workers >= 0, "at least 0"), "max_steps": (a.max_steps is None or a.max_steps >= 1,
                                                                       "at least 1"),
              "stop_after": (a.stop_after is None or a.stop_after >= 1, "at least 1"),
              "beta": (a.beta >= 0, "at least 0"), "smoothing": (0 <= a.smoothing < 1, "in [0, 1)"),
              "lr": (a.lr > 0, "positive"), "points": (a.points >= 1, "at least 1")}
    for name, (ok, rule) in checks.items():
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be {rule}")
    if a.online_labeler is not None and a.no_token_labels:
        raise UserError("--online-labeler and --no-token-labels exclude each other")
    if a.opt.lower() not in list_optimizers():
        raise UserError(f"--opt {a.opt}: not a timm optimizer; see timm.optim.list_optimizers()")
    check_corruptions(a.final_corruptions)


def setup_distributed(device_arg: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world size); under torchrun initialises the process group (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device_arg:
        return torch.device(device_arg), rank, world
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


def steps_per_epoch(data: ShardReader, batch_size: int, world: int, cap: int | None) -> int:
    """The same step count on every rank: the smallest rank's full batches (ranks hold different shards)."""
    counts = [len(ShardReader(data.manifest.root, data.split, shuffle=True, seed=data.seed, rank=r, world_size=world))
              if world > 1 else len(data) for r in range(world)]
    steps = min(counts) // batch_size
    if steps == 0:
        raise UserError(f"{data.manifest.root}: a rank holds {min(counts)} training images, fewer than "
                        f"--batch-size {batch_size}; lower it")
    return min(steps, cap) if cap else steps


# flags that may differ between a run and its resumption without changing what it computes
RESUME_FREE = ("labels", "online_labeler", "out", "resume", "stop_after", "workers", "device", "final_corruptions")


def saved_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def check_same_run(saved: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Exact resumption needs the flags the checkpoint was trained with; name the first that differs."""
    now = saved_args(args)
    changed = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if changed:
        flag = changed[0]
        raise UserError(f"{path}: trained with --{flag.replace('_', '-')} {saved.get(flag)}, this run has "
                        f"{now[flag]}; resume with the checkpoint's flags ({len(changed)} differ) or use another --out")


class Run:
    """A student's training run: model, data, optimiser, schedule, EMA, checkpoints and metrics."""

    def __init__(self, args: argparse.Namespace):
        self.args = a = args
        self.device, self.rank, self.world = setup_distributed(a.device)
        token_labels = not a.no_token_labels
        self.shards, store = resolve_labels(a.labels, need_store=token_labels and a.online_labeler is None)
        manifest = load_manifest(self.shards)
        manifest.split("val")  # refuse a dataset without a val split now, not after training
        self.num_classes = manifest.num_classes
        self.labeler, labeler_input, store_input = None, None, None
        if a.online_labeler is not None:
            self.labeler, meta = load_labeler(a.online_labeler, self.device)
            if meta["num_classes"] != self.num_classes:
                raise UserError(f"{a.online_labeler}: labeler has {meta['num_classes']} classes, the shards "
                                f"{self.num_classes}; pass a labeler trained on {self.shards}")
            labeler_input, store = meta["img_size"], None
        if store is not None:
            store_input = open_store(store).footprint.get("input_size")
        self.img_size = a.img_size or store_input or labeler_input or 224
        self.model_kwargs = {"drop_path_rate": a.drop_path}
        if a.patch_size:
            self.model_kwargs["patch_size"] = a.patch_size
        torch.manual_seed(a.seed)
        self.student = build_student(a.model, self.num_classes, self.img_size, **self.model_kwargs).to(self.device)
        self.grid = self.student.grid()
        transform = LabelAwareTransform(self.img_size, scale=(a.crop_scale, 1.0), hflip=a.hflip,
                                        auto_augment=None if a.aa == "none" else a.aa, color_jitter=a.color_jitter,
                                        interpolation=a.interpolation, re_prob=a.reprob,
                                        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        # the online labeler sees the clean view at its own input size (STL: same crop and flips, no colour ops)
        self.train_data = StudentData(self.shards, store if token_labels else None, transform, seed=a.seed,
                                      clean_size=labeler_input)
        self.steps = steps_per_epoch(self.train_data, a.batch_size, self.world, a.max_steps)
        self.optimizer = create_optimizer_v2(self.student, opt=a.opt, lr=a.lr, weight_decay=a.weight_decay)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched="cosine", num_epochs=a.epochs,
                                                warmup_epochs=a.warmup_epochs, warmup_lr=a.warmup_lr,
                                                min_lr=a.min_lr, step_on_epochs=False,
                                                updates_per_epoch=self.steps)
        self.ema = ModelEmaV3(self.student, decay=a.ema_decay, use_warmup=True, warmup_power=3 / 4)
        module = TrainForward(self.student)
        if self.world > 1:
            module = DistributedDataParallel(module, find_unused_parameters=not token_labels)
        amp_dtype, self.scaler = amp_setup(a.amp, self.device)
        cfg = StepConfig(num_classes=self.num_classes, img_size=self.img_size, grid=self.grid,
                         token_labels=token_labels, beta=a.beta, target=a.target, tau=a.tau, smoothing=a.smoothing,
                         map_weight=a.map_weight, points=a.points, mix=a.mix, mixup_alpha=a.mixup_alpha,
                         cutmix_alpha=a.cutmix_alpha, mix_prob=a.mix_prob, switch_prob=a.switch_prob,
                         tl_align=a.tl_align, clip_grad=a.clip_grad, seed=a.seed, rank=self.rank)
        self.runner = StepRunner(cfg, self.student, self.optimizer, self.device, module=module,
                                 labeler=self.labeler, amp_dtype=amp_dtype, scaler=self.scaler)
        self.epoch = self.step = 0

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    def resume(self) -> None:
        a = self.args
        a.out.mkdir(parents=True, exist_ok=True)
        path = resume_point(a)
        if path is None:
            return
        ckpt = read_checkpoint(path)
        check_resumable(ckpt, path, a, self.num_classes, self.img_size)
        state = ckpt["train_state"]
        check_same_run(state["args"], a, path)
        self.student.load_state_dict(ckpt["state_dict"])
        self.ema.module.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        if self.main_process:
            rewrite_metrics(a.out / "metrics.jsonl", self.epoch)
            print(f"resumed from {path} after epoch {self.epoch}", file=sys.stderr)

    def loader(self) -> DataLoader:
        """This epoch's training batches; no more workers than this rank has shards (a worker reads whole shards)."""
        workers = min(self.args.workers, len(self.train_data.rank_shards()))
        return DataLoader(self.train_data, batch_size=self.args.batch_size, num_workers=workers, drop_last=True,
                          pin_memory=self.device.type == "cuda")

    def train_epoch(self) -> dict[str, float]:
        a = self.args
        self.train_data.set_epoch(self.epoch)
        sums: dict[str, float] = {}
        started, seen = time.time(), 0
        bar = tqdm(total=self.steps, desc=f"epoch {self.epoch + 1}/{a.epochs}", leave=False,
                   disable=None if self.main_process else True)
        for batch in islice(self.loader(), self.steps):
            parts = self.runner.step(batch, self.epoch, self.step)
            self.step += 1
            self.scheduler.step_update(num_updates=self.step)
            self.ema.update(self.student, step=self.step)
            seen += len(batch["cls"])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update()
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
        bar.close()
        seconds = time.time() - started
        means = self.mean_over_ranks({f"train_{k}": v / self.steps for k, v in sums.items()})
        return means | {"train_time": seconds, "train_samples_per_s": seen * self.world / seconds}

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank means -> means over the global batch (ranks hold equal batches)."""
        if self.world == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world).tolist()))

    def save(self) -> None:
        a = self.args
        state = {"epoch": self.epoch, "step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "args": saved_args(a)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(a.out / "last.pt", model_name=a.model, num_classes=self.num_classes, img_size=self.img_size,
                        model=self.student, ema=self.ema.module, train_state=state, model_kwargs=self.model_kwargs,
                        kind="student")

    def evaluate(self, corruptions: tuple[str, ...] = ()) -> dict[str, Any]:
        """train.eval on the val split with the EMA weights (clean only, unless corruptions are given)."""
        a = self.args
        return evaluate(self.ema.module, self.shards, self.img_size, device=self.device, batch_size=a.batch_size,
                        workers=a.workers, corruptions=corruptions)

    def run(self) -> None:
        a = self.args
        self.resume()
        stop = min(a.epochs, a.stop_after or a.epochs)
        while self.epoch < stop:
            started = time.time()
            record = self.train_epoch()
            self.epoch += 1
            if self.main_process:
                record = {"epoch": self.epoch, **self.evaluate(), **record, "lr": self.optimizer.param_groups[0]["lr"],
                          "time": time.time() - started}
                with open(a.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                self.save()
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
            if self.world > 1:
                dist.barrier()
        if self.main_process and self.epoch == a.epochs:
            results = self.evaluate(check_corruptions(a.final_corruptions))
            results["checkpoint"] = str(a.out / "last.pt")
            (a.out / EVAL_JSON).write_text(json.dumps(results, indent=1) + "\n")
            print(f"{a.out / EVAL_JSON}: top1 {results['top1']:.2f}, top1_combined {results['top1_combined']:.2f}"
                  + (f", corrupt_acc {results['corrupt_acc']:.2f}" if "corrupt_acc" in results else ""), flush=True)


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        Run(args).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
