"""Data-parallel training in TensorFlow 2 / Keras 3 with ``tf.distribute``, for both loops.

Twins: ``torch_impl/distributed.py`` (``torchrun`` and ``DistributedDataParallel``) and
``tf1_compat``'s in-graph towers. ``common/distributed.py`` states the shared rules: the
global ``--batch-size``, replica r takes rows ``r::N`` of every shared batch, the loss is
the sum over the replica's rows divided by the step's global row count, the chief writes.

* ``--replicas N``: ``tf.distribute.MirroredStrategy`` in this process, over N GPUs or, with
  no GPU, N logical CPUs (``tf.config.set_logical_device_configuration``: for tests and for
  learning; they share the machine's cores). Variables made under ``strategy.scope()`` are
  mirrored: one copy per replica, the same initial values, updated with the summed gradients.
* ``TF_CONFIG`` set (``python -m common.launch --workers N -m tf2_impl.run_nn``):
  ``tf.distribute.MultiWorkerMirroredStrategy``, one process per worker, GradientTape loop only.
* The GradientTape loop: ``make_train_step`` keeps ``train.make_train_step``'s call (a shared
  batch in, its loss and outputs out) and runs ``strategy.run`` on the replicas' rows inside.
* ``model.fit``: ``fit_loss`` and ``fit_feed`` (two marked workarounds for Keras 3.15).

With one replica every function here hands back the single-process object, so
``--replicas 1`` computes exactly what it did before.
"""
import copy
import itertools

import keras
import tensorflow as tf

from common.distributed import SINGLE, World, shard, tf_config_env
from common.errors import UserError
from tf2_impl import train

MULTIWORKER_FIT = ("--loop fit cannot run multi-worker: Keras 3's fit fails under "
                   "MultiWorkerMirroredStrategy (keras-team/keras#20585); use --loop tape")


# -- the strategy --------------------------------------------------------------------------
def _replica_devices(replicas, device):
    """N GPUs, or N logical CPUs made from the one physical CPU (before TensorFlow's first op)."""
    if device == "cuda":
        gpus = tf.config.get_visible_devices("GPU")
        if len(gpus) < replicas:
            raise UserError(f"--replicas {replicas} needs {replicas} GPUs but TensorFlow sees "
                            f"{len(gpus)}; use at most {len(gpus)}, or --device cpu")
        return tuple(f"/gpu:{i}" for i in range(replicas))
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:  # devices already set up by an earlier run in this process
        if len(tf.config.list_logical_devices("CPU")) < replicas:
            raise UserError(f"--replicas {replicas} on the CPU needs a new process: TensorFlow "
                            f"has set up its devices already") from None
    return tuple(f"/cpu:{i}" for i in range(replicas))


def make_strategy(args, device):
    """(strategy, ``World``) of this process; call it before any other TensorFlow op.

    ``TF_CONFIG``: ``MultiWorkerMirroredStrategy`` (it starts the worker's gRPC server);
    ``--replicas N > 1``: ``MirroredStrategy`` on N devices; else TensorFlow's default
    strategy, whose ``scope()`` changes nothing."""
    cluster = tf_config_env()
    if cluster is not None:
        if args.loop == "fit":
            raise UserError(MULTIWORKER_FIT)
        if args.replicas > 1:
            raise UserError("--replicas counts the replicas of one process; with "
                            "common.launch each worker is one replica (its CPU or its GPUs)")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return strategy, World(strategy.num_replicas_in_sync, cluster[1], "multiworker",
                               tuple(strategy.extended.worker_devices))
    if args.replicas == 1:
        return tf.distribute.get_strategy(), SINGLE
    devices = _replica_devices(args.replicas, device)
    return tf.distribute.MirroredStrategy(devices), World(args.replicas, 0, "mirrored", devices)


# -- the GradientTape loop -----------------------------------------------------------------
def per_example(loss_fn):
    """`loss_fn` without its mean: one loss per row (Keras's ``reduction=None``)."""
    rows = copy.copy(loss_fn)
    rows.reduction = None
    return rows


def _in_batch_order(rows, replicas):
    """The replicas' rows gathered in replica order (0's rows r::N first) put back in the
    shared batch's order."""
    order = tf.concat([shard(tf.range(tf.shape(rows)[0]), r, replicas) for r in range(replicas)], 0)
    return tf.gather(rows, tf.math.invert_permutation(order))


def make_train_step(strategy, model, loss_fn, optimizer):
    """``train.make_train_step`` on the strategy's replicas: the same call, (loss, outputs)
    of one shared batch, so ``train.train_one_epoch`` and ``fast.train_one_epoch`` run it
    as they are and report the single-process numbers.

    Replica r gets rows r::N of the batch (``experimental_distribute_values_from_function``,
    no tf.data auto-sharding). Its loss is its rows' sum over the batch's global row count
    (``tf.nn.compute_average_loss``): ``apply_gradients`` sums the replicas' gradients, so
    the update is the single-process one, also when 27 rows split 14/13.
    """
    if strategy.num_replicas_in_sync == 1:
        return train.make_train_step(model, loss_fn, optimizer)
    replicas, per_row = strategy.num_replicas_in_sync, per_example(loss_fn)

    def replica_step(x, y, n_global):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            # Single-process twin: the batch mean. Here sum / the GLOBAL rows of this step
            # (a constant global batch size would be wrong for the last, smaller batch).
            loss = tf.nn.compute_average_loss(per_row(y, outputs), global_batch_size=n_global)
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))  # all-reduce: sum
        return loss, outputs

    @tf.function
    def train_step(x, y):
        # Every replica (every worker too) draws the same shared batch: its row count needs
        # no all-reduce.
        n_global = tf.shape(x)[0]
        rows = strategy.experimental_distribute_values_from_function(
            lambda ctx: (shard(x, ctx.replica_id_in_sync_group, replicas),
                         shard(y, ctx.replica_id_in_sync_group, replicas)))
        loss, outputs = strategy.run(replica_step, args=(*rows, n_global))
        outputs = strategy.gather(outputs, axis=0)  # every replica's rows, also other workers'
        return strategy.reduce("SUM", loss, axis=None), _in_batch_order(outputs, replicas)

    return train_step


def reseed_dropout(strategy, world, model, seed):
    """``train.reseed_dropout`` per replica: replica r draws its masks from `seed` + r
    (``common.distributed.replica_seed``; `seed` is the epoch's).

    Keras 3 keeps one seed state per Dropout layer, mirrored like any variable, so every
    replica would draw the same mask (keras-team/keras#20611). Each replica reads its own
    copy of the state, though: setting the copies apart makes the masks differ."""
    if world.size == 1:
        return train.reseed_dropout(model, seed)
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    for i, layer in enumerate(dropouts):
        copies = strategy.experimental_local_results(layer.seed_generator.state.value)
        for j, state in enumerate(copies):
            replica = world.rank * len(copies) + j  # this copy's replica in the whole run
            state.assign(tf.constant([seed + replica + i, 0], state.dtype))


def until_stopped(run, strategy, world, batches):
    """The epoch's `batches`; multi-worker, through ``run.until_stopped`` with the stop flag
    summed over the workers after each batch, so that all stop at the same batch (one
    leaving alone would leave the others waiting in the next all-reduce)."""
    if world.backend != "multiworker":
        return batches  # the replicas of one process stop together anyway

    def any_worker(flag):
        flags = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(float(flag)))
        return bool(strategy.reduce("SUM", flags, axis=None) > 0)

    return run.until_stopped(batches, any_worker)


# -- model.fit ----------------------------------------------------------------------------
class GlobalBatchLoss(keras.losses.Loss):
    """WORKAROUND (Keras 3.15, ``scale_loss_for_distribution`` in ``keras/src/losses/loss.py``,
    from keras-team/keras#20609, the fix of #19891): Keras's mean loss divides each replica's
    mean by the number of replicas, a mean of means, which is the global mean only when the
    replicas' rows are equal in number.

    This loss keeps Keras's value, which ``fit`` un-scales and weights by the replica's rows
    for its ``loss`` log (exact), and takes its gradient from the sum over the replica's
    rows divided by the step's global row count, all-reduced (exact for 14/13 too)."""

    def __init__(self, loss):
        super().__init__(name=loss.name, reduction="sum")
        self.per_row = per_example(loss)

    def call(self, y_true, y_pred):
        rows = self.per_row(y_true, y_pred)
        replica = tf.distribute.get_replica_context()
        n_local = tf.cast(tf.shape(rows)[0], rows.dtype)
        n_global = replica.all_reduce("SUM", n_local)
        exact = rows / n_global
        keras_value = rows / (n_local * replica.num_replicas_in_sync)
        return exact + tf.stop_gradient(keras_value - exact)


def fit_loss(loss_fn, strategy):
    """The loss to compile: `loss_fn`, or on several replicas ``GlobalBatchLoss(loss_fn)``."""
    return loss_fn if strategy.num_replicas_in_sync == 1 else GlobalBatchLoss(loss_fn)


def _dataset(feed):
    """A fit feed (``train.EpochBatches``, or ``fast``'s ``tf.data`` pipeline) as a dataset."""
    if isinstance(feed, tf.data.Dataset):
        return feed
    first = feed[0]
    signature = tuple(tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)) for a in first)
    return tf.data.Dataset.from_generator(lambda: map(feed.__getitem__, itertools.count()),
                                         output_signature=signature)


def fit_feed(model, strategy, feed):
    """`feed` (endless shared batches for ``model.fit``) split for the replicas: replica r
    gets rows r::N of every batch, as in the GradientTape loop.

    ``distribute_datasets_from_function`` hands one worker's consecutive elements to its
    replicas in turn, so the dataset yields each batch's N parts one after the other (fit's
    own split of a batch would give replica 0 the first rows, not every N-th)."""
    if strategy.num_replicas_in_sync == 1:
        return feed
    replicas = strategy.num_replicas_in_sync
    # WORKAROUND (Keras 3.15, keras-team/keras#21069, #19246): fit and evaluate first average one
    # batch over the replicas (``_maybe_symbolic_build``) only to read its shapes, which
    # fails ("AddN ... [14,10] != [13,10]") when the replicas' rows differ in number. The
    # model and optimizer are built already; the loss and metrics build in the first step,
    # as they do without a strategy. So that reading is skipped.
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None

    def parts(x, y):
        return tf.data.Dataset.range(replicas).map(
            lambda r: (shard(x, r, replicas), shard(y, r, replicas)))

    return strategy.distribute_datasets_from_function(
        lambda ctx: _dataset(feed).flat_map(parts))
