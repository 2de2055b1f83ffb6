"""The data-parallel rules every framework shares, framework-free.

Each framework runs replicas on its own engine (torch: ``torchrun`` and
``DistributedDataParallel``; TF2: ``tf.distribute`` strategies; TF1: in-graph towers),
and all of them follow the same rules, so that N replicas compute what one process
computes (to rounding):

* ``--batch-size`` is the global batch. Every replica draws the same shared batch order
  (``common.datasets.batch_indices``) and replica r of N takes ``index[r::N]`` of each
  batch (``shard``): no ``DistributedSampler``, which pads by repeating rows, and no
  ``tf.data`` auto-sharding.
* The loss is the sum over the replica's rows divided by the global row count of that
  step, also when a batch splits unevenly (27 rows: 14 and 13). A mean per replica,
  averaged over replicas, is a mean of means: not the global mean.
* Replica r seeds its dropout with ``replica_seed(seed, epoch, r)``: N replicas drawing
  the same masks would drop the same units N times.
* Only the chief (rank 0) writes outputs and checkpoints (``World.is_chief``); every
  replica resumes from the same checkpoint, so a run can go on with another N.

``World`` is one process's view of the run; ``common.runner.TrainingRun`` takes it.
"""
import json
import os
from dataclasses import dataclass

from common.errors import UserError
from common.seed import epoch_seed


@dataclass(frozen=True)
class World:
    """The replicas of a run as one process sees them.

    `size`: replicas in all (processes times the replicas in each); `rank`: this
    process's rank (torch's RANK, the multi-worker task index), 0 when the replicas
    run in one process; `backend`: "gloo", "nccl", "mirrored", "multiworker",
    "towers" or "none"; `devices`: one name per replica (of this process).
    """
    size: int = 1
    rank: int = 0
    backend: str = "none"
    devices: tuple = ()

    @property
    def multi_process(self):
        """True when the replicas are separate processes, which must agree on when to stop."""
        return self.backend in MULTI_PROCESS

    @property
    def is_chief(self):
        """Rank 0 writes the outputs and the checkpoints; the others only train."""
        return self.rank == 0

    def details(self):
        """What metrics.json records about the replicas."""
        return {"world_size": self.size, "backend": self.backend, "devices": list(self.devices)}


SINGLE = World()
# Backends whose replicas run in processes of their own (the others: in one process).
MULTI_PROCESS = ("gloo", "nccl", "multiworker")


def shard(index, rank, size):
    """Replica `rank`'s rows of one shared batch: every `size`-th, from the `rank`-th."""
    return index[rank::size]


def replica_seed(seed, epoch, rank):
    """The dropout seed of replica `rank` in `epoch` (``epoch_seed`` for replica 0)."""
    return epoch_seed(seed, epoch) + rank


def check_split(n_rows, batch_size, size):
    """Refuse a batch size that leaves a replica without rows in some batch.

    The last batch holds ``n_rows % batch_size`` rows when that is not 0; a replica with
    no rows would divide by nothing (a mean) or stall a synchronised batch norm.
    """
    if size == 1:
        return
    if batch_size < size:
        raise UserError(f"--batch-size {batch_size} is smaller than the {size} replicas; "
                        f"--batch-size is the global batch: use at least {size}")
    last = n_rows % batch_size
    if 0 < last < size:
        raise UserError(f"the last batch of the {n_rows} training rows holds {last} row(s), "
                        f"fewer than the {size} replicas; choose a --batch-size that leaves "
                        f"0 or at least {size} rows over")


def torchrun_env(environ=None):
    """(world size, rank, local rank) when ``torchrun`` started more than one process,
    else None (a plain ``python -m`` run, or ``torchrun --nproc-per-node 1``)."""
    environ = os.environ if environ is None else environ
    size = int(environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return size, int(environ["RANK"]), int(environ.get("LOCAL_RANK", environ["RANK"]))


def tf_config_env(environ=None):
    """(workers, this worker's index) from ``TF_CONFIG`` (``common.launch`` sets it), or
    None when the variable is unset or names a single worker."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        spec = json.loads(text)
        workers = spec["cluster"]["worker"]
        task = spec["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise UserError("TF_CONFIG is not a multi-worker configuration "
                        "({\"cluster\": {\"worker\": [...]}, \"task\": {\"type\": \"worker\", "
                        "\"index\": i}}); unset it or start the workers with common.launch") \
            from None
    if task.get("type", "worker") != "worker":
        raise UserError(f"TF_CONFIG names a {task.get('type')!r} task; only workers are "
                        f"supported (start them with python -m common.launch)")
    return (len(workers), index) if len(workers) > 1 else None
