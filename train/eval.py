"""Evaluation of a labeler or student checkpoint: top-1 (class head, combined), token-label quality, corruptions.

`python -m train.eval CHECKPOINT --shards shards/demo [--baseline RUN_DIR]` prints and writes JSON with:
- top1: the class head alone; top1_combined: class logits + 0.5 x per-class max over token logits (the score
  LV-ViT and STL report);
- token_fg_acc / token_bg_acc / token_distractor_acc where the shards have masks (see labeler.metrics);
- corrupt_acc: mean class-head top-1 over a fixed set of ImageNet-C corruptions (the `corrupt-tta` package) at
  fixed severities, applied to the centre-cropped uint8 image, seeded per sample; with a baseline's eval JSON,
  mce: ImageNet-C's mean corruption error, sum over severities of errors relative to the baseline's, in percent.
"""

import argparse
import json
import zlib
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from corrupt_tta import corrupt, corruption_dict
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from labeler.checkpoint import load_labeler, read_checkpoint
from labeler.metrics import TokenCounts, token_accuracy
from shards.errors import UserError, cli
from shards.reader import ShardReader

# one or two of each ImageNet-C family (noise, blur, weather, digital); all fast on small images
CORRUPTIONS = ("gaussian_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog", "snow", "contrast",
               "jpeg_compression")
SEVERITIES = (1, 3, 5)
EVAL_JSON = "eval.json"


def load_model(path: str | Path, device: str | torch.device = "cpu",
               img_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A labeler or student checkpoint's model with its EMA weights, in eval mode, and its identity.

    A student is built for `img_size` (default: the size it was trained at); one whose weights are tied to its
    training size (position embeddings of timm ViTs and VOLO) is refused at another size.
    """
    ckpt = read_checkpoint(path)
    if ckpt.get("kind", "labeler") == "labeler":
        return load_labeler(path, device)
    from train.students import build_student

    size = img_size or ckpt["img_size"]
    model = build_student(ckpt["model"], ckpt["num_classes"], size, **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        raise UserError(f"{path}: {ckpt['model']} was trained at {ckpt['img_size']} px and its weights do not fit "
                        f"{size} px ({str(e).splitlines()[-1].strip()}); evaluate without --img-size") from e
    meta = {k: ckpt[k] for k in ("model", "num_classes", "img_size")}
    return model.to(device).eval(), meta


def centre_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Shorter side to `size`, then the central size x size square, in one exact resampling."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return image.resize((size, size), resample=resample, box=box)


class EvalTransform:
    """Centre crop, optional corruption (seeded by key), normalise; the mask follows with nearest resampling."""

    def __init__(self, img_size: int, corruption: str | None = None, severity: int = 0):
        self.img_size, self.corruption, self.severity = img_size, corruption, severity
        self.mean = np.array(IMAGENET_DEFAULT_MEAN, np.float32) * 255
        self.std = np.array(IMAGENET_DEFAULT_STD, np.float32) * 255

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        pixels = np.asarray(centre_crop(sample["image"], self.img_size, Image.BICUBIC))
        if self.corruption:
            np.random.seed(zlib.crc32(f"{sample['key']}/{self.corruption}/{self.severity}".encode()))
            pixels = np.clip(corrupt(pixels, self.severity, self.corruption), 0, 255).astype(np.uint8)
        image = torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).astype(np.float32))
        out = {"image": image, "cls": sample["cls"]}
        if sample["mask"] is not None:
            mask = centre_crop(sample["mask"], self.img_size, Image.NEAREST)
            out["mask"] = torch.from_numpy(np.asarray(mask, np.int64))
        return out


def check_corruptions(names: Sequence[str], severities: Sequence[int] = SEVERITIES) -> tuple[str, ...]:
    """The corruption names of a command line, checked against corrupt-tta's (none, or `none` alone: clean only)."""
    names = () if list(names) == ["none"] else tuple(names)
    unknown = [name for name in names if name not in corruption_dict]
    if unknown:
        raise UserError(f"unknown corruption {unknown[0]!r}; choose from {', '.join(corruption_dict)} (or none)")
    bad = [s for s in severities if not 1 <= s <= 5]
    if bad:
        raise UserError(f"corruption severity {bad[0]} is out of range; ImageNet-C severities are 1 to 5")
    return names


class EvalPasses(IterableDataset):
    """A split once per setting (clean first, then each corruption/severity), every sample tagged with its setting.

    One DataLoader streams all passes, so its workers start once and never idle between passes. The whole split
    on every rank (evaluation runs on one process).
    """

    def __init__(self, shards: str | Path, split: str, img_size: int, settings: Sequence[tuple[str | None, int]]):
        self.readers = [ShardReader(shards, split, transform=EvalTransform(img_size, name, severity), rank=0,
                                    world_size=1) for name, severity in settings]

    def __len__(self) -> int:
        return sum(len(reader) for reader in self.readers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for setting, reader in enumerate(self.readers):
            for sample in reader:
                yield {**sample, "setting": setting}


@torch.no_grad()
def evaluate(model: nn.Module, shards: str | Path, img_size: int, *, split: str = "val",
             device: str | torch.device = "cpu", batch_size: int = 256, workers: int = 2,
             corruptions: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = SEVERITIES) -> dict[str, Any]:
    """Clean metrics (top1, top1_combined, token accuracies where there are masks), then class-head top-1 under
    each corruption and severity (`corrupted`) and their mean (corrupt_acc), all in percent."""
    device = torch.device(device)
    model = model.to(device).eval()
    settings = [(None, 0)] + [(name, severity) for name in corruptions for severity in severities]
    data = EvalPasses(shards, split, img_size, settings)
    shards_per_pass = len(data.readers[0].rank_shards())
    loader = DataLoader(data, batch_size=batch_size, num_workers=min(workers, shards_per_pass),
                        pin_memory=device.type == "cuda")
    correct = torch.zeros(len(settings), dtype=torch.long)
    correct_combined, total = torch.zeros_like(correct), torch.zeros_like(correct)
    tokens = TokenCounts()
    count = partial(torch.bincount, minlength=len(settings))
    bar = tqdm(total=len(data), desc=f"eval {split}", leave=False, unit="img", disable=None)
    for batch in loader:
        images, labels, setting = batch["image"].to(device), batch["cls"].to(device), batch["setting"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_logits, token_logits, grid = model.forward_dense(images)
        cls_logits, token_logits = cls_logits.float(), token_logits.float()
        combined = cls_logits + 0.5 * token_logits.max(dim=1).values
        correct += count(setting[(cls_logits.argmax(-1) == labels).cpu()])
        correct_combined += count(setting[(combined.argmax(-1) == labels).cpu()])
        total += count(setting)
        clean = (setting == 0).to(device)
        if "mask" in batch and clean.any():
            tokens = tokens + token_accuracy(token_logits[clean], grid, batch["mask"].to(device)[clean], labels[clean])
        bar.update(len(labels))
    bar.close()
    if total[0] == 0:
        raise UserError(f"{shards}: split '{split}' yielded no samples")
    accuracy = [100.0 * c / n for c, n in zip(correct.tolist(), total.tolist())]
    results: dict[str, Any] = {"top1": accuracy[0], "top1_combined": 100.0 * int(correct_combined[0]) / int(total[0]),
                               **(tokens.rates() if tokens.fg_total + tokens.bg_total else {})}
    if len(settings) > 1:
        results["corrupted"] = {f"{name}/{severity}": acc for (name, severity), acc in zip(settings[1:], accuracy[1:])}
        results["corrupt_acc"] = float(np.mean(accuracy[1:]))
    return results


def check_baseline(baseline: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse a baseline eval that lacks any of the corruption/severity results `keys` ("name/severity")."""
    missing = [k for k in keys if k not in baseline.get("corrupted", {})]
    if not keys or missing:
        raise UserError(f"baseline eval has no result for {missing[0] if missing else 'any corruption'}; "
                        "evaluate both with the same --corruptions and --severities")


def mean_corruption_error(results: dict[str, Any], baseline: dict[str, Any]) -> float:
    """ImageNet-C mCE: per corruption, summed errors over severities relative to the baseline's; mean, in %."""
    check_baseline(baseline, list(results.get("corrupted", {})))
    ratios = []
    for name in sorted({key.split("/")[0] for key in results["corrupted"]}):
        keys = [k for k in results["corrupted"] if k.split("/")[0] == name]
        error = sum(100 - results["corrupted"][k] for k in keys)
        base_error = sum(100 - baseline["corrupted"][k] for k in keys)
        ratios.append(error / max(base_error, 1e-9))
    return 100.0 * float(np.mean(ratios))


def read_eval(path: str | Path) -> dict[str, Any]:
    """A run's eval JSON, given the file or the run folder holding eval.json."""
    path = Path(path)
    path = path / EVAL_JSON if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: no eval results; run `python -m train.eval` on that run's checkpoint first")
    return json.loads(path.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="DIR/last.pt of labeler.train or train.student")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS),
                        help="names from corrupt-tta; none or no name: clean only (default: %(default)s)")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES),
                        help="ImageNet-C severities 1-5 (default: %(default)s)")
    parser.add_argument("--baseline", type=Path, help="run folder or eval JSON of the baseline for mCE")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: eval.json beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    corruptions = check_corruptions(args.corruptions, args.severities)
    baseline = read_eval(args.baseline) if args.baseline else None
    if baseline is not None:  # before the evaluation, not after it
        check_baseline(baseline, [f"{name}/{severity}" for name in corruptions for severity in args.severities])
    model, meta = load_model(args.checkpoint, args.device, args.img_size)
    results = evaluate(model, args.shards, args.img_size or meta["img_size"], split=args.split, device=args.device,
                       batch_size=args.batch_size, workers=args.workers, corruptions=corruptions,
                       severities=tuple(args.severities))
    if baseline is not None:
        results["mce"] = mean_corruption_error(results, baseline)
        results["mce_baseline"] = str(args.baseline)
    results["checkpoint"] = str(args.checkpoint)
    out = args.out or args.checkpoint.parent / EVAL_JSON
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "corrupted"}, indent=1))


if __name__ == "__main__":
    main()
