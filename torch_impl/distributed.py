"""Data-parallel training in PyTorch: the process group ``torchrun`` asks for, and the
collectives the entry points add to the single-process loop.

``torchrun --standalone --nproc-per-node N -m torch_impl.run_cnn ...`` starts N processes
with WORLD_SIZE, RANK and LOCAL_RANK set; each entry point opens the group with
``process_group`` and wraps its model in ``DistributedDataParallel`` (DDP), which
broadcasts rank 0's weights once and averages the gradients in every ``backward()``.
Twins: ``tf2_impl`` (``tf.distribute`` strategies) and ``tf1_compat`` (in-graph towers).
The shared rules (``common/distributed.py``) in torch's idiom:

* Batches: rank r's DataLoader takes ``index[r::N]`` of each shared batch
  (``shard_batches``), not a ``DistributedSampler``.
* Loss: the local sum * N / the step's global row count (``train.train_one_epoch``), so
  that DDP's average of the gradients is the gradient of the global batch's mean.
* Reported numbers: the epoch's training sums are all-reduced; validation is rank 0's,
  broadcast (``from_rank0``), so early stop and plateau decide alike on every rank.
* Signals: ``any_rank`` all-reduces the stop flag of ``TrainingRun.until_stopped``.
* ``--sync-bn``: ``sync_batch_norm``. ``--fast`` (whose batches know no replicas) is refused.
"""
import contextlib
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn import all_reduce
from torch.utils.data import DataLoader

from common.distributed import SINGLE, World, shard, torchrun_env
from common.errors import UserError
from torch_impl.train import resolve_device

# torch 2.15 deprecates torch.distributed.nn.all_reduce in favour of the private
# torch.distributed._functional_collectives.all_reduce; the public one still works, and on
# every torch this project supports (>= 2.4). Its FutureWarning would repeat in every rank.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is "
                        r"deprecated", category=FutureWarning)


@contextlib.contextmanager
def process_group(args):
    """``(world, device)`` of this process, inside the process group when torchrun started it.

    Without torchrun: ``SINGLE`` and the --device. Under torchrun: GPUs run nccl, one
    GPU per process (``cuda:LOCAL_RANK``, made the current device), CPUs gloo; the
    group is destroyed when the block ends, also on an error or a signal.
    """
    device = resolve_device(args.device)
    env = torchrun_env()
    if env is None:
        yield SINGLE, device
        return
    if args.fast:
        raise UserError("--fast under torchrun is not offered: torch_impl/fast.py's batches "
                        "do not shard over replicas; leave out --fast")
    size, rank, local_rank = env
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # nccl and DDP use the current device
    backend = "nccl" if device.type == "cuda" else "gloo"
    # env:// from torchrun: MASTER_ADDR and MASTER_PORT of rank 0's store, RANK, WORLD_SIZE.
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        devices = [None] * size
        dist.all_gather_object(devices, str(device))
        yield World(size, rank, backend, tuple(devices)), device
    finally:
        dist.destroy_process_group()


def shard_batches(loader, world):
    """This rank's DataLoader: `loader`'s dataset and collate_fn, each of its batches cut to
    ``index[rank::size]`` (``common.distributed.shard``), a distributed batch sampler.

    Not ``DistributedSampler``: it shards the dataset, not each batch, pads it by repeating
    rows until every rank gets as many, and draws the same order every epoch unless
    ``set_epoch`` is called. The rows keep their places in the shared batch, so
    ``--augment`` crops and mirrors them as one process does (dropout differs per rank).
    """
    sampler = [shard(index, world.rank, world.size) for index in loader.batch_sampler]
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)


def _flag_device():
    """Where a collective's tensor must live: the current GPU for nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag):
    """True on every rank when `flag` is True on any: the stop signal of
    ``TrainingRun.until_stopped``, an all-reduce (MAX) after every batch."""
    value = torch.tensor(int(flag), device=_flag_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_rank0(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode moments are those of all replicas' rows.

    torch's ``nn.SyncBatchNorm`` refuses CPU modules ("SyncBatchNorm layers only work with
    GPU modules"): this is its stand-in on gloo. Two differentiable all-reduces
    (``torch.distributed.nn.all_reduce``, whose backward all-reduces the gradients, so that
    each replica's rows get the gradient through the global moments): the channel sums
    with the row count, then the squared deviations from the global mean (two passes:
    E[x^2] - E[x]^2 loses digits in float32). The running variance is the unbiased one over
    the GLOBAL count, as BatchNorm2d's is over its batch. The state_dict keys are
    BatchNorm2d's; evaluation is BatchNorm2d's own.
    """

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # moments of bf16/fp16 in float32
        h, dims, shape = x.to(dtype), (0, 2, 3), (1, -1, 1, 1)
        sums = all_reduce(torch.cat([h.sum(dims), h.new_tensor([h.numel() / h.shape[1]])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = h - mean.reshape(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)  # momentum=None: cumulative
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(x.dtype)


def sync_batch_norm(model, world, log):
    """--sync-bn: the model's BatchNorm2d layers normalise with all replicas' rows, in place.

    CUDA: ``nn.SyncBatchNorm.convert_sync_batchnorm``; CPU: ``AllReduceBatchNorm2d``,
    which keeps the layer's own parameters and buffers (as torch's converter does), so an
    optimizer built already goes on working. One process: a log line, nothing else (its
    batch norm sees the whole batch already, and a --sync-bn run may resume with N=1).
    """
    if world.size == 1:
        log.info("--sync-bn: one process normalises over the whole batch already; nothing "
                 "to synchronise")
        return model
    if next(model.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum,
                                              child.affine, child.track_running_stats)
                synced.weight, synced.bias = child.weight, child.bias
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
                setattr(parent, name, synced.train(child.training))
    return model
