"""Training and evaluation loops, devices and checkpoints in TF1-style graph code.

Twins: ``torch_impl/train.py`` (``loss.backward()`` + ``optimizer.step()``) and
``tf2_impl/train.py`` (``model.fit`` or a ``tf.GradientTape`` loop). The idioms to
learn here: the optimizer is part of the graph (``adam_train_op`` adds the
gradient and update ops once, before the Session starts); one training step is
``sess.run(train_op, feed_dict=...)`` with numpy batches fed into placeholders;
the ``training`` placeholder does what ``model.train()`` / ``model.eval()`` do in
torch; batch norm's moving averages only move because the train op depends on
the ``UPDATE_OPS`` collection.

Data stays in numpy: batches are cut with the shared
``common.datasets.batch_indices`` and copied into the Session by ``feed_dict``.
"""
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common import config
from common.errors import UserError, WeightsError
from common.outputs import classification_metrics, regression_metrics
from common.seed import set_deterministic_environment


# -- devices ---------------------------------------------------------------------------
def resolve_device(name):
    """--device auto|cpu|cuda -> "cpu" or "cuda"; asking for a missing GPU is a user error."""
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if name == "cuda" and not has_gpu:
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu or auto")
    if name == "auto":
        return "cuda" if has_gpu else "cpu"
    return name


def session_config(device):
    """The Session's ConfigProto: TF places ops on a visible GPU by itself, so "cpu"
    hides the GPUs from this Session rather than pinning ops with tf.device."""
    session = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    if device == "cpu":
        session.device_count["GPU"] = 0
    else:
        session.gpu_options.allow_growth = True  # TF1 grabs all GPU memory otherwise
    return session


def make_deterministic():
    """Bit-identical reruns: deterministic kernels (process-wide, TF1 and TF2 alike).

    Initial weights also need the graph-level seed, ``tf.compat.v1.set_random_seed``,
    which the runners set in every graph they build.
    """
    set_deterministic_environment()
    tf.config.experimental.enable_op_determinism()


def use_tf1_behavior():
    """TF1 semantics for the whole process, as TF1 code ported to TF2 usually starts.

    ``disable_v2_behavior`` brings back graph mode by default, reference variables
    and v1 control flow. v2 control flow is switched back on: with v1's Switch/Merge,
    the gradient of batch norm's ``tf.cond`` fills a zero tensor the size of the
    layer's input for the branch not taken and adds it in, at every training step
    (about 7% of a CNN step on a CPU); v2's single ``If`` op differentiates the taken
    branch only. Both existed in TF 1.15 and compute the same numbers.
    """
    tf.compat.v1.disable_v2_behavior()
    tf.compat.v1.enable_control_flow_v2()


# -- feeding -----------------------------------------------------------------------------
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


def feed(model, inputs, targets=None, training=False, dropout_seed=None):
    """The feed_dict of one batch (shapes checked against the placeholders)."""
    check_batch(model.inputs, inputs)
    feed_dict = {model.inputs: inputs}
    if targets is not None:
        check_batch(model.targets, targets)
        feed_dict[model.targets] = targets
    if training:
        feed_dict[model.training] = True
    if dropout_seed is not None and model.dropout_seed is not None:
        feed_dict[model.dropout_seed] = dropout_seed
    return feed_dict


# -- optimizer -----------------------------------------------------------------------------
def adam_train_op(model, learning_rate, with_update_ops=True):
    """Adam on the model's loss, as one op that a Session runs once per batch.

    TF1's AdamOptimizer puts eps outside the bias correction (``lr_t =
    lr*sqrt(1-b2^t)/(1-b1^t)``, step ``lr_t*m/(sqrt(v)+eps)``) where torch divides by
    ``sqrt(v/(1-b2^t))+eps``: with eps 1e-8 the two differ only while sqrt(v) ~ eps.

    `with_update_ops=False` leaves out the batch-norm moving-average updates, the
    classic TF1 bug (the test suite shows the averages then never move).
    """
    optimizer = tf.compat.v1.train.AdamOptimizer(
        learning_rate, beta1=config.ADAM_BETA1, beta2=config.ADAM_BETA2, epsilon=config.ADAM_EPS)
    update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    # The update ops are not inputs of the loss, so nothing would run them; a control
    # dependency makes every training step run them first.
    with tf.control_dependencies(update_ops if with_update_ops else []):
        return optimizer.minimize(model.loss, var_list=list(model.variables.values()),
                                  name="train_op")


# -- one epoch and evaluation -------------------------------------------------------------
def train_one_epoch(sess, model, train_op, x, y, batches, task, dropout_seed=0, after_batch=None,
                    desc="train"):
    """One pass over `batches` (index arrays); returns {"loss", "accuracy" | "mse"}.

    Dropout masks come from the fed seed (dropout_seed, step): a function of the
    epoch seed and the batch number, the same in a resumed Session.
    """
    total_loss = total_correct = 0.0
    for step, index in enumerate(tqdm(batches, desc=desc, leave=False)):
        feed_dict = feed(model, x[index], y[index], training=True,
                         dropout_seed=np.array([dropout_seed, step], np.int64))
        if task == "classification":
            # The logits come back with the step (N x classes floats) for the training
            # accuracy; fetch nothing more per step: each fetch is a copy out of the runtime.
            _, loss, logits = sess.run([train_op, model.loss, model.outputs], feed_dict)
            total_correct += np.sum(np.argmax(logits, axis=1) == y[index])
        else:
            _, loss = sess.run([train_op, model.loss], feed_dict)
        total_loss += float(loss) * len(index)
        if after_batch is not None:
            after_batch()
    n = sum(len(index) for index in batches)
    loss = total_loss / n
    if task == "classification":
        return {"loss": loss, "accuracy": float(total_correct) / n}
    return {"loss": loss, "mse": loss}


def predict(sess, model, x, batch_size):
    """Logits (N, classes) or predictions (N, 1) as a float32 numpy array.

    Nothing fed for `training`: its default, False, selects inference mode
    (moving batch-norm statistics, no dropout).
    """
    return np.concatenate([sess.run(model.outputs, feed(model, x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])


def evaluate(sess, model, x, y, task, batch_size):
    """(metrics, outputs) on one split: metrics as in metrics.json, outputs as numpy."""
    outputs, total_loss = [], 0.0
    for i in range(0, len(x), batch_size):
        batch_outputs, loss = sess.run([model.outputs, model.loss],
                                       feed(model, x[i:i + batch_size], y[i:i + batch_size]))
        outputs.append(batch_outputs)
        total_loss += float(loss) * len(batch_outputs)
    outputs, loss = np.concatenate(outputs), total_loss / len(x)
    if task == "classification":
        return classification_metrics(outputs, y, loss), outputs
    return regression_metrics(outputs, y, loss), outputs


# -- checkpoints ------------------------------------------------------------------------
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"checkpoint {path} cannot be restored ({first}); start the run "
                           f"again without --resume") from None
