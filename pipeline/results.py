"""The results table (docs/results.md): student variants on one pipeline's store, mean and spread over seeds.

`python -m pipeline.results --pipeline demo --seeds 0 1 2 --epochs E` prepares the pipeline's dataset, labeler and
dump (skipped when up to date), trains every variant once per seed at equal epochs (a finished run is reused),
and writes the table between the markers of docs/results.md.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from pipeline.__main__ import ROOT, Runner, flags, read_json, read_jsonl
from pipeline.config import check_pipeline, load_pipelines
from shards.errors import UserError, cli

VARIANTS: dict[str, dict] = {
    "no token labels": {"no-token-labels": True},
    "token labels, Gumbel": {"target": "gumbel"},
    "token labels, softmax": {"target": "softmax"},
    "token labels, argmax": {"target": "argmax"},
    "CutMix with mixed maps": {"mix": "cutmix"},
    "MixToken": {"mix": "mixtoken"},
    "TL-Align, paper form (CutMix)": {"no-token-labels": True, "mix": "cutmix", "tl-align": "paper"},
    "TL-Align, dense form (CutMix)": {"mix": "cutmix", "tl-align": "dense"},
    "patch 16 (4x4 tokens) on the 8x8 maps": {"patch-size": 16},
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--args", default='{"patch-size": 8}', help="JSON of flags every variant shares")
    parser.add_argument("--corruptions", nargs="*", default=["gaussian_noise", "motion_blur", "fog", "contrast"])
    parser.add_argument("--variants", nargs="*", help="a subset of the variant names")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    pipeline = load_pipelines(ROOT / "pipelines.yaml").get(args.pipeline)
    if pipeline is None:
        raise UserError(f"pipelines.yaml: no pipeline '{args.pipeline}'")
    check_pipeline(pipeline)
    runner = Runner(pipeline)
    runner.prepare()
    shared = json.loads(args.args)
    labeler = read_jsonl(ROOT / pipeline.labeler.out / "metrics.jsonl")[-1]
    rows = []
    for name in args.variants or VARIANTS:
        if name not in VARIANTS:
            raise UserError(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        variant = {**shared, **VARIANTS[name]}
        results = []
        for seed in args.seeds:
            out = runner.runs / "results" / slug(name) / f"seed{seed}"
            if not (out / "eval.json").is_file():
                command = [sys.executable, "-m", "train.student", "--labels", str(runner.store), "--model", args.model,
                           "--epochs", str(args.epochs), "--out", str(out), "--seed", str(seed),
                           "--final-corruptions", *args.corruptions, *flags(variant)]
                print("$ " + " ".join(command[1:]), flush=True)
                if subprocess.run(command, cwd=ROOT).returncode != 0:
                    raise UserError(f"{out}: training failed; run the same command again to resume")
            ev = read_json(out / "eval.json")
            ev["time"] = sum(m["time"] for m in read_jsonl(out / "metrics.jsonl"))
            results.append(ev)
        token = "-" if variant.get("no-token-labels") else f"{labeler['token_fg_acc']:.1f}"
        rows.append(f"| {name} | {mean_spread([r['top1'] for r in results])} | "
                    f"{mean_spread([r['top1_combined'] for r in results])} | "
                    f"{mean_spread([r['corrupt_acc'] for r in results])} | {token} | "
                    f"{mean_spread([r['time'] for r in results])} |")
    table = "\n".join([
        f"Student `{args.model}` {json.dumps(shared)}, {args.epochs} epochs, seeds {args.seeds}; corruptions "
        f"{', '.join(args.corruptions)} at severities 1, 3, 5. Labeler `{pipeline.labeler.model}` "
        f"(val top-1 {labeler['top1']:.1f}). Command: `python -m pipeline.results --pipeline {args.pipeline} "
        f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}`.", "",
        "| variant | top-1 (class head) | top-1 (combined) | corrupted-val acc | labeler fg token acc | train s |",
        "|---|---|---|---|---|---|", *rows])
    text = args.out.read_text() if args.out.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN) if BEGIN in text else (text + "\n", END)
    args.out.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(table)


if __name__ == "__main__":
    main()
