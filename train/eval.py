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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from corrupt_tta import corrupt, corruption_dict
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A labeler or student checkpoint's model with its EMA weights, in eval mode, and its identity."""
    ckpt = read_checkpoint(path)
    if ckpt.get("kind", "labeler") == "labeler":
        return load_labeler(path, device)
    from train.students import build_student

    model = build_student(ckpt["model"], ckpt["num_classes"], ckpt["img_size"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"])
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


@torch.no_grad()
def run_split(model: nn.Module, reader: ShardReader, device: torch.device, batch_size: int, workers: int,
              desc: str) -> dict[str, float | None]:
    """One pass over a split: accuracies by the class head and the combined score, and token counts."""
    loader = DataLoader(reader, batch_size=batch_size, num_workers=workers)
    correct = correct_combined = total = 0
    tokens = TokenCounts()
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        images, labels = batch["image"].to(device), batch["cls"].to(device)
        cls_logits, token_logits, grid = model.forward_dense(images)
        combined = cls_logits + 0.5 * token_logits.max(dim=1).values
        correct += int((cls_logits.argmax(-1) == labels).sum())
        correct_combined += int((combined.argmax(-1) == labels).sum())
        total += len(labels)
        if "mask" in batch:
            tokens = tokens + token_accuracy(token_logits, grid, batch["mask"].to(device), labels)
    if total == 0:
        raise UserError(f"{reader.manifest.root}: split '{reader.split}' yielded no samples")
    return {"top1": 100.0 * correct / total, "top1_combined": 100.0 * correct_combined / total,
            **(tokens.rates() if tokens.fg_total + tokens.bg_total else {})}


def evaluate(model: nn.Module, shards: str | Path, img_size: int, *, split: str = "val", device: str = "cpu",
             batch_size: int = 256, workers: int = 2, corruptions: tuple[str, ...] = CORRUPTIONS,
             severities: tuple[int, ...] = SEVERITIES) -> dict[str, Any]:
    """Clean metrics, then class-head top-1 under each corruption and severity, and their mean (corrupt_acc)."""
    device = torch.device(device)
    model = model.to(device).eval()
    results: dict[str, Any] = run_split(model, ShardReader(shards, split, transform=EvalTransform(img_size)),
                                        device, batch_size, workers, "eval clean")
    corrupted = {}
    for name in corruptions:
        for severity in severities:
            reader = ShardReader(shards, split, transform=EvalTransform(img_size, name, severity))
            corrupted[f"{name}/{severity}"] = run_split(model, reader, device, batch_size, workers,
                                                        f"eval {name}/{severity}")["top1"]
    if corrupted:
        results["corrupt_acc"] = float(np.mean(list(corrupted.values())))
        results["corrupted"] = corrupted
    return results


def mean_corruption_error(results: dict[str, Any], baseline: dict[str, Any]) -> float:
    """ImageNet-C mCE: per corruption, summed errors over severities relative to the baseline's; mean, in %."""
    ratios = []
    for name in sorted({key.split("/")[0] for key in results["corrupted"]}):
        keys = [k for k in results["corrupted"] if k.split("/")[0] == name]
        missing = [k for k in keys if k not in baseline.get("corrupted", {})]
        if missing:
            raise UserError(f"baseline eval has no result for {missing[0]}; evaluate both with the same corruptions")
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


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="DIR/last.pt of labeler.train or train.student")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS),
                        help=f"names from corrupt-tta (default: {' '.join(CORRUPTIONS)}); none to skip")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES))
    parser.add_argument("--baseline", type=Path, help="run folder or eval JSON of the baseline for mCE")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.corruptions) - set(corruption_dict))
    if unknown:
        raise UserError(f"unknown corruption {unknown[0]!r}; choose from {', '.join(sorted(corruption_dict))}")
    model, meta = load_model(args.checkpoint, args.device)
    results = evaluate(model, args.shards, args.img_size or meta["img_size"], split=args.split, device=args.device,
                       batch_size=args.batch_size, workers=args.workers, corruptions=tuple(args.corruptions),
                       severities=tuple(args.severities))
    if args.baseline:
        results["mce"] = mean_corruption_error(results, read_eval(args.baseline))
        results["mce_baseline"] = str(args.baseline)
    results["checkpoint"] = str(args.checkpoint)
    out = args.out or args.checkpoint.parent / EVAL_JSON
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "corrupted"}, indent=1))


if __name__ == "__main__":
    main()
