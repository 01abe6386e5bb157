"""Run a named pipeline of pipelines.yaml end to end: `python -m pipeline demo`.

Each stage runs its own command (the same ones a user types) in a subprocess. A stage is skipped when its
record under <runs>/stages/ says it finished with the same configuration (its own and that of every stage it
reads from); it is redone when the configuration changed. A run killed at any point resumes: finished stages
are skipped, the interrupted one resumes from its own checkpoint or completion flags.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import Pipeline, check_pipeline, load_pipelines
from shards.errors import UserError, cli
from shards.manifest import load_manifest
from shards.reader import split_keys

ROOT = Path(__file__).resolve().parents[1]


def flags(args: dict[str, Any]) -> list[str]:
    """{"batch-size": 64, "amp": True, "aa": None} -> ["--batch-size", "64", "--amp"]."""
    out: list[str] = []
    for key, value in args.items():
        if value is False or value is None:
            continue
        out.append(f"--{key.replace('_', '-')}")
        if value is not True:
            out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out


def identity(config: Any, *upstream: str) -> str:
    blob = json.dumps([config, *upstream], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Runner:
    def __init__(self, pipeline: Pipeline, python: str = sys.executable):
        self.p, self.python = pipeline, python
        self.runs = ROOT / pipeline.runs
        self.records = self.runs / "stages"
        self.shards = ROOT / pipeline.dataset.out
        self.summary: list[tuple[str, str, float]] = []
        self.dump_ids: dict[str, str] = {}  # labeler name -> identity of its dump stage

    def store(self, labeler: str | None = None) -> Path:
        """The store of a labeler (default: the first, the students' default)."""
        return self.shards / "labels" / f"{self.p.labeler_name(labeler)}.zarr"

    def stage(self, name: str, ident: str, outputs: list[Path], commands: list[list[str]], fresh: list[Path]) -> str:
        """Run a stage's commands unless its record matches `ident`; on a changed configuration clear `fresh` first."""
        record_path = self.records / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record and record["identity"] == ident and all(p.exists() for p in outputs):
            self.summary.append((name, "skipped (up to date)", record["seconds"]))
            return ident
        marker = self.records / f"{name}.started"  # identity of the last run begun: same = resume, else redo
        if marker.is_file() and marker.read_text() != ident:
            for path in fresh:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)
        marker.write_text(ident)
        print(f"\n== {self.p.name}: {name}", flush=True)
        started = time.time()
        for command in commands:
            print("$ " + " ".join(command[1:] if command[0] == self.python else command), flush=True)
            result = subprocess.run(command, cwd=ROOT)
            if result.returncode != 0:
                raise UserError(f"stage '{name}' failed (exit {result.returncode}); fix the cause and run the same "
                                "command again to resume")
        seconds = time.time() - started
        record_path.write_text(json.dumps({"identity": ident, "seconds": seconds}) + "\n")
        self.summary.append((name, "done", seconds))
        return ident

    def module(self, name: str, *args: str, launcher: list[str] | None = None) -> list[str]:
        """`python -m NAME ARGS`, or the stage's launcher (e.g. torchrun ...) in place of python."""
        return [*(launcher or [self.python]), "-m", name, *args]

    def run(self) -> None:
        """Every stage in order, then the summary table."""
        self.prepare()
        self.train_students()
        self.evaluate()
        self.pictures()
        print(self.table())

    def prepare(self) -> None:
        """Dataset, then per labeler its training, dump and label-quality report: what the students read."""
        p = self.p
        d = p.dataset
        if d.demo is not None:
            command = self.module("shards.demo", "--out", d.out, "--overwrite", *flags(d.demo), *flags(d.args))
        else:
            command = self.module("shards.build", "--imagefolder", d.imagefolder, "--out", d.out, "--overwrite",
                                  *flags(d.args))
        data_id = self.stage("dataset", identity(asdict(d)), [self.shards / "manifest.json"], [command], [])
        for lab in p.labelers:
            lab_dir = self.runs / lab.name
            lab_id = self.stage(f"labeler-{lab.name}", identity({**asdict(lab), "dump": None}, data_id),
                                [lab_dir / "last.pt"], [self.module(
                                    "labeler.train", "--shards", d.out, "--model", lab.model, "--epochs",
                                    str(lab.epochs), "--out", str(lab_dir), *flags(lab.args), launcher=lab.launcher)],
                                [lab_dir])
            dump_args = {"topk": lab.dump.topk, "input-size": lab.dump.input_size, **lab.dump.args}
            store = self.store(lab.name)
            self.dump_ids[lab.name] = self.stage(f"dump-{lab.name}", identity(asdict(lab.dump), lab_id), [store], [
                self.module("dump.dump_labels", "--shards", d.out, "--checkpoint", str(lab_dir / "last.pt"),
                            "--out", str(store), "--overwrite", *flags(dump_args))], [])
            if load_manifest(self.shards).has_masks:
                report = lab_dir / "quality.json"
                self.stage(f"quality-{lab.name}", self.dump_ids[lab.name], [report], [self.module(
                    "dump.quality", str(store), "--out", str(report))], [report])

    def train_students(self) -> None:
        p = self.p
        for s in p.students:
            out = self.runs / s.name
            extra = [] if s.token_labels else ["--no-token-labels"]
            dump_id = self.dump_ids[p.labeler_name(s.labels)]
            self.stage(f"student-{s.name}", identity(asdict(s), dump_id), [out / "last.pt"], [self.module(
                "train.student", "--labels", str(self.store(s.labels)), "--model", s.model, "--epochs", str(s.epochs),
                "--out", str(out), "--final-corruptions", *extra, *flags(s.args), launcher=s.launcher)], [out])

    def evaluate(self) -> None:
        p, d, e = self.p, self.p.dataset, self.p.eval
        names = sorted((s.name for s in p.students), key=lambda n: n != e.baseline)  # the baseline first
        for name in names:
            out = self.runs / name
            eval_args = {"corruptions": e.corruptions, "severities": e.severities, **e.args}
            base = ["--baseline", str(self.runs / e.baseline)] if e.baseline and name != e.baseline else []
            upstream = [self.stage_ident(f"student-{n}") for n in (name, e.baseline) if n]
            self.stage(f"eval-{name}", identity(asdict(e), name, *upstream),
                       [out / "eval.json"], [self.module("train.eval", str(out / "last.pt"), "--shards", d.out,
                                                         *base, *flags(eval_args))], [out / "eval.json"])

    def pictures(self) -> None:
        """Token-label pictures (dump.show) of the first train samples, from every labeler's store."""
        p, pictures = self.p, self.runs / "pictures"
        keys = split_keys(self.shards, "train")[: p.pictures.count]
        for lab in p.labelers:
            folder = pictures / lab.name
            self.stage(f"pictures-{lab.name}", identity(asdict(p.pictures), self.dump_ids[lab.name]), [folder], [
                self.module("dump.show", str(self.store(lab.name)), "--key", key, "--out",
                            str(folder / f"{key.replace('/', '_')}.png")) for key in keys], [folder])

    def stage_ident(self, name: str) -> str:
        path = self.records / f"{name}.json"
        return json.loads(path.read_text())["identity"] if path.is_file() else ""

    def table(self) -> str:
        """What the run made and measured, as markdown tables (also written to <runs>/summary.md)."""
        lines = [f"# pipeline {self.p.name}", "", "| stage | status | seconds |", "|---|---|---|"]
        lines += [f"| {n} | {s} | {t:.0f} |" for n, s, t in self.summary]
        lines += ["", "Labelers, and their token labels per map cell against the masks (dump.quality):", "",
                  "| labeler | model | val top-1 | target cells right | other objects' cells right | "
                  "background cells saying the image class | confidence object / background |",
                  "|---|---|---|---|---|---|---|"]
        for lab in self.p.labelers:
            top1 = last_metrics(self.runs / lab.name / "metrics.jsonl").get("top1")
            q = read_json(self.runs / lab.name / "quality.json")
            lines.append(f"| {lab.name} | {lab.model} | {fmt(top1)} | {fmt(q.get('label_target_acc'))} | "
                         f"{fmt(q.get('label_other_acc'))} | {fmt(q.get('label_background_image_class'))} | "
                         f"{fmt(q.get('label_object_confidence'))} / {fmt(q.get('label_background_confidence'))} |")
        lines += ["| (a labeler repeating the image class everywhere) | | | 100.00 | 0.00 | 100.00 | |", "",
                  "| student | model | token labels | top1 | top1 combined | corrupt acc | mCE | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in self.p.students:
            ev = read_json(self.runs / s.name / "eval.json")
            seconds = sum(m.get("time", 0) for m in read_jsonl(self.runs / s.name / "metrics.jsonl"))
            labels = self.p.labeler_name(s.labels) if s.token_labels else "no"
            lines.append(f"| {s.name} | {s.model} | {labels} | {fmt(ev.get('top1'))} | "
                         f"{fmt(ev.get('top1_combined'))} | {fmt(ev.get('corrupt_acc'))} | {fmt(ev.get('mce'))} | "
                         f"{seconds:.0f} |")
        text = "\n".join(lines) + "\n"
        (self.runs / "summary.md").write_text(text)
        return text


def fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def last_metrics(path: Path) -> dict[str, Any]:
    rows = read_jsonl(path)
    return rows[-1] if rows else {}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a pipeline of the file, e.g. demo, demo-quick, imagenet")
    parser.add_argument("--file", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--check", action="store_true", help="only load and validate the file")
    args = parser.parse_args(argv)
    pipelines = load_pipelines(args.file)
    if args.name not in pipelines:
        raise UserError(f"{args.file}: no pipeline '{args.name}'; it has: {', '.join(pipelines)}")
    if args.check:
        for pipeline in pipelines.values():
            check_pipeline(pipeline)
        print(f"{args.file}: {len(pipelines)} pipeline(s) valid: {', '.join(pipelines)}")
        return
    check_pipeline(pipelines[args.name])
    Runner(pipelines[args.name]).run()


if __name__ == "__main__":
    main()
