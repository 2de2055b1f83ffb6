"""Devices, feeding, the training and evaluation loops and checkpoints in TF1-style graph code.

Twins: ``torch_impl/train.py`` (``loss.backward()`` + ``optimizer.step()``) and
``tf2_impl/train.py`` (a ``tf.GradientTape`` loop, or ``model.fit``); same names,
same order. The idioms to learn here: the loss and the optimizer are part of the
graph (``make_loss`` and ``make_train_step`` add their ops once, before the Session
starts); one training step is ``sess.run(train_step, feed_dict=...)`` with numpy
batches fed into placeholders; the ``training`` placeholder does what
``model.train()`` / ``model.eval()`` do in torch; batch norm's moving averages move
only because the train step depends on the ``UPDATE_OPS`` collection. The speed
variants of ``--fast`` are in ``tf1_compat/fast.py``, the training recipes' schedules, AdamW
and mixed precision in ``tf1_compat/recipes.py``. ``feed``, ``make_train_step`` and
``train_one_epoch`` also take the towers of --replicas N (``tf1_compat/distributed.py``).
"""
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common import config
from common.datasets import batch_indices
from common.distributed import shard
from common.errors import UserError, WeightsError
from common.outputs import classification_metrics, regression_metrics
from common.recipes import augment_batch
from common.seed import set_deterministic_environment
from tf1_compat.distributed import Towers, tower_gradients
from tf1_compat.recipes import AdamWOptimizer, clip_gradients, scale_loss


def resolve_device(name):
    """--device auto|cpu|cuda -> "cpu" or "cuda"; asking for a missing GPU is a user error.

    The visible GPUs, not the physical ones: a process may have hidden them from TensorFlow.
    """
    has_gpu = bool(tf.config.get_visible_devices("GPU"))
    if name == "cuda" and not has_gpu:
        raise UserError("--device cuda was asked for but no GPU is visible to TensorFlow "
                        "(it needs the CUDA 12 libraries of `uv sync --extra gpu`); "
                        "use --device cpu or auto")
    if name == "auto":
        return "cuda" if has_gpu else "cpu"
    return name


def session_config(device, replicas=1):
    """The Session's ConfigProto: TF places ops on a visible GPU by itself, so "cpu"
    hides the GPUs from this Session rather than pinning ops with tf.device. `replicas`
    CPU towers (--replicas N on the CPU) need N CPU devices, /cpu:0 ... /cpu:N-1."""
    session = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    if device == "cpu":
        session.device_count["GPU"] = 0
        if replicas > 1:
            session.device_count["CPU"] = replicas
    else:
        session.gpu_options.allow_growth = True  # TF1 grabs all GPU memory otherwise
    return session


def make_deterministic():
    """Bit-identical reruns: deterministic kernels (process-wide, TF1 and TF2 alike).

    Initial weights and dropout masks also need the graph-level seed,
    ``tf.compat.v1.set_random_seed``, which the runners set in every graph they build.
    """
    set_deterministic_environment()
    tf.config.experimental.enable_op_determinism()
    # TF32 matrix products and convolutions on Ampere or newer GPUs: off, as in torch.
    tf.config.experimental.enable_tensor_float_32_execution(False)


def use_tf1_behavior():
    """TF1 semantics for the whole process, as TF1 code ported to TF2 usually starts:
    graph mode by default, reference variables and v1 control flow. Only an entry
    point may call it (under ``if __name__ == "__main__":``), never imported code."""
    tf.compat.v1.disable_v2_behavior()


# -- feeding -------------------------------------------------------------------------------
def make_batches(x, y, batch_size, seed=None, epoch=1, augment=False, flip=False):
    """Numpy (x, y) mini-batches in the batch order every framework shares, for feed_dict.

    The order is ``common.datasets.batch_indices(seed, epoch)``; with ``seed=None``
    the batches are in order (validation, test). A generator: one pass each.
    `augment` (training batches, --augment): each batch's images shifted (and mirrored
    when `flip`) by ``common.recipes.augment_batch``, keyed on (seed, epoch, batch index),
    the batches the other frameworks see.
    """
    batches = batch_indices(len(x), batch_size, seed, epoch, shuffle=seed is not None)
    for i, index in enumerate(batches):
        yield (augment_batch(x[index], seed, epoch, i, flip) if augment else x[index]), y[index]


def _shape_text(shape):
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def check_batch(placeholder, batch):
    """Raise UserError when `batch` cannot be fed to `placeholder`.

    Without this, sess.run fails deep inside the runtime with a long
    InvalidArgumentError; here the message names the placeholder and both shapes.
    """
    expected = placeholder.shape
    if not expected.is_compatible_with(np.shape(batch)):
        raise UserError(f"a batch of shape {tuple(np.shape(batch))} was fed to placeholder "
                        f"{placeholder.op.name!r}, which expects {_shape_text(expected.as_list())}; "
                        f"the data does not fit this model")


def feed(model, inputs, targets=None, training=False):
    """The feed_dict of one batch (shapes checked against the placeholders). `model` may be
    the ``distributed.Towers`` of --replicas N: tower r gets rows r::N (``shard``)."""
    if isinstance(model, Towers):
        size = len(model.models)
        return {placeholder: value for rank, tower in enumerate(model.models)
                for placeholder, value in feed(tower, shard(inputs, rank, size),
                                               shard(targets, rank, size), training).items()}
    check_batch(model.inputs, inputs)
    feed_dict = {model.inputs: inputs}
    if targets is not None:
        check_batch(model.targets, targets)
        feed_dict[model.targets] = targets
    if training:  # left out, the placeholder's default (False) selects inference mode
        feed_dict[model.training] = True
    return feed_dict


# -- loss and optimizer --------------------------------------------------------------------
def make_loss(task, model, label_smoothing=None):
    """The mean loss of a batch as a scalar tensor: sparse softmax cross-entropy on the
    logits and int64 class indices, or mean squared error on (N, 1) predictions.

    ``labels=`` and ``logits=`` are keywords: the TF1 functions once took them
    positionally in the other order. `label_smoothing` (--label-smoothing EPS): the
    cross-entropy against (1 - EPS) * one-hot + EPS / classes, in training and evaluation
    alike; the sparse op has no smoothing, so the targets become one-hot here (torch's
    ``cross_entropy`` takes EPS with class indices).
    """
    with tf.name_scope("loss"):
        if task == "classification" and label_smoothing is not None:
            return tf.compat.v1.losses.softmax_cross_entropy(
                onehot_labels=tf.one_hot(model.targets, model.outputs.shape[-1]),
                logits=model.outputs, label_smoothing=label_smoothing)
        if task == "classification":
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=model.targets, logits=model.outputs))
        return tf.compat.v1.losses.mean_squared_error(labels=model.targets,
                                                      predictions=model.outputs)


def make_optimizer(lr, weight_decay=None, precision="off"):
    """Adam with the shared constants (TF1's eps default is 1e-8 like torch's; passed anyway).

    TF1's AdamOptimizer puts eps outside the bias correction (``lr_t =
    lr*sqrt(1-b2^t)/(1-b1^t)``, step ``lr_t*m/(sqrt(v)+eps)``) where torch divides by
    ``sqrt(v/(1-b2^t))+eps``: with eps 1e-8 the two differ only while sqrt(v) ~ eps.
    `lr`: a float or the schedule's tensor (``recipes.LearningRate``). `weight_decay`
    (--weight-decay): decoupled, ``recipes.AdamWOptimizer``. `precision` "fp16": wrapped
    for loss scaling (``recipes.scale_loss``).
    """
    constants = {"beta1": config.ADAM_BETA1, "beta2": config.ADAM_BETA2, "epsilon": config.ADAM_EPS}
    optimizer = (tf.compat.v1.train.AdamOptimizer(lr, **constants) if weight_decay is None
                 else AdamWOptimizer(weight_decay, lr, **constants))
    return scale_loss(optimizer, precision)


def make_train_step(optimizer, loss, with_update_ops=True, clip_grad_norm=None):
    """One op that a Session runs once per batch: gradients (their global norm clipped to
    `clip_grad_norm`, --clip-grad-norm), Adam, global step + 1 (``minimize`` in two parts).

    Batch norm's moving-average updates are assign ops in ``UPDATE_OPS`` that no
    part of the loss depends on, so a Session would never run them: the classic
    TF1 bug is a model whose inference uses the initial 0/1 statistics. The control
    dependency makes every step run them first; `with_update_ops=False` builds the
    bug (the tests show the averages then never move).

    `loss` may be the ``distributed.Towers`` of --replicas N: the towers' gradients summed
    (``tower_gradients``), and tower 0's moving averages only (``Towers.scope``).
    """
    towers = loss if isinstance(loss, Towers) else None
    update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS,
                                             towers.scope if towers else None)
    with tf.control_dependencies(update_ops if with_update_ops else []):
        gradients = (tower_gradients(optimizer, towers) if towers
                     else optimizer.compute_gradients(loss))
        grads_and_vars = clip_gradients(gradients, clip_grad_norm)
        return optimizer.apply_gradients(
            grads_and_vars, global_step=tf.compat.v1.train.get_or_create_global_step(),
            name="train_step")


# -- one epoch, prediction and evaluation --------------------------------------------------
def train_one_epoch(sess, model, train_step, loss, batches, task):
    """One pass over `batches`; returns {"loss", "accuracy" | "mse"}, means over the rows.

    Each ``sess.run`` fetches only what the metrics need: every fetched tensor is a
    copy out of the runtime.
    """
    fetches = {"step": train_step, "loss": loss}
    if task == "classification":
        fetches["outputs"] = model.outputs  # the logits, for the training accuracy
    total_loss = correct = rows = 0
    for inputs, targets in tqdm(batches, desc="train", leave=False):
        values = sess.run(fetches, feed(model, inputs, targets, training=True))
        total_loss += float(values["loss"]) * len(targets)
        if task == "classification":
            correct += int(np.sum(np.argmax(values["outputs"], axis=1) == targets))
        rows += len(targets)
    if task == "classification":
        return {"loss": total_loss / rows, "accuracy": correct / rows}
    return {"loss": total_loss / rows, "mse": total_loss / rows}


def predict(sess, model, batches):
    """Logits (N, classes) or predictions (N, 1) as numpy, from (inputs, targets) batches
    or an array of inputs. Nothing is fed to ``training``: its default, False, selects
    inference mode (moving batch-norm statistics, no dropout)."""
    if isinstance(batches, np.ndarray):
        batches = make_batches(batches, np.zeros(len(batches)), config.BATCH_SIZE)
    return np.concatenate([sess.run(model.outputs, feed(model, inputs)) for inputs, _ in batches])


def evaluate(sess, model, loss, batches, task):
    """(metrics, outputs) on one split: metrics as in metrics.json, outputs as numpy."""
    outputs, targets, total_loss = [], [], 0.0
    for inputs, batch_targets in batches:
        batch_outputs, batch_loss = sess.run([model.outputs, loss],
                                             feed(model, inputs, batch_targets))
        outputs.append(batch_outputs)
        targets.append(batch_targets)
        total_loss += float(batch_loss) * len(batch_targets)
    outputs, targets = np.concatenate(outputs), np.concatenate(targets)
    if task == "classification":
        return classification_metrics(outputs, targets, total_loss / len(targets)), outputs
    return regression_metrics(outputs, targets, total_loss / len(targets)), outputs


# -- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(path, sess, saver):
    """saver.save to the prefix `path`: it writes `path`.index and `path`.data-*.

    No "checkpoint" state file and no .meta graph: common.runner's state.json names
    the prefix, and the graph is rebuilt by code, not loaded.
    """
    saver.save(sess, str(path), write_meta_graph=False, write_state=False)
    return path


def load_checkpoint(path, sess, saver):
    """saver.restore from the prefix `path`, with a one-sentence error."""
    try:
        saver.restore(sess, str(path))
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError, tf.errors.DataLossError,
            ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"checkpoint {path} cannot be restored ({first}); start the run "
                           f"again without --resume") from None
