"""Run a named pipeline of pipelines.yaml end to end: `python -m pipeline demo`.

Each stage runs its own command (the same ones a user types) in a subprocess. With `jobs` > 1 (pipelines.yaml or
--jobs) a stage starts as soon as the stages it reads from are done, up to `jobs` side by side, each with its share
of the cores and its output in <runs>/stages/NAME.log: two labelers or two students of a small model, which one
process cannot keep busy on 2 cores, run together. A stage is skipped when its record under <runs>/stages/ says
it finished with the same configuration (its own and that of every stage it reads from); it is redone when the
configuration changed: what it made before is cleared first, but only what carries tokenlabel's marker (a run
folder's, a store's attributes, a dataset's manifest), never anything else. A run killed at any point resumes:
finished stages are skipped, the interrupted one resumes from its own checkpoint or completion flags. A stage's
commands die with the runner (Linux: the kernel sends them SIGTERM when it dies, even by kill -9).
"""

import argparse
from pathlib import Path

from common.errors import UserError, cli
from pipeline.config import check_pipeline, load_pipelines
from pipeline.runner import ROOT, Runner


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a pipeline of the file, e.g. demo, demo-quick, imagenet")
    parser.add_argument("--file", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--check", action="store_true", help="only load and validate the file")
    parser.add_argument("--jobs", type=int, default=None,
                        help="stages run side by side, each with cores / jobs torch threads (default: the "
                             "pipeline's `jobs`, else 1)")
    args = parser.parse_args(argv)
    pipelines = load_pipelines(args.file)
    if args.name not in pipelines:
        raise UserError(f"{args.file}: no pipeline '{args.name}'; it has: {', '.join(pipelines)}")
    if args.check:
        for pipeline in pipelines.values():
            check_pipeline(pipeline)
        print(f"{args.file}: {len(pipelines)} pipeline(s) valid: {', '.join(pipelines)}")
        return
    pipeline = pipelines[args.name]
    check_pipeline(pipeline)
    jobs = pipeline.jobs if args.jobs is None else args.jobs
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs} (--jobs, or `jobs` of {args.name} in {args.file})")
    Runner(pipeline).run(jobs)


if __name__ == "__main__":
    main()
