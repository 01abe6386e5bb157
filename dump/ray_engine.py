"""The dump on Ray Data: decode tasks spread over the cluster's CPUs stream fixed batches to an actor pool of labelers.

Each pending tar shard is one decode task (Ray Data schedules them over every node, with backpressure); it yields
the shard's fixed batches. A pool of labeler actors (one per GPU on a GPU cluster) labels them; the driver's
`ShardWriter` writes each shard once all its rows are in.

Failures are bounded. A decode task whose worker died is retried DECODE_RETRIES times. Ray never restarts a
labeler actor (max_restarts 0: Ray Data hands its actors their constructor arguments through the object store,
from which Ray cannot promise a restart finds them again, ray-project/ray#53727, and warns on every dump).
Instead a lost worker or actor ends the round, and the driver labels the shards not yet complete again, with
fresh actors, up to ROUNDS rounds in all; since batches do not depend on who made them, the bytes do not change.
Bad input (a UserError of a decoder or labeler) stops the dump at once, as its one line. Ray's own reports
(worker output, Ray Data's tracebacks) reach the terminal only with `verbose`; they are in Ray's log files either way.
"""

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import ray
import ray.data
from ray.util.annotations import RayDeprecationWarning

from common.errors import UserError, first_line
from dump.batch_labeler import BatchLabeler
from dump.batches import Batch, Labelled, shard_batches
from dump.job import DumpJob
from dump.writer import ShardWriter

AUTH_HELP = ("set RAY_AUTH_MODE=token where you run this command, with the cluster's token in ~/.ray/auth_token, "
             "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
ROUNDS = 3  # labelling rounds over the shards not yet complete: the first, and one after each lost worker or actor
DECODE_RETRIES = 2  # within a round, retries of a decode task whose worker died
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)  # a process (or its node) died


def start_ray(address: str | None, verbose: bool = False) -> bool:
    """Connect to --address / RAY_ADDRESS, else to a running `ray start` cluster, else start a local Ray.

    Returns True if this call initialised Ray (the caller then shuts it down). `--address local` always starts a
    private local Ray, even where a cluster runs. Unless `verbose`, Ray's warnings and its workers' output stay
    in its log files.
    """
    if ray.is_initialized():
        return False
    try:
        local = {"include_dashboard": False} if address in (None, "local") else {}  # a Ray client takes no such flag
        ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose,
                 **local)
    except ray.exceptions.AuthenticationError as e:
        raise UserError(f"Ray cluster {address or os.environ.get('RAY_ADDRESS') or '(found running)'} requires "
                        f"token authentication ({str(e).splitlines()[0][:120]}); {AUTH_HELP}") from None
    except ConnectionError as e:
        auth = "" if os.environ.get("RAY_AUTH_MODE") == "token" else f"; a cluster with token authentication: {AUTH_HELP}"
        raise UserError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')} ({str(e)[:160]}); check "
                        f"--address (or RAY_ADDRESS), or pass --address local for a Ray of this machine alone{auth}") from None
    return True


def decode_shards(columns: dict[str, Any], job: DumpJob) -> Any:
    """Ray Data task: the fixed batches of the given tar shards, one output row each."""
    node = ray.get_runtime_context().get_node_id()
    for position in columns["position"]:
        for batch in shard_batches(job, int(position), node):
            yield batch.to_columns()


class LabelBatches:
    """Ray Data actor: one labeler; labels one batch per call. A labeler refused at construction (a UserError:
    e.g. a checkpoint replaced since the driver read it) is raised by each call, where Ray keeps the exception
    itself (an actor that dies in its constructor leaves only its traceback text)."""

    def __init__(self, job: DumpJob):
        try:
            self.labeler: BatchLabeler | UserError = BatchLabeler(job, ray.get_runtime_context().get_node_id())
        except UserError as e:
            self.labeler = e

    def __call__(self, columns: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.labeler, UserError):
            raise self.labeler
        return self.labeler(Batch.from_row({name: column[0] for name, column in columns.items()})).to_columns()


def run_ray(job: DumpJob, pending: list[int], writer: ShardWriter, actors: int, gpus_per_actor: float,
            cpus_per_actor: float, verbose: bool = False) -> None:
    """Label the pending shards on the Ray cluster: CPU decode tasks everywhere, `actors` labelers; a round
    that loses a worker or actor is followed by another over the shards not yet complete (ROUNDS in all)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # a UserError, not wrapped in a UserCodeException (which loses it)
    for handler in logging.getLogger("ray.data").handlers:  # its console; its log file keeps everything
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.INFO if verbose else logging.CRITICAL)
    for attempt in range(1, ROUNDS + 1):
        unfinished = [p for p in pending if p not in writer.complete]
        try:
            for row in labelled_rows(job, unfinished, actors, gpus_per_actor, cpus_per_actor):
                writer.add(Labelled.from_row(row))
            return
        except Exception as e:  # Ray wraps a worker's exception; a bad-input error comes back as its one line
            cause = next((c for c in causes(e) if isinstance(c, UserError)), None)
            if cause is not None:  # its one line (Ray Data appends notes on its retries to the message)
                raise UserError(str(cause).splitlines()[0]) from None
            lost = next((c for c in causes(e) if isinstance(c, LOST) and not getattr(c, "actor_init_failed", 0)),
                        None)
            if lost is None:
                raise
        if attempt < ROUNDS:
            print(f"warning: Ray lost a worker or labeler actor ({first_line(lost)}); labelling the unfinished "
                  f"shards again (round {attempt + 1} of {ROUNDS})", file=sys.stderr, flush=True)
    names = [job.shard(p)[0] for p in pending if p not in writer.complete]
    raise UserError(f"Ray lost a worker or labeler actor in each of {ROUNDS} rounds ({first_line(lost)}); "
                    f"{len(names)} shard(s) unfinished: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}; "
                    f"finished shards are kept: find the cause (a crash, an out-of-memory kill: --verbose shows "
                    f"Ray's report), then run the same command again to resume")


def labelled_rows(job: DumpJob, positions: list[int], actors: int, gpus_per_actor: float,
                  cpus_per_actor: float) -> Iterator[dict[str, Any]]:
    """One round: the labelled batches of the given shards, as Ray Data rows, in the order they are done."""
    shards = ray.data.from_items([{"position": p} for p in positions], override_num_blocks=len(positions))
    # what a decode task holds: a batch in flight, PIL's buffers and the process itself. Requesting it also keeps
    # Ray Data from fusing decoding into the labeler actors (it fuses ops with equal requests), which would
    # decode on one CPU per labeler
    size = job.footprint["input_size"]
    memory = 2**28 + 4 * job.batch_size * size * size * 3
    threads = 2 if gpus_per_actor else 1  # on a GPU, one batch's copies overlap the other's compute
    pool = ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=threads,
                                      enable_true_multi_threading=threads > 1)
    with warnings.catch_warnings():  # Ray 2.60 has no named parameters for retries yet, only its ray_remote_args
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        batches = shards.map_batches(decode_shards, fn_kwargs={"job": job}, batch_size=1, num_cpus=1, memory=memory,
                                     max_retries=DECODE_RETRIES)
        labelled = batches.map_batches(LabelBatches, fn_constructor_args=(job,), batch_size=1, compute=pool,
                                       num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0)
    return labelled.iter_rows()


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """An exception and the chain of its causes, without Ray's task wrappers (whose text is a worker's traceback;
    their `cause` is the worker's own exception)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if not isinstance(error, ray.exceptions.RayTaskError):
            yield error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
