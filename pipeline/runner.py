"""The pipeline runner: stages run in order or side by side, skipped when up to date, redone when changed."""

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import atomic_write, read_marker, write_marker
from pipeline.config import Pipeline
from shards.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


@dataclass
class Stage:
    """One step of a pipeline: its commands, what it makes, and the stages whose outputs it reads."""

    name: str
    ident: str                        # its configuration and that of everything upstream
    outputs: list[Path]
    commands: list[list[str]]
    fresh: list[Path]                 # cleared first when the configuration changed (only where marked as ours)
    after: tuple[str, ...] = ()
    marks: tuple[Path, ...] = ()      # folders made and marked for it, for a tool that writes no marker itself


class Runner:
    def __init__(self, pipeline: Pipeline, python: str = sys.executable):
        self.p, self.python = pipeline, python
        self.runs = ROOT / pipeline.runs
        self.records = self.runs / "stages"
        self.shards = ROOT / pipeline.dataset.out
        self.summary: dict[str, tuple[str, float]] = {}  # stage name -> (status, seconds)
        self.idents: dict[str, str] = {}  # stage name -> identity

    def store(self, labeler: str | None = None) -> Path:
        """The store of a labeler (default: the first, the students' default)."""
        return self.shards / "labels" / f"{self.p.labeler_name(labeler)}.zarr"

    def add(self, stages: list[Stage], name: str, config: Any, outputs: list[Path], commands: list[list[str]],
            fresh: list[Path], after: tuple[str, ...] = (), marks: tuple[Path, ...] = ()) -> None:
        """Plan a stage whose identity is its configuration and the identities of the stages it reads from."""
        blob = json.dumps([config, *(self.idents[a] for a in after)], sort_keys=True, default=str)
        ident = self.idents[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        stages.append(Stage(name, ident, outputs, commands, fresh, after, marks))

    def run_stage(self, stage: Stage, threads: int | None) -> None:
        """Run a stage's commands unless its record matches its identity; on a changed configuration clear its
        `fresh` paths first (`clear`: only what is marked as ours). With `threads` (stages run side by side) its
        output goes to a log file and each of its commands gets that many torch threads."""
        record_path = self.records / f"{stage.name}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record and record["identity"] == stage.ident and all(p.exists() for p in stage.outputs):
            self.summary[stage.name] = ("skipped (up to date)", record["seconds"])
            return
        marker = self.records / f"{stage.name}.started"  # identity of the last run begun: same = resume, else redo
        if marker.is_file() and marker.read_text() != stage.ident:
            for path in stage.fresh:
                clear(path, stage.name)
        self.records.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, stage.ident)
        for folder in stage.marks:
            if not folder.exists():
                folder.mkdir(parents=True)
                write_marker(folder, "pipeline-output", stage=stage.name)
        log = self.records / f"{stage.name}.log"
        shown_log = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
        print(f"\n== {self.p.name}: {stage.name}" + (f" (output: {shown_log})" if threads else ""), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))} if threads else None
        started = time.time()
        with open(log, "w") if threads else contextlib.nullcontext() as out:
            for command in stage.commands:
                shown = "$ " + " ".join(command[1:] if command[0] == self.python else command)
                print(shown, file=out or sys.stdout, flush=True)
                returncode = run_child(command, cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT if out else None)
                if returncode != 0:
                    tail = "".join(log.read_text().splitlines(keepends=True)[-20:]) if threads else ""
                    raise UserError(f"{tail}stage '{stage.name}' failed (exit {returncode})"
                                    + (f", its output: {shown_log}" if threads else "")
                                    + "; fix the cause and run the same command again to resume")
        seconds = time.time() - started
        atomic_write(record_path, json.dumps({"identity": stage.ident, "seconds": seconds}) + "\n")
        self.summary[stage.name] = ("done", seconds)
        if threads:
            print(f"== {self.p.name}: {stage.name} done in {seconds:.0f} s", flush=True)

    def execute(self, stages: list[Stage], jobs: int = 1) -> None:
        """Run the stages in order, or `jobs` at a time as soon as the stages they read from are done (each with
        cores / jobs torch threads); after a failure no new stage starts and the first failure is raised."""
        if jobs <= 1:
            for stage in stages:
                self.run_stage(stage, None)
            return
        threads = max(1, (os.cpu_count() or 1) // jobs)  # torch threads of each stage: the cores split evenly
        pending, running, failure = list(stages), {}, None
        finished = set(self.summary)  # stages an earlier call ran or skipped
        with ThreadPoolExecutor(jobs) as pool:
            while running or (pending and failure is None):
                ready = [s for s in pending if set(s.after) <= finished][: jobs - len(running)]
                for stage in ready:
                    pending.remove(stage)
                    running[pool.submit(self.run_stage, stage, threads)] = stage
                if not running:
                    raise RuntimeError(f"stages {[s.name for s in pending]} wait on stages not in the plan")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    stage = running.pop(future)
                    if future.exception() is None:
                        finished.add(stage.name)
                    elif failure is None:
                        failure = future.exception()
        if failure is not None:
            raise failure

    def module(self, name: str, *args: str, launcher: list[str] | None = None) -> list[str]:
        """`python -m NAME ARGS`, or the stage's launcher (e.g. torchrun ...) in place of python."""
        return [*(launcher or [self.python]), "-m", name, *args]

    def run(self, jobs: int = 1) -> None:
        """Every stage, then the summary table."""
        started = time.time()
        self.execute(self.dataset(), jobs)  # first: whether it has masks decides the quality reports
        self.execute(self.downstream(), jobs)
        print(self.table(time.time() - started, jobs))

    def downstream(self) -> list[Stage]:
        """Every stage after the dataset's, in the order a one-at-a-time run takes them (planned once it has run)."""
        return self.labelers() + self.students() + self.evaluations() + self.pictures()

    def prepare(self, jobs: int = 1) -> None:
        """Only what the students read: the dataset, then the labelers, their dumps and label-quality reports."""
        self.execute(self.dataset(), jobs)
        self.execute(self.labelers(), jobs)

    def dataset(self) -> list[Stage]:
        d, stages = self.p.dataset, []
        if d.demo is not None:
            command = self.module("shards.demo", "--out", d.out, "--overwrite", *flags(d.demo), *flags(d.args))
        else:
            command = self.module("shards.build", "--imagefolder", d.imagefolder, "--out", d.out, "--overwrite",
                                  *flags(d.args))
        self.add(stages, "dataset", asdict(d), [self.shards / "manifest.json"], [command], [])
        return stages

    def labelers(self) -> list[Stage]:
        """Per labeler its training, dump and (on a dataset with masks: the demo's always have them) label-quality
        report; reads the dataset's manifest unless the dataset is the demo's."""
        p, d, stages = self.p, self.p.dataset, []
        masks = d.demo is not None or load_manifest(self.shards).has_masks
        for lab in p.labelers:
            lab_dir = self.runs / lab.name
            self.add(stages, f"labeler-{lab.name}", {**asdict(lab), "dump": None}, [lab_dir / "last.pt"],
                     [self.module("labeler.train", "--shards", d.out, "--model", lab.model, "--epochs",
                                  str(lab.epochs), "--out", str(lab_dir), *flags(lab.args), launcher=lab.launcher)],
                     [lab_dir], after=("dataset",))
            dump_args = {"topk": lab.dump.topk, "input-size": lab.dump.input_size, **lab.dump.args}
            store = self.store(lab.name)
            self.add(stages, f"dump-{lab.name}", asdict(lab.dump), [store], [
                self.module("dump.dump_labels", "--shards", d.out, "--checkpoint", str(lab_dir / "last.pt"),
                            "--out", str(store), "--overwrite", *flags(dump_args))], [], after=(f"labeler-{lab.name}",))
            if masks:
                report = lab_dir / "quality.json"
                self.add(stages, f"quality-{lab.name}", None, [report], [self.module(
                    "dump.quality", str(store), "--out", str(report))], [report], after=(f"dump-{lab.name}",))
        return stages

    def students(self) -> list[Stage]:
        stages: list[Stage] = []
        for s in self.p.students:
            extra = [] if s.token_labels else ["--no-token-labels"]
            self.student(stages, f"student-{s.name}", asdict(s), s.labels, s.model, s.epochs,
                         self.runs / s.name, "--final-corruptions", *extra, *flags(s.args), launcher=s.launcher)
        return stages

    def student(self, stages: list[Stage], name: str, config: Any, labels: str | None, model: str, epochs: int,
                out: Path, *args: str, launcher: list[str] | None = None) -> None:
        """Plan a train.student run into `out` on the store of the labeler `labels` names, after its dump."""
        labels = self.p.labeler_name(labels)
        self.add(stages, name, config, [out / "last.pt"], [self.module(
            "train.student", "--labels", str(self.store(labels)), "--model", model, "--epochs", str(epochs),
            "--out", str(out), *args, launcher=launcher)], [out], after=(f"dump-{labels}",))

    def evaluations(self) -> list[Stage]:
        p, d, e, stages = self.p, self.p.dataset, self.p.eval, []
        names = sorted((s.name for s in p.students), key=lambda n: n != e.baseline)  # the baseline first
        for name in names:
            out = self.runs / name
            eval_args = {"corruptions": e.corruptions, "severities": e.severities, **e.args}
            base = ["--baseline", str(self.runs / e.baseline)] if e.baseline and name != e.baseline else []
            self.add(stages, f"eval-{name}", [asdict(e), name], [out / "eval.json"], [self.module(
                "train.checkpoint_eval", str(out / "last.pt"), "--shards", d.out, *base, *flags(eval_args))],
                [out / "eval.json"], after=(f"student-{name}", *([f"eval-{e.baseline}"] if base else [])))
        return stages

    def pictures(self) -> list[Stage]:
        """Token-label pictures (dump.show) of the first train samples, from every labeler's store (the keys are
        read when the stage runs, after the dataset exists)."""
        p, pictures, stages = self.p, self.runs / "pictures", []
        for lab in p.labelers:
            folder = pictures / lab.name
            self.add(stages, f"pictures-{lab.name}", asdict(p.pictures), [folder], [self.module(
                "dump.show", str(self.store(lab.name)), "--first", str(p.pictures.count), "--out", str(folder))],
                [folder], after=(f"dump-{lab.name}",), marks=(folder,))
        return stages

    def table(self, wall: float, jobs: int) -> str:
        """What the run made and measured, as markdown tables (also written to <runs>/summary.md)."""
        lines = [f"# pipeline {self.p.name}", "", "| stage | status | seconds |", "|---|---|---|"]
        lines += [f"| {n} | {self.summary[n][0]} | {self.summary[n][1]:.0f} |" for n in self.idents if n in self.summary]
        lines.append(f"| this run, wall clock ({jobs} stage{'s' if jobs > 1 else ''} at a time) | | {wall:.0f} |")
        lines += ["", "Labelers, and their token labels per map cell against the masks (dump.quality):", "",
                  "| labeler | model | val top-1 | target cells right | other objects' cells right | "
                  "background cells saying the image class | confidence object / background |",
                  "|---|---|---|---|---|---|---|"]
        for lab in self.p.labelers:
            top1 = (read_jsonl(self.runs / lab.name / "metrics.jsonl") or [{}])[-1].get("top1")
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


def clear(path: Path, stage: str) -> None:
    """Remove an earlier output of a changed stage, only where it carries tokenlabel's marker (a file: its folder's)."""
    if not path.exists():
        return
    if read_marker(path if path.is_dir() else path.parent) is None:
        raise UserError(f"{path}: stage '{stage}' changed and would clear this, but it carries no marker of a "
                        f"tokenlabel output (this pipeline did not make it); move it away, then run again")
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_child(command: list[str], **kwargs: Any) -> int:
    """Run one command of a stage to its end; it dies with the runner: the kernel sends it SIGTERM when the
    runner's thread dies (PR_SET_PDEATHSIG, Linux), and a runner leaving by an exception terminates it first."""
    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, before exec: only the already loaded prctl, no imports
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the runner died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    with subprocess.Popen(command, preexec_fn=die_with_parent if LIBC else None, **kwargs) as child:
        try:
            return child.wait()
        except BaseException:
            child.terminate()
            raise


def fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
