"""How good a store's token labels are, against the dataset's masks: `python -m dump.quality STORE [--shards DIR]`.

Per map cell (core.label_quality): accuracy on target-object cells, accuracy on other objects' cells (their own
class), what background cells say, and confidence on object vs background cells. A store that repeats the image
class everywhere scores 0 on other objects' cells; the report prints that reference beside the store's figures.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, cli
from core.label_quality import LabelQuality, cell_truth, top1_confidence
from dump.store.checks import check_matches
from dump.store.reader import SHARDS_HELP, open_store, store_shards
from dump.store.schema import footprint_box
from shards.manifest import load_manifest
from shards.reader import read_shard


def store_quality(store_path: str | Path, shards: str | Path | None = None) -> dict[str, Any]:
    """The quality report of every labelled row of the store (rates as core.label_quality.LabelQuality.rates)."""
    store = open_store(store_path)
    manifest = load_manifest(store_shards(store, shards))
    if not manifest.has_masks:
        raise UserError(f"{manifest.root}: the dataset has no masks (.mask.png); label quality needs them")
    split = store.attrs["dataset"]["split"]
    check_matches(store, manifest, split)
    quality, grid, valid = LabelQuality.zeros(), store.grid, store.valid()
    bar = tqdm(total=store.num_rows, unit="img", desc="label quality", disable=None)
    for position, (name, _) in enumerate(manifest.shards(split)):
        start, stop = store.shard_rows(position)
        scores, classes = store.read_rows(start, stop)
        rows, truths, labels = [], [], []
        for sample in read_shard(manifest.root, split, name, manifest=manifest):
            if valid[sample["index"]]:
                box = footprint_box(store.footprint, *sample["image"].size)
                truths.append(cell_truth(np.asarray(sample["mask"]), box, grid))
                rows.append(sample["index"] - start)
                labels.append(sample["cls"])
        if rows:
            logits = torch.from_numpy(scores[rows].astype(np.float32)).flatten(2).transpose(1, 2)  # [n, HW, k]
            _, confidence = top1_confidence(logits, logits.shape[-1])
            predicted = torch.from_numpy(classes[rows, 0].astype(np.int64)).flatten(1)
            quality += LabelQuality.measure(predicted, confidence, torch.from_numpy(np.stack(truths)),
                                            torch.tensor(labels))
        bar.update(stop - start)
    bar.close()
    return {"store": str(store.path), "labeler": store.attrs["labeler"]["model"], **quality.rates()}


def format_report(report: dict[str, Any]) -> str:
    """A small table of the report, with what a labeler repeating the image class everywhere would score."""
    def cell(value: float | None, unit: str = "%") -> str:
        return "-" if value is None else f"{value:.1f}{unit}" if unit == "%" else f"{value:.2f}"

    n = report["label_cells"]
    lines = [f"label quality of {report['store']} (labeler {report['labeler']}), per map cell:",
             "| cells | count | this store | image class everywhere |", "|---|---|---|---|",
             f"| target object: top-1 = image class | {n['target']} | {cell(report['label_target_acc'])} | 100% |",
             f"| other objects: top-1 = their own class | {n['other']} | {cell(report['label_other_acc'])} | 0% |",
             f"| background: top-1 = image class | {n['background']} | "
             f"{cell(report['label_background_image_class'])} | 100% |",
             f"| confidence, object / background cells | | {cell(report['label_object_confidence'], '')} / "
             f"{cell(report['label_background_confidence'], '')} | |"]
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, help="label store (a .zarr folder)")
    parser.add_argument("--shards", type=Path, help=SHARDS_HELP)
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = store_quality(args.store, args.shards)
    print(format_report(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
