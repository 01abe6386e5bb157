"""The results table (docs/results.md): student variants on a pipeline's stores, mean and spread over seeds.

`python -m pipeline.results --pipeline demo --seeds 0 1 2 --jobs 2` prepares the pipeline's dataset, labelers,
dumps and label-quality reports (skipped when up to date), trains every variant once per seed at equal epochs
(each a stage of the pipeline's runner: reused while its flags and its store are the same, else redone; an
interrupted one resumed; with --jobs > 1 each logs to <runs>/stages/NAME.log), and writes the table
between the markers of docs/results.md. Every variant is the pipeline's first token-label student (model,
epochs, args) plus the variant's flags, reading the store of the variant's labeler (the first unless named).
"""

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from common.errors import UserError, cli
from pipeline.config import check_pipeline, load_pipelines
from pipeline.runner import ROOT, Runner, Stage, flags, read_json, read_jsonl

BASELINE = "no token labels"


def variants(labelers: list[str]) -> dict[str, dict]:
    """Variant name -> the flags it adds ("labels": the labeler whose store it reads, default the first)."""
    first = labelers[0]
    return {
        BASELINE: {"no-token-labels": True},
        **{f"token labels from {name} (Gumbel)": {"labels": name} for name in labelers},
        f"{first}, softmax targets": {"target": "softmax"},
        f"{first}, argmax targets": {"target": "argmax"},
        f"{first}, crop-level label as half the class target (--map-weight 0.5)": {"map-weight": 0.5},
        f"{first}, CutMix with mixed maps": {"mix": "cutmix"},
        f"{first}, MixToken": {"mix": "mixtoken"},
        "CutMix, no token labels": {"no-token-labels": True, "mix": "cutmix"},
        "TL-Align, paper form (CutMix, no token labels)": {"no-token-labels": True, "mix": "cutmix",
                                                           "tl-align": "paper"},
        f"{first}, TL-Align dense form (CutMix)": {"mix": "cutmix", "tl-align": "dense"},
    }


def read_run(folder: Path) -> dict:
    """A finished run's eval.json, with its training seconds (`time`) and top-1 after epoch 1 (`first`)."""
    ev = read_json(folder / "eval.json")
    epochs_run = read_jsonl(folder / "metrics.jsonl")
    return {**ev, "time": sum(m["time"] for m in epochs_run), "first": epochs_run[0]["top1"]}


def paired_gain(results: list[dict], baseline: list[dict], key: str) -> str:
    """Mean ± sd of `key`'s per-seed differences to the baseline, marked `> 2 sd` when the mean exceeds twice the sd."""
    gains = [r[key] - b[key] for r, b in zip(results, baseline)]
    mean, spread = mean_sd(gains)
    return f"{mean:+.2f} ± {spread:.2f}" + (" (> 2 sd)" if len(gains) > 1 and mean > 2 * spread else "")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean, spread = mean_sd(values)
    return f"{mean:.2f} ± {spread:.2f}"


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--file", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the pipeline's first student's)")
    parser.add_argument("--model", help="student model (default: the pipeline's first student with token labels)")
    parser.add_argument("--args", help="JSON of flags every variant shares (default: that student's args)")
    parser.add_argument("--corruptions", nargs="*", default=["gaussian_noise", "motion_blur", "fog", "contrast"])
    parser.add_argument("--variants", nargs="*", help="a subset of the variant names")
    parser.add_argument("--name", default="", help="a suffix of the run folders and of the table's markers in "
                                                   "--out, to keep apart tables made with other --args")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores / jobs torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    pipeline = load_pipelines(args.file).get(args.pipeline)
    if pipeline is None:
        raise UserError(f"{args.file}: no pipeline '{args.pipeline}'")
    check_pipeline(pipeline)
    student = next((s for s in pipeline.students if s.token_labels), None)
    if student is None:
        raise UserError(f"{args.file}: pipeline '{args.pipeline}' has no student with token labels to vary")
    model, epochs = args.model or student.model, args.epochs or student.epochs
    shared = json.loads(args.args) if args.args else student.args
    table_variants = variants([labeler.name for labeler in pipeline.labelers])
    for name in args.variants or []:
        if name not in table_variants:
            raise UserError(f"--variants: unknown variant {name!r}; choose from {', '.join(table_variants)}")
    names = args.variants or list(table_variants)
    runner = Runner(pipeline)
    runner.prepare(args.jobs)
    folder = runner.runs / f"results{args.name}"
    out = {(name, seed): folder / slug(name) / f"seed{seed}" for name in names for seed in args.seeds}
    stages: list[Stage] = []
    for (name, seed), run in out.items():  # each a stage: redone when its flags or its store changed
        variant = dict(table_variants[name])
        labels = variant.pop("labels", None)
        config = {"model": model, "epochs": epochs, "seed": seed, "corruptions": args.corruptions,
                  "flags": {**shared, **variant}}
        runner.student(stages, f"results{args.name}-{slug(name)}-seed{seed}", config, labels, model, epochs,
                       run, "--seed", str(seed), "--final-corruptions", *args.corruptions,
                       "--workers", "1" if args.jobs > 1 else "2", *flags(config["flags"]))
    runner.execute(stages, args.jobs)
    rows, seed_rows = [], []
    quality = {lab.name: read_json(runner.runs / lab.name / "quality.json") for lab in pipeline.labelers}
    by_variant = {name: [read_run(out[name, seed]) for seed in args.seeds] for name in names}
    baseline = by_variant.get(BASELINE)
    for name, results in by_variant.items():
        variant = table_variants[name]
        labels = "-" if variant.get("no-token-labels") else pipeline.labeler_name(variant.get("labels"))
        other = quality.get(labels, {}).get("label_other_acc")
        combined = [r["top1_combined"] for r in results if "top1_combined" in r]  # none without a dense head
        rows.append(f"| {name} | {labels} | {'-' if other is None else f'{other:.1f}'} | "
                    f"{mean_spread([r['top1'] for r in results])} | {mean_spread(combined)} | "
                    f"{mean_spread([r['corrupt_acc'] for r in results])} | {min(r['first'] for r in results):.1f} | "
                    f"{mean_spread([r['time'] for r in results])} |")
        gains = [paired_gain(results, baseline, key) if baseline and name != BASELINE else "-"
                 for key in ("top1", "corrupt_acc")]
        seed_rows.append(f"| {name} | " + " | ".join(f"{r['top1']:.2f}" for r in results) + f" | {' | '.join(gains)} |")
    table = "\n".join([
        f"Student `{model}` {json.dumps(shared)}, {epochs} epochs, seeds {args.seeds}, {args.jobs} run(s) at a "
        f"time; corruptions {', '.join(args.corruptions)} at severities 1, 3, 5. Labelers: "
        + ", ".join(f"{lab.name} (`{lab.model}`)" for lab in pipeline.labelers) + ". Command: "
        f"`python -m pipeline.results {shlex.join(sys.argv[1:] if argv is None else argv)}`.", "",
        "| variant | token labels from | their other-object cells right (%) | top-1 (class head) | top-1 (combined) "
        "| corrupted-val acc | top-1 after epoch 1 (lowest seed) | train s |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "Top-1 (class head) of each seed, and each variant's gain over the baseline of the same seed (mean ± sd of "
        "the paired differences; `> 2 sd` marks a mean gain above twice their spread):", "",
        "| variant | " + " | ".join(f"seed {seed}" for seed in args.seeds)
        + f" | gain over {BASELINE}, paired by seed: top-1 | corrupted-val acc |",
        "|---|" + "---|" * (len(args.seeds) + 2), *seed_rows])
    begin, end = f"<!-- results{args.name}:begin -->", f"<!-- results{args.name}:end -->"
    text = args.out.read_text() if args.out.is_file() else "# Results\n"
    text = text if begin in text else f"{text.rstrip()}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin)
    args.out.write_text(f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}")
    print(table)


if __name__ == "__main__":
    main()
