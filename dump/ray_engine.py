"""The dump on Ray Data: decode tasks spread over the cluster's CPUs stream fixed batches to an actor pool of labelers.

Each pending tar shard is one decode task (Ray Data schedules them over every node, with backpressure); it yields
the shard's fixed batches. A pool of labeler actors (one per GPU on a GPU cluster) labels them; the driver's
`ShardWriter` writes each shard once all its rows are in. A lost worker's task is retried and a lost actor is
restarted by Ray Data; since batches do not depend on who made them, the bytes do not change.
"""

import logging
import os
from typing import Any

import ray
import ray.data

from common.errors import UserError
from dump.labelling import Batch, DumpJob, Labeler, Labelled, ShardWriter, shard_batches

AUTH_HELP = ("set RAY_AUTH_MODE=token where you run this command, with the cluster's token in ~/.ray/auth_token, "
             "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")


def start_ray(address: str | None) -> bool:
    """Connect to --address / RAY_ADDRESS, else to a running `ray start` cluster, else start a local Ray.

    Returns True if this call initialised Ray (the caller then shuts it down). `--address local` always starts a
    private local Ray, even where a cluster runs.
    """
    if ray.is_initialized():
        return False
    try:
        local = {"include_dashboard": False} if address in (None, "local") else {}  # a Ray client takes no such flag
        ray.init(address=address, logging_level=logging.WARNING, **local)
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
    """Ray Data actor: one labeler; labels one batch per call."""

    def __init__(self, job: DumpJob):
        self.labeler = Labeler(job, ray.get_runtime_context().get_node_id())

    def __call__(self, columns: dict[str, Any]) -> dict[str, Any]:
        return self.labeler(Batch.from_row({name: column[0] for name, column in columns.items()})).to_columns()


def run_ray(job: DumpJob, pending: list[int], writer: ShardWriter, actors: int, gpus_per_actor: float,
            cpus_per_actor: float) -> None:
    """Label the pending shards on the Ray cluster: CPU decode tasks everywhere, `actors` labelers."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # not its start-up notes (one per dump)
    shards = ray.data.from_items([{"position": p} for p in pending], override_num_blocks=len(pending))
    # what a decode task holds: a batch in flight, PIL's buffers and the process itself. Requesting it also keeps
    # Ray Data from fusing decoding into the labeler actors (it fuses ops with equal requests), which would
    # decode on one CPU per labeler
    size = job.footprint["input_size"]
    memory = 2**28 + 4 * job.batch_size * size * size * 3
    batches = shards.map_batches(decode_shards, fn_kwargs={"job": job}, batch_size=1, num_cpus=1, memory=memory)
    threads = 2 if gpus_per_actor else 1  # on a GPU, one batch's copies overlap the other's compute
    pool = ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=threads,
                                      enable_true_multi_threading=threads > 1)
    labelled = batches.map_batches(LabelBatches, fn_constructor_args=(job,), batch_size=1, compute=pool,
                                   num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    try:
        for row in labelled.iter_rows():
            writer.add(Labelled.from_row(row))
    except Exception as e:  # Ray wraps a worker's exception; a bad-input error comes back as its one line
        cause = user_error(e)
        if cause is None:
            raise
        raise cause from None


def user_error(error: BaseException) -> UserError | None:
    """The UserError (or lost actor) behind an exception Ray raised in the driver, as one line."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return UserError(str(error))
        if isinstance(error, ray.exceptions.RayActorError):
            return UserError(f"a labeler actor was lost ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                             f"finished shards are kept: run the same command again to resume")
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None
