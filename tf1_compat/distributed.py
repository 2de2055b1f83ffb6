"""Data-parallel training in TF1-style graph code: in-graph towers, one per device (--replicas N).

Twins: ``torch_impl`` under ``torchrun`` (DistributedDataParallel, one process per replica)
and ``tf2_impl`` (``tf.distribute.MirroredStrategy``). This is the classic TF1 multi-GPU
idiom of the ``cifar10_multi_gpu_train`` tutorial and slim's ``model_deploy``: one graph
holds N copies of the model ("towers"), tower r on device r (``/gpu:r``, or CPU device r of
the N that ``ConfigProto(device_count={"CPU": N})`` gives a Session) in the name scope
``tower_r``. The towers share one set of variables (``get_variable`` in a variable scope
reused after tower 0), so nothing is broadcast or kept in sync, and one Saver saves them:
a checkpoint resumes with any N. Each step feeds tower r the rows r::N of the shared batch
(``common.distributed.shard``) through its own placeholders; each tower computes its
gradients on its device, ``add_n`` sums them and ``apply_gradients`` runs once.

The loss: tower r's part is the sum of its rows' losses / the step's rows (all towers'), so
the summed gradients are those of the batch's mean loss, also when a batch splits unevenly
(27 rows: 14 and 13). The tutorial averaged the towers' mean-loss gradients instead (equal
only for equal splits), and a TF1 optimizer scales the loss by 1/replicas only inside an
Estimator (gone in TF 2.21): N mean losses give N times the gradient (the pitfall tests).

Batch norm: each tower normalises its own rows (DDP's and Keras's default) and only tower
0's moving averages move (its ``UPDATE_OPS``, as ``model_deploy`` keeps the first
clone's). ``--sync-bn``: the moments are all-reduced over the towers (``sync_moments``), so
every tower normalises with the batch's moments and tower 0's moving averages are those of
one process. Dropout: tower r is built with graph seed + r, which ``models.dropout`` keys its
masks on (with the global step). One tower builds the plain graph, unchanged.
"""
import contextlib
import functools
import itertools
from collections import namedtuple

import tensorflow as tf

from common.distributed import SINGLE, World, check_split
from common.errors import UserError
from tf1_compat import models

tf1 = tf.compat.v1

Towers = namedtuple("Towers", [
    "models",   # [GraphModel], one per tower; models[0] evaluates, exports and imports
    "losses",   # [scalar], each tower's mean loss (train.make_loss); losses[0] evaluates
    "parts",    # [scalar], tower r's part of the batch loss: its rows' sum / the step's rows
    "loss",     # scalar, the batch's mean loss: the sum of the parts
    "outputs",  # (N, 1) predictions or (N, classes) logits of the whole batch, in its order
    "devices",  # ("/cpu:0", "/cpu:1"), ("/gpu:0", ...), or (None,) for the plain graph
    "scope",    # "tower_0/": the name scope whose UPDATE_OPS train; None for the plain graph
])


def tower_world(args, device, rows):
    """--replicas N -> the World of TrainingRun (metrics.json): N towers on N GPUs with
    --device cuda, else on N CPU devices; SINGLE for one. `rows`: the training split's,
    which every batch must give each tower one of (``common.distributed.check_split``)."""
    size = args.replicas
    if size == 1:
        return SINGLE
    check_split(rows, args.batch_size, size)
    if getattr(args, "sync_bn", False) and args.fast:
        raise UserError("--sync-bn needs the plain batch norm: the fused kernel of --fast "
                        "normalises each tower's rows alone; drop --fast")
    gpus = len(tf.config.get_visible_devices("GPU"))
    if device == "cuda" and gpus < size:
        raise UserError(f"--replicas {size} on --device cuda needs {size} GPUs and TensorFlow "
                        f"sees {gpus}; use --device cpu for {size} CPU towers")
    kind = "gpu" if device == "cuda" else "cpu"
    return World(size=size, rank=0, backend="towers",
                 devices=tuple(f"/{kind}:{rank}" for rank in range(size)))


# -- building the towers -------------------------------------------------------------------
_building = {"size": 1, "keys": None}  # the tower being built, for sync_moments


@contextlib.contextmanager
def tower(rank, size, device):
    """Build tower `rank` of `size` inside: on `device`, in the name scope tower_<rank>, with
    graph seed + rank (its dropout masks) and its own count of collective ops (sync_moments)."""
    graph = tf1.get_default_graph()
    seed = graph.seed
    graph.seed = seed if rank == 0 else (seed or 0) + rank  # tower 0: the plain graph's seed
    _building.update(size=size, keys=itertools.count(1))
    try:
        with tf.device(device), tf.name_scope(f"tower_{rank}"):
            yield
    finally:
        graph.seed = seed
        _building.update(size=1, keys=None)


def build_towers(world, build, make_loss):
    """One model per device of `world`, sharing its variables: `build()` -> a GraphModel (its
    placeholders, variables and ops in the current graph), `make_loss(model)` -> its mean
    loss; returns the ``Towers``. One device: the plain graph (no scope, the mean loss)."""
    if world.size == 1:
        model = build()
        loss = make_loss(model)
        return Towers([model], [loss], [loss], loss, model.outputs, (None,), None)
    tf1.train.get_or_create_global_step()  # one step for all towers, outside them
    towers, losses = [], []
    with tf1.variable_scope(tf1.get_variable_scope()):
        for rank, device in enumerate(world.devices):
            with tower(rank, world.size, device):
                towers.append(build())
                losses.append(make_loss(towers[-1]))
            tf1.get_variable_scope().reuse_variables()  # towers 1..N-1 share tower 0's
    with tf.name_scope("batch"):
        rows = [tf.shape(model.inputs)[0] for model in towers]
        total = tf.add_n(rows)
        # mean * rows / the step's rows = the sum over the tower's rows / the step's rows
        parts = [loss * tf.cast(n, loss.dtype) / tf.cast(total, loss.dtype)
                 for loss, n in zip(losses, rows)]
        # Tower r holds rows r, r + N, ... of the batch: stitched back into the batch's order.
        outputs = tf.dynamic_stitch([tf.range(r, total, world.size) for r in range(world.size)],
                                    [model.outputs for model in towers])
    return Towers(towers, losses, parts, tf.add_n(parts), outputs, world.devices, "tower_0/")


def tower_gradients(optimizer, towers):
    """[(gradient, variable)] of the batch loss: each tower's ``compute_gradients`` of its part,
    on its device, summed per variable (``add_n``); the plain ``compute_gradients`` for one."""
    if towers.scope is None:
        return optimizer.compute_gradients(towers.parts[0])
    per_tower = []
    for rank, (device, part) in enumerate(zip(towers.devices, towers.parts)):
        with tf.device(device), tf.name_scope(f"tower_{rank}/"):  # re-enter the tower's scope
            per_tower.append(optimizer.compute_gradients(part))
    with tf.name_scope("sum_gradients"):
        return [(_sum([g for g, _ in pairs]), pairs[0][1]) for pairs in zip(*per_tower)]


def _sum(gradients):
    present = [g for g in gradients if g is not None]
    return tf.add_n(present) if present else None


# -- synchronised batch norm ---------------------------------------------------------------
def all_reduce(x):
    """The sum of `x` over the towers: a ``CollectiveReduceV2`` op in each tower (matched by
    its key: the towers are built alike), whose gradient is the all-reduced gradient.

    Each tower differentiates its own part of the loss: the all-reduced gradient brings the
    other towers' share of d(loss)/d(sum), as torch's SyncBatchNorm backward does. Every
    tower must run in the same ``sess.run`` (the train step runs them all), or the op waits."""
    size, key = _building["size"], 2 * next(_building["keys"])

    def reduce(value, instance_key):
        return tf.raw_ops.CollectiveReduceV2(input=value, group_size=size, group_key=1,
                                             instance_key=instance_key, ordering_token=[],
                                             merge_op="Add", final_op="Id")

    @tf.custom_gradient
    def summed(value):
        return reduce(value, key), lambda upstream: reduce(upstream, key + 1)
    return summed(x)


def sync_moments(x):
    """``models.moments`` over every tower's rows (--sync-bn): x (n_r, H, W, C) -> the batch's
    mean and biased variance (C,) and its count n = N*H*W, all-reduced per tower: the sum and
    the count, then the squared deviations (two passes, as ``tf.nn.moments``). Outside the
    towers (one replica) the plain ``models.moments``."""
    if _building["keys"] is None:
        return models.moments(x)
    with tf.name_scope("sync_moments"):
        local_count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
        sums = all_reduce(tf.concat([tf.reduce_sum(x, axis=[0, 1, 2]), [local_count]], 0))
        count = sums[-1]
        mean = sums[:-1] / count
        deviations = tf.math.squared_difference(x, tf.stop_gradient(mean))
        variance = all_reduce(tf.reduce_sum(deviations, axis=[0, 1, 2])) / count
        return mean, variance, count


sync_conv_block = functools.partial(
    models.conv_block, norm=functools.partial(models.batch_norm, moments=sync_moments))


def build_sync_cnn(input_shape, num_classes, dtype=tf.float32):
    """``models.build_cnn`` whose batch norms all-reduce their moments over the towers."""
    return models.build_cnn(input_shape, num_classes, block=sync_conv_block, dtype=dtype)
