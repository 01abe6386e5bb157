"""pipelines.yaml: validation with one clear line, and the demo-quick pipeline end to end (skip and redo)."""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from common.files import read_marker, write_marker
from pipeline.config import DatasetSpec, Pipeline, check_pipeline, load_pipelines
from pipeline.runner import Runner, Stage

ROOT = Path(__file__).resolve().parents[1]


def test_every_pipeline_of_the_file_validates():
    pipelines = load_pipelines(ROOT / "pipelines.yaml")
    assert {"demo", "demo-quick", "imagenet"} <= set(pipelines)
    for pipeline in pipelines.values():
        check_pipeline(pipeline)
    imagenet = pipelines["imagenet"]
    (labeler,) = imagenet.labelers
    assert labeler.model == "fan_small_12_p4_hybrid" and labeler.dump.input_size == 288
    assert labeler.launcher == ["torchrun", "--nproc_per_node", "8"]
    assert {s.model for s in imagenet.students} >= {"deit_small_patch16_224", "fan_small_12_p4_hybrid"}


def set_arg(student: dict, **args) -> None:
    """Add flags to one student (its args may be a YAML alias shared with others)."""
    student["args"] = {**student["args"], **args}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["demo"]["labelers"][0].update(epoch=3), r"pipelines.yaml:demo.labelers\[0\].epoch: unknown key"),
    (lambda d: d["demo"]["labelers"][1].update(epochs="many"), r"labelers\[1\].epochs: expected int, got str 'many'"),
    (lambda d: d["demo"]["students"][1].update(labels="oracle"), r"students\[1\].labels: 'oracle' is not a labeler"),
    (lambda d: d["demo"]["students"][1].update(name="cnn"), r"demo: labeler and student names must be unique"),
    (lambda d: d["demo"]["students"][0].pop("model"), r"demo.students\[0\].model: missing required key"),
    (lambda d: set_arg(d["demo"]["students"][1], warmup=2), r"demo.students\[1\].args.warmup: not a flag"),
    (lambda d: set_arg(d["demo"]["students"][1], mix="blend"), r"students\[1\].args.mix: 'blend' is not one"),
    (lambda d: set_arg(d["demo"]["students"][1], lr="fast"), r"students\[1\].args.lr: 'fast' is not a valid"),
    (lambda d: d["demo"]["eval"].update(baseline="nobody"), r"demo.eval.baseline: 'nobody' is not a student"),
])
def test_a_bad_key_or_type_is_one_line_naming_it(tmp_path, edit, message):
    doc = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    edit(doc)
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=message):
        for pipeline in load_pipelines(path).values():
            check_pipeline(pipeline)
    result = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--file", str(path), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def quick_file(tmp_path: Path, epochs: int = 1) -> Path:
    """demo-quick with every path under tmp_path (absolute paths are kept as they are by the runner)."""
    doc = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["demo-quick"]
    doc["runs"] = str(tmp_path / "runs")
    doc["dataset"]["out"] = str(tmp_path / "shards" / "quick")
    doc["students"][-1]["epochs"] = epochs
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"demo-quick": doc}))
    return path


def run(path: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "pipeline", "demo-quick", "--file", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_demo_quick_runs_end_to_end_then_skips_then_redoes_what_changed(tmp_path):
    path = quick_file(tmp_path)
    out = run(path)
    runs = tmp_path / "runs"
    for name in ("baseline", "cnn_labels", "fan_tl_p16"):
        assert (runs / name / "eval.json").is_file() and (runs / name / "last.pt").is_file()
    for labeler in ("cnn", "fan_tl"):
        assert len(list((runs / "pictures" / labeler).glob("*.png"))) == 2
        quality = json.loads((runs / labeler / "quality.json").read_text())
        assert quality["label_cells"]["other"] > 0 and 0 <= quality["label_other_acc"] <= 100
    summary = (runs / "summary.md").read_text()
    assert "| fan_tl_p16 | fan_demo_tiny_p8 | fan_tl |" in summary and "| baseline | fan_demo_tiny_p8 | no |" in summary
    assert "| cnn | cnn_demo_s8 |" in summary and "other objects' cells right" in summary
    assert "== demo-quick: dump-cnn" in out and "== demo-quick: quality-fan_tl" in out

    again = run(path)
    assert "== demo-quick:" not in again and again.count("skipped (up to date)") >= 8

    quick_file(tmp_path, epochs=2)  # only the fan_tl_p16 student and its evaluation change
    changed = run(path)
    assert "== demo-quick: student-fan_tl_p16" in changed and "== demo-quick: eval-fan_tl_p16" in changed
    assert "== demo-quick: student-cnn_labels" not in changed and "== demo-quick: dump" not in changed

    # the results table on the same store: two variants x two seeds, mean and spread of each
    table = tmp_path / "results.md"
    results = [sys.executable, "-m", "pipeline.results", "--pipeline", "demo-quick", "--file", str(path),
               "--variants", "no token labels", "token labels from cnn (Gumbel)", "--seeds", "0", "1",
               "--corruptions", "fog", "--jobs", "2", "--out", str(table)]
    result = subprocess.run(results, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    again = subprocess.run(results, capture_output=True, text=True, cwd=ROOT, timeout=900)  # every run reused
    assert again.returncode == 0 and "== demo-quick:" not in again.stdout, again.stdout[-2000:] + again.stderr
    lines = [line for line in table.read_text().splitlines() if line.startswith(("| no token", "| token labels"))]
    rows, per_seed = lines[:2], lines[2:]  # the table of means, then the table of seeds
    assert [row.count("±") for row in rows] == [3, 4]  # no combined score: untrained dense head
    # a top-1 per seed, then the gains over the baseline of the same seed (clean, corrupted)
    assert len(per_seed) == 2 and all(len(row.split("|")) == 7 for row in per_seed)
    assert per_seed[0].split("|")[4:6] == [" - ", " - "] and per_seed[1].split("|")[4].count("±") == 1
    top1 = [[float(cell) for cell in row.split("|")[2:4]] for row in per_seed]
    gain = statistics.mean(t - b for t, b in zip(top1[1], top1[0]))
    assert abs(float(per_seed[1].split("|")[4].split("±")[0]) - gain) < 0.02  # the cells are rounded to 0.01
    assert rows[0].split("|")[2].strip() == "-" and rows[1].split("|")[2].strip() == "cnn"
    assert 0 <= float(rows[1].split("|")[3]) <= 100  # the cnn store's other-object cells right
    assert len(list((runs / "results").glob("*/seed1/eval.json"))) == 2


def test_each_stage_waits_for_every_stage_whose_output_it_reads():
    runner = Runner(load_pipelines(ROOT / "pipelines.yaml")["demo"])
    stages = {s.name: s for s in runner.dataset() + runner.downstream()}
    assert stages["labeler-cnn"].after == ("dataset",) and stages["dump-cnn"].after == ("labeler-cnn",)
    assert stages["quality-fan_tl"].after == ("dump-fan_tl",) and stages["pictures-cnn"].after == ("dump-cnn",)
    assert stages["student-cnn_labels"].after == ("dump-cnn",)
    assert stages["eval-baseline"].after == ("student-baseline",)
    # mCE is relative to the baseline's corruption errors: its evaluation must be written first
    assert stages["eval-cnn_labels"].after == ("student-cnn_labels", "eval-baseline")


def tiny_runner(tmp_path: Path) -> Runner:
    return Runner(Pipeline("tiny", str(tmp_path / "runs"), DatasetSpec(str(tmp_path / "shards"), demo={}), [], []))


def step(tmp_path: Path, name: str, code: str) -> list[str]:
    """A command that records when it started and ended, then runs `code` (all in a real subprocess)."""
    log = tmp_path / f"{name}.times"
    return [sys.executable, "-c", f"import os, time; t = time.time(); {code}; "
            f"open({str(log)!r}, 'w').write(f'{{t}} {{time.time()}} {{os.environ.get(\"OMP_NUM_THREADS\")}}')"]


def times(tmp_path: Path, name: str) -> tuple[float, float, str]:
    start, end, threads = (tmp_path / f"{name}.times").read_text().split()
    return float(start), float(end), threads


def test_side_by_side_stages_wait_for_what_they_read_and_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner = tiny_runner(tmp_path)
    made = tmp_path / "a.out"
    stages = [Stage("a", "1", [made], [step(tmp_path, "a", f"time.sleep(1.5); open({str(made)!r}, 'w')")], []),
              Stage("b", "1", [], [step(tmp_path, "b", f"assert os.path.exists({str(made)!r})")], [], after=("a",)),
              Stage("c", "1", [], [step(tmp_path, "c", "time.sleep(1.5)")], [])]
    runner.execute(stages, jobs=2)
    (a0, a1, threads), (b0, _, _), (c0, c1, _) = (times(tmp_path, n) for n in "abc")
    assert b0 >= a1  # b reads a's output: it starts after a ends
    assert c0 < a1 and a0 < c1  # a and c, independent, ran at the same time
    assert threads == str(max(1, (os.cpu_count() or 1) // 2))
    assert (runner.records / "b.log").read_text().startswith("$ -c")  # each stage's output in its own log
    assert set(runner.summary) == {"a", "b", "c"}


def test_after_a_failed_stage_nothing_new_starts_and_the_error_names_it(tmp_path):
    runner = tiny_runner(tmp_path)
    stages = [Stage("bad", "1", [], [step(tmp_path, "bad", "print('the cause'); raise SystemExit(3)")], []),
              Stage("next", "1", [], [step(tmp_path, "next", "pass")], [], after=("bad",)),
              Stage("later", "1", [], [step(tmp_path, "later", "pass")], [], after=("next",))]
    with pytest.raises(UserError, match=r"(?s)the cause.*stage 'bad' failed \(exit 3\), its output: .*bad\.log"):
        runner.execute(stages, jobs=2)
    assert not (tmp_path / "next.times").exists() and not (tmp_path / "later.times").exists()


def test_jobs_below_one_is_one_line():
    result = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--jobs", "0"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "jobs must be at least 1" in result.stderr


@pytest.mark.parametrize("name", ["stages", "pictures", "results", "summary.md", ".", "..", "", "a/b", "a\\b"])
def test_a_name_that_is_not_a_plain_run_folder_is_refused(tmp_path, name):
    """Before: a student named `stages` had its folder, the live stage records, cleared by rmtree."""
    for kind, where in (("students", r"students\[1\]"), ("labelers", r"labelers\[0\]")):
        doc = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
        doc["demo"][kind][1 if kind == "students" else 0]["name"] = name
        path = tmp_path / "pipelines.yaml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(UserError, match=rf"demo.{where}.name: {re.escape(repr(name))} cannot name a run folder"):
            check_pipeline(load_pipelines(path)["demo"])
    if name == "stages":  # through the command
        result = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--file", str(path), "--check"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "'stages' cannot" in result.stderr


def test_a_changed_stage_clears_only_what_carries_our_marker(tmp_path):
    """A stage whose configuration changed clears its earlier outputs only where they carry tokenlabel's marker
    (a file: its folder's); anything else is refused in one line and left as it is, the stage not run."""
    runner = tiny_runner(tmp_path)
    runner.records.mkdir(parents=True)
    ours, foreign = tmp_path / "runs" / "ours", tmp_path / "runs" / "foreign"
    for folder in (ours, foreign):
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text("{}")
    write_marker(ours, "run", trainer="student")
    stages = {name: Stage(name, "new", [], [step(tmp_path, name, "pass")], fresh) for name, fresh in (
        ("run", [ours]), ("file", [foreign / "eval.json"]), ("folder", [foreign]))}
    for name in stages:
        (runner.records / f"{name}.started").write_text("old")  # begun before with another configuration
    runner.run_stage(stages["run"], None)
    assert not ours.exists() and (tmp_path / "run.times").exists()
    for name, path in (("file", foreign / "eval.json"), ("folder", foreign)):
        with pytest.raises(UserError, match=rf"{re.escape(str(path))}: stage '{name}' changed and would clear "
                                            r"this, but it carries no marker"):
            runner.run_stage(stages[name], None)
        assert not (tmp_path / f"{name}.times").exists()
    assert (foreign / "eval.json").read_text() == "{}"
    marked = tmp_path / "runs" / "pictures" / "x"  # the output folder of a tool that writes no marker itself
    runner.run_stage(Stage("pictures", "1", [], [step(tmp_path, "pictures", "pass")], [marked], marks=(marked,)), None)
    assert read_marker(marked)["stage"] == "pictures"


KILLED_RUNNER = """
import sys
from pathlib import Path
from pipeline.runner import Runner, Stage
from pipeline.config import DatasetSpec, Pipeline

tmp = Path(sys.argv[1])
runner = Runner(Pipeline("tiny", str(tmp / "runs"), DatasetSpec(str(tmp / "shards"), demo={}), [], []))
code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
runner.execute([Stage(n, "1", [], [[sys.executable, "-c", code, str(tmp / n)]], []) for n in ("a", "b")], jobs=2)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_killed_runner_takes_its_stages_commands_with_it(tmp_path):
    """kill -9 of the pipeline runner: before, its stages' commands (a trainer) went on writing their outputs
    while a re-run started the same stages again."""
    runner = subprocess.Popen([sys.executable, "-c", KILLED_RUNNER, str(tmp_path)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / n).is_file() and (tmp_path / n).read_text() for n in "ab"):
            assert runner.poll() is None and time.monotonic() < deadline, "the stages did not start"
            time.sleep(0.05)
        children = [int((tmp_path / n).read_text()) for n in "ab"]
        assert all(alive(pid) for pid in children)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"children {[p for p in children if alive(p)]} outlived the runner"
            time.sleep(0.05)
    finally:
        runner.kill()
        runner.wait()
        for pid in filter(alive, children):  # the test's own processes, if they did outlive the runner
            os.kill(pid, signal.SIGKILL)
