"""pipelines.yaml: its schema, and loading with one clear line for an unknown key or a wrong type."""

import importlib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from common.errors import UserError

Args = dict[str, Any]  # extra command-line flags of a stage's tool: {"batch-size": 64, "amp": true}
RESERVED = ("stages", "pictures", "results", "summary.md")  # what the runner itself keeps in <runs>/


@dataclass
class DatasetSpec:
    out: str                          # shards/<name>
    demo: dict[str, Any] | None = None  # arguments of shards.demo (train, val, size, ...), or
    imagefolder: str | None = None    # an ImageFolder root for shards.build
    args: Args = field(default_factory=dict)


@dataclass
class DumpSpec:
    topk: int = 5
    input_size: int | None = None     # labeler input side; the grid follows from the labeler's stride
    args: Args = field(default_factory=dict)


@dataclass
class LabelerSpec:
    name: str                         # run folder <runs>/<name>; store <dataset.out>/labels/<name>.zarr
    model: str
    epochs: int
    launcher: list[str] | None = None  # e.g. [torchrun, --nproc_per_node, "8"]; default: python
    args: Args = field(default_factory=dict)
    dump: DumpSpec = field(default_factory=DumpSpec)


@dataclass
class StudentSpec:
    name: str                         # run folder <runs>/<name>
    model: str
    epochs: int
    token_labels: bool = True
    labels: str | None = None         # the labeler whose store it reads (default: the first labeler)
    launcher: list[str] | None = None  # e.g. [torchrun, --nproc_per_node, "8"]; default: python
    args: Args = field(default_factory=dict)


@dataclass
class EvalSpec:
    baseline: str | None = None       # a student name: mCE is computed against it
    corruptions: list[str] | None = None
    severities: list[int] | None = None
    args: Args = field(default_factory=dict)


@dataclass
class PicturesSpec:
    count: int = 4                    # token-label pictures (dump.show) of the first train samples


@dataclass
class Pipeline:
    name: str
    runs: str                         # folder of the labeler and student runs
    dataset: DatasetSpec
    labelers: list[LabelerSpec]       # the first is the students' default
    students: list[StudentSpec]
    eval: EvalSpec = field(default_factory=EvalSpec)
    pictures: PicturesSpec = field(default_factory=PicturesSpec)
    description: str = ""
    jobs: int = 1                     # stages side by side (e.g. 2 on a 2-core machine: one thread each)

    def labeler_name(self, labels: str | None) -> str:
        """The labeler a student's or variant's `labels` names: the first one unless it names another."""
        return labels or self.labelers[0].name


def build(cls: type, value: Any, where: str) -> Any:
    """Check `value` against the dataclass or type `cls`, naming the offending key in the error."""
    if is_dataclass(cls):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise UserError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(known)}")
        for f in fields(cls):
            if f.name not in value and f.default is MISSING and f.default_factory is MISSING:
                raise UserError(f"{where}.{f.name}: missing required key")
        return cls(**{name: build(hints[name], v, f"{where}.{name}") for name, v in value.items()})
    origin = get_origin(cls)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = get_args(cls)
        return [build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if get_args(cls) and type(None) in get_args(cls):  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in get_args(cls) if a is not type(None)]
        return build(inner, value, where)
    if cls is Any:
        return value
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, cls) or (cls is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {cls.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_pipelines(path: str | Path) -> dict[str, Pipeline]:
    """Every pipeline of the file, checked; the key path of any problem is in the message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of pipeline names")
    return {name: build(Pipeline, {"name": name, **(body or {})}, f"{path.name}:{name}") for name, body in doc.items()}


def stage_args(pipeline: Pipeline) -> list[tuple[str, str, Args]]:
    """(where in the file, the command's module, its extra flags) for every stage of a pipeline."""
    where = f"pipelines.yaml:{pipeline.name}"
    dataset_tool = "shards.demo" if pipeline.dataset.demo is not None else "shards.build"
    out = [(f"{where}.dataset.args", dataset_tool, pipeline.dataset.args),
           (f"{where}.eval.args", "train.checkpoint_eval", pipeline.eval.args)]
    for i, labeler in enumerate(pipeline.labelers):
        out += [(f"{where}.labelers[{i}].args", "labeler.train", labeler.args),
                (f"{where}.labelers[{i}].dump.args", "dump.dump_labels", labeler.dump.args)]
    if pipeline.dataset.demo is not None:
        out.append((f"{where}.dataset.demo", "shards.demo", pipeline.dataset.demo))
    out += [(f"{where}.students[{i}].args", "train.student", s.args) for i, s in enumerate(pipeline.students)]
    return out


def check_flags(where: str, module: str, args: Args) -> None:
    """Each key must be a flag of the command, each value of its type and among its choices."""
    parser = importlib.import_module(module).build_parser()
    actions = parser._option_string_actions  # argparse keeps no public map from flag to action
    for key, value in args.items():
        action = actions.get(f"--{key.replace('_', '-')}")
        if action is None:
            raise UserError(f"{where}.{key}: not a flag of `python -m {module}` (see its --help)")
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise UserError(f"{where}.{key}: a switch; expected true or false, got {value!r}")
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                converted = action.type(str(item)) if action.type else str(item)
            except (TypeError, ValueError) as e:
                raise UserError(f"{where}.{key}: {item!r} is not a valid {action.type.__name__}") from e
            if action.choices is not None and converted not in action.choices:
                raise UserError(f"{where}.{key}: {item!r} is not one of {', '.join(map(str, action.choices))}")


def check_name(where: str, name: str) -> None:
    """A labeler's or student's name becomes a folder <runs>/<name> (and a store <name>.zarr): one plain folder
    name, none of the runner's own."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or name in RESERVED:
        raise UserError(f"{where}: {name!r} cannot name a run folder (not empty, '.', '..', {', '.join(RESERVED)}, "
                        f"or with '/' or '\\'); choose another name")


def check_pipeline(pipeline: Pipeline) -> None:
    """Validate every stage's extra flags against its command-line tool."""
    where = f"pipelines.yaml:{pipeline.name}"
    if (pipeline.dataset.demo is None) == (pipeline.dataset.imagefolder is None):
        raise UserError(f"{where}.dataset: give exactly one of 'demo' or 'imagefolder'")
    labelers = [labeler.name for labeler in pipeline.labelers]
    names = [s.name for s in pipeline.students]
    if not labelers:
        raise UserError(f"{where}.labelers: give at least one labeler")
    for kind, stage_names in (("labelers", labelers), ("students", names)):
        for i, name in enumerate(stage_names):
            check_name(f"{where}.{kind}[{i}].name", name)
    if len(set(names + labelers)) != len(names + labelers):
        raise UserError(f"{where}: labeler and student names must be unique (they name run folders), got "
                        f"{labelers + names}")
    for i, student in enumerate(pipeline.students):
        if student.labels is not None and student.labels not in labelers:
            raise UserError(f"{where}.students[{i}].labels: {student.labels!r} is not a labeler name "
                            f"({', '.join(labelers)})")
    if pipeline.eval.baseline is not None and pipeline.eval.baseline not in names:
        raise UserError(f"{where}.eval.baseline: {pipeline.eval.baseline!r} is not a student name "
                        f"({', '.join(names)})")
    for place, module, args in stage_args(pipeline):
        check_flags(place, module, args)
