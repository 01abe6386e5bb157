"""Evaluation of a labeler or student checkpoint: top-1 (class head, combined, pooled), label quality, corruptions.

`python -m train.checkpoint_eval CHECKPOINT --shards shards/demo [--baseline RUN_DIR]` runs
core.engine.evaluate, the evaluation labeler.train and train.student run after every epoch, on the checkpoint's
EMA weights, and prints and writes JSON with:
- top1: the class head alone; top1_combined: class logits + 0.5 x per-class max over token logits (the score
  LV-ViT and STL report); top1_pooled: the mean of the token logits (what FAN-TL trains its dense head for);
- the label-quality report of core.label_quality where the shards have masks;
- dense_head_trained: false for a student trained without token labels, whose per-token head never got a loss:
  then nothing read from its token logits (top1_combined, top1_pooled, label quality) is reported;
- corrupt_acc: mean class-head top-1 over a fixed set of ImageNet-C corruptions (the `corrupt-tta` package) at
  fixed severities, applied to the eval view's uint8 image, seeded per sample; with a baseline's eval JSON,
  mce: ImageNet-C's mean corruption error, sum over severities of errors relative to the baseline's, in percent.
Every image is seen through the eval view (core.imaging.boxes): the centred square of side --crop-pct x its
shorter side. A checkpoint that records its dataset's class names (`classes`) is evaluated only on shards with the
same names, in order.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from common.errors import UserError, cli
from core.checkpoint import read_checkpoint
from core.corruptions import CORRUPTIONS, SEVERITIES, check_baseline, check_corruptions, mean_corruption_error
from core.engine import evaluate
from labeler.load import load_labeler
from labeler.receptive import input_shift, token_geometry
from shards.manifest import Manifest, load_manifest
from train.models import build_student

EVAL_JSON = "eval.json"


def load_model(path: str | Path, device: str | torch.device = "cpu",
               img_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A labeler or student checkpoint's model with its EMA weights, in eval mode, and its identity.

    A student is built for `img_size` (default: the size it was trained at); one whose weights are tied to its
    training size (position embeddings of timm ViTs and VOLO) is refused at another size.
    """
    ckpt = read_checkpoint(path)
    if ckpt.get("kind", "labeler") == "labeler":
        model, meta = load_labeler(path, device)
        return model, {**meta, "classes": ckpt.get("classes")}
    size = img_size or ckpt["img_size"]
    model = build_student(ckpt["model"], ckpt["num_classes"], size, **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        raise UserError(f"{path}: {ckpt['model']} was trained at {ckpt['img_size']} px and its weights do not fit "
                        f"{size} px ({str(e).splitlines()[-1].strip()}); evaluate without --img-size") from e
    meta = {"kind": "student", **{k: ckpt[k] for k in ("model", "num_classes", "img_size")},
            "classes": ckpt.get("classes")}
    meta["dense_head_trained"] = ckpt.get("dense_head_trained", True)
    return model.to(device).eval(), meta


def check_classes(checkpoint: Path, classes: list[str] | None, manifest: Manifest) -> None:
    """Refuse (one line) shards whose class names differ from those the checkpoint records (if it records them)."""
    here = manifest.classes
    if classes is None or classes == here:
        return
    at = next(i for i in range(max(len(classes), len(here))) if classes[i:i + 1] != here[i:i + 1])
    raise UserError(f"{checkpoint}: trained on {len(classes)} classes, {manifest.root} has {len(here)}, and class "
                    f"{at} is {(classes[at:at + 1] or ['none'])[0]!r} there but {(here[at:at + 1] or ['none'])[0]!r} "
                    "here; evaluate it on the dataset it was trained on")


def read_eval(path: str | Path) -> dict[str, Any]:
    """A run's eval JSON, given the file or the run folder holding eval.json."""
    path = Path(path)
    path = path / EVAL_JSON if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: no eval results; run `python -m train.checkpoint_eval` on its checkpoint first")
    return json.loads(path.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="DIR/last.pt of labeler.train or train.student")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="side of the centred square the model sees, "
                                                                    "as a share of the shorter side (default: 1)")
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
    check_classes(args.checkpoint, meta["classes"], load_manifest(args.shards))
    size = args.img_size or meta["img_size"]
    # students train on ImageNet's normalisation (train.student); a labeler on its model's data config, and it
    # sees the view its dump renders (shifted where its tokens are off-centre, labeler.receptive)
    shift = input_shift(token_geometry(model, size)) if meta["kind"] == "labeler" else 0.0
    results = evaluate(model, args.shards, size, split=args.split, device=args.device,
                       batch_size=args.batch_size, workers=args.workers, corruptions=corruptions,
                       severities=tuple(args.severities), crop_pct=args.crop_pct,
                       mean=meta.get("mean", IMAGENET_DEFAULT_MEAN), std=meta.get("std", IMAGENET_DEFAULT_STD),
                       shift=shift, dense_head=meta.get("dense_head_trained", True))
    if baseline is not None:
        results["mce"] = mean_corruption_error(results, baseline)
        results["mce_baseline"] = str(args.baseline)
    results["checkpoint"] = str(args.checkpoint)
    out = args.out or args.checkpoint.parent / EVAL_JSON
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "corrupted"}, indent=1))


if __name__ == "__main__":
    main()
