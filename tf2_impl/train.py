"""Training and evaluation in TensorFlow 2 / Keras 3, both ways: ``model.fit`` and a
custom ``tf.GradientTape`` loop; devices and checkpoints.

Twins: ``torch_impl/train.py`` (``loss.backward()`` / ``optimizer.step()``) and
``tf1_compat/train.py`` (``session.run`` of a train op). The idioms to learn here:

* the custom loop: the forward pass runs under ``tf.GradientTape``, which records it;
  ``tape.gradient`` differentiates the loss and ``optimizer.apply_gradients`` applies
  the result (no gradient accumulates between steps, so there is no ``zero_grad``).
  ``tf.function`` traces the Python step once into a graph; a fixed ``input_signature``
  (batch dimension ``None``) keeps the smaller last batch from tracing it again.
  ``training=True`` / ``False`` is passed on every call where torch sets a mode with
  ``model.train()`` / ``model.eval()``. Keras metric objects accumulate over an epoch and
  are cleared with ``reset_state()``.
* ``model.fit``: ``compile`` names the optimizer, loss and metrics, and Keras builds the
  same step itself; callbacks hook into the epoch and batch boundaries
  (``TrainingRunCallback``) for the summary line, checkpoints and Ctrl-C.

Both loops take the shared batches of ``common.datasets.batch_indices`` and report the
same numbers: the loss as the mean over the epoch's samples of the training-mode loss.
"""
import contextlib
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common import config
from common.datasets import batch_indices
from common.errors import UserError, WeightsError
from common.outputs import atomic_path, classification_metrics, regression_metrics
from common.seed import epoch_seed, set_deterministic_environment


# -- devices ---------------------------------------------------------------------------
def resolve_device(name):
    """--device auto|cpu|cuda -> "cpu" or "cuda". Call it before TensorFlow runs any op.

    TensorFlow places every op on the first GPU by itself when one is visible, so
    --device cpu hides the GPUs from this process. That is only possible before
    TensorFlow has initialised its devices; after that (a second run in one process,
    as in the tests) ``device_scope`` pins the run to the CPU instead.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if name == "cuda" and not gpus:
        raise UserError("--device cuda was asked for but no GPU is visible; "
                        "use --device cpu or auto")
    try:
        if name == "cpu":
            tf.config.set_visible_devices([], "GPU")
        for gpu in tf.config.get_visible_devices("GPU"):
            # Allocate GPU memory as needed, not all of it at start (torch's habit too),
            # so that a torch model in the same process still finds room.
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # this process has initialised its devices already: see device_scope
    return "cuda" if gpus and name != "cpu" else "cpu"


def device_scope(device):
    """The placement for the rest of the run: the CPU when --device cpu could not hide
    the GPUs any more, otherwise TensorFlow's own choice."""
    if device == "cpu" and tf.config.get_visible_devices("GPU"):
        return tf.device("/CPU:0")
    return contextlib.nullcontext()


def make_deterministic():
    """Bit-identical reruns with the same seed on the same machine.

    ``enable_op_determinism`` makes TensorFlow pick deterministic kernels (and raise
    for ops that have none). ``set_deterministic_environment`` also turns oneDNN's CPU
    kernels off, but TensorFlow reads that variable when it is imported: set
    ``TF_ENABLE_ONEDNN_OPTS=0`` before starting Python to change kernels. With a fixed
    thread count oneDNN is deterministic from run to run as well.
    """
    set_deterministic_environment()
    tf.config.experimental.enable_op_determinism()


def as_tensor(array):
    """A whole split as one tensor on the default device (the GPU when there is one)."""
    return tf.convert_to_tensor(np.ascontiguousarray(array))


# -- loss, metrics, optimizer, dropout seeds ----------------------------------------------
def make_loss(task):
    """The mean loss of a batch: cross-entropy on logits, or mean squared error."""
    if task == "classification":
        # Logits and int64 class indices, as torch's F.cross_entropy (see models.py on
        # why the model has no softmax).
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Targets are (N, 1) like the outputs: an (N,) target would broadcast to (N, N).
    return keras.losses.MeanSquaredError()


def make_metric(task):
    """The task's metric, named as in metrics.json ("accuracy" or "mse")."""
    if task == "classification":
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    return keras.metrics.MeanSquaredError(name="mse")


def make_optimizer(lr):
    # Keras's Adam eps default is 1e-7, torch's 1e-8: pass the shared one.
    return keras.optimizers.Adam(learning_rate=lr, beta_1=config.ADAM_BETA1,
                                 beta_2=config.ADAM_BETA2, epsilon=config.ADAM_EPS)


def reseed_dropout(model, seed):
    """Make this epoch's dropout masks a function of `seed` (``common.seed.epoch_seed``).

    Keras 3 gives each Dropout layer a ``SeedGenerator`` whose state is a variable
    ``[seed, counter]``, advanced by every call; resetting it at each epoch start makes
    a resumed run draw the masks of the uninterrupted one (torch: ``torch.manual_seed``).
    """
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    for i, layer in enumerate(dropouts):
        layer.seed_generator.state.assign(np.array([seed + i, 0], dtype=np.int64))


# -- the custom loop: one epoch and evaluation -----------------------------------------------
def make_train_step(model, optimizer, task, input_shape, jit_compile=False):
    """(train_step, metrics): one optimisation step as a traced graph, and the Keras
    metrics it updates ("loss" and the task's metric).

    Built once per run: a new ``tf.function`` would trace the graph again.
    ``jit_compile=True`` compiles the graph with XLA (fused kernels, faster on GPUs,
    numerically a little different).
    """
    loss_fn = make_loss(task)
    metrics = {"loss": keras.metrics.Mean(name="loss"), "metric": make_metric(task)}
    x_spec = tf.TensorSpec((None, *input_shape), tf.float32)
    y_spec = tf.TensorSpec((None,), tf.int64) if task == "classification" else \
        tf.TensorSpec((None, 1), tf.float32)

    @tf.function(input_signature=[x_spec, y_spec], jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)  # batch statistics, dropout on
            loss = loss_fn(y, outputs)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        metrics["loss"].update_state(loss, sample_weight=tf.shape(x)[0])
        metrics["metric"].update_state(y, outputs)

    return train_step, metrics


def train_one_epoch(train_step, metrics, x, y, batches, after_batch=None, desc="train"):
    """One pass over `batches` (index arrays); returns {"loss", "accuracy" | "mse"}.

    `x` and `y` are tensors; each batch is gathered from them on their device. The
    metrics are read once at the end: a ``float()`` per batch would wait for every step.
    """
    for metric in metrics.values():
        metric.reset_state()
    for index in tqdm(batches, desc=desc, leave=False):
        train_step(tf.gather(x, index), tf.gather(y, index))
        if after_batch is not None:
            after_batch()
    return {m.name: float(m.result()) for m in metrics.values()}


def make_predict_step(model, input_shape, jit_compile=False):
    """The inference forward pass as a traced graph, built once per run."""
    @tf.function(input_signature=[tf.TensorSpec((None, *input_shape), tf.float32)],
                 jit_compile=jit_compile)
    def predict_step(x):
        return model(x, training=False)  # dropout off, batch norm uses its moving statistics

    return predict_step


def predict(predict_step, x, batch_size):
    """Logits (N, classes) or predictions (N, 1) as a float32 numpy array."""
    return np.concatenate([predict_step(x[i:i + batch_size]).numpy()
                           for i in range(0, len(x), batch_size)])


def evaluate(predict_step, x, y, task, batch_size):
    """(metrics, outputs) on one split: metrics as in metrics.json, outputs as numpy."""
    outputs = predict(predict_step, x, batch_size)
    targets = np.asarray(y)
    loss = float(make_loss(task)(targets, outputs))
    if task == "classification":
        return classification_metrics(outputs, targets, loss), outputs
    return regression_metrics(outputs, targets, loss), outputs


# -- model.fit: data, compile, callbacks -----------------------------------------------------
def fit_batches(x, y, batch_size, seed, epochs):
    """The training batches of `epochs`, one epoch after the other, as a tf.data pipeline.

    ``fit(x, y, shuffle=True)`` would draw its own order; the shared batches of
    ``batch_indices`` keep fit, the custom loop and the other frameworks on the same
    samples. The epochs' sample orders enter the pipeline as one (epochs, N) array;
    ``batch`` cuts each order into the same consecutive batches as ``batch_indices``,
    the rows are gathered in the pipeline and ``prefetch`` prepares the next batch while
    the current one trains. (A Python generator of index arrays, ``from_generator``,
    measured 6% slower.)
    Give ``fit`` ``steps_per_epoch`` so it reads one iterator across epochs.
    """
    orders = np.stack([np.concatenate(batch_indices(len(x), batch_size, seed, epoch))
                       for epoch in epochs])
    with tf.device("/CPU:0"):  # tf.data runs on the host; fit copies each batch to the GPU
        x, y = tf.constant(x), tf.constant(y)
    return (tf.data.Dataset.from_tensor_slices(orders)
            .flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))
            .map(lambda index: (tf.gather(x, index), tf.gather(y, index)))
            .prefetch(tf.data.AUTOTUNE))


def compile_model(model, optimizer, task, jit_compile=False):
    """``model.compile`` with the shared loss and metric. ``jit_compile`` is passed
    explicitly: Keras's default ("auto") turns XLA on whenever a GPU is visible."""
    model.compile(optimizer=optimizer, loss=make_loss(task), metrics=[make_metric(task)],
                  jit_compile=jit_compile)


def evaluate_compiled(model, x, y, task, batch_size):
    """(metrics, outputs) on one split with ``model.evaluate`` and ``model.predict``."""
    loss = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)["loss"]
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    if task == "classification":
        return classification_metrics(outputs, y, loss), outputs
    return regression_metrics(outputs, y, loss), outputs


class TrainingRunCallback(keras.callbacks.Callback):
    """Connects ``model.fit`` to ``common.runner.TrainingRun``.

    Keras counts epochs from 0, the shared history from 1. At each epoch start the
    dropout seeds are reset (``reseed_dropout``); after each batch a pending Ctrl-C
    stops the run (``run.check_stop``); at each epoch end the epoch is recorded
    (summary line, best-validation tracking) and `end_epoch` writes the checkpoints.
    """

    def __init__(self, run, seed, end_epoch):
        super().__init__()
        self.run, self.seed, self.end_epoch = run, seed, end_epoch
        self.metric = run.metric

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        reseed_dropout(self.model, epoch_seed(self.seed, self.epoch))
        self.start = self.last_batch_end = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last_batch_end = time.perf_counter()
        self.run.check_stop(self.epoch)

    def on_epoch_end(self, epoch, logs=None):
        train = {"loss": float(logs["loss"]), self.metric: float(logs[self.metric])}
        val = {"loss": float(logs["val_loss"]), self.metric: float(logs[f"val_{self.metric}"])}
        # Training time only, as in the custom loop: fit validates before this hook.
        self.end_epoch(self.epoch, train, val, self.last_batch_end - self.start)


# -- checkpoints ------------------------------------------------------------------------
def save_checkpoint(path, model, optimizer=None):
    """Best: the model's weights as ``.weights.h5``, written atomically. Last (with the
    optimizer): a ``tf.train.Checkpoint`` of model and optimizer (weights, Adam's moments
    and step count), written as ``<path>.index`` and ``<path>.data-*``; state.json names it
    only once both files are complete."""
    if optimizer is None:
        with atomic_path(path) as tmp:
            model.save_weights(tmp)  # Keras 3 insists on the .weights.h5 suffix
    else:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(path))
    return path


def load_checkpoint(path, model, optimizer=None):
    """Restore a save_checkpoint file into `model` (and `optimizer`, whose variables
    must exist: ``optimizer.build(model.trainable_variables)``)."""
    try:
        if optimizer is None:
            model.load_weights(path)
        else:
            status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(str(path))
            status.assert_existing_objects_matched()
    except (OSError, ValueError, AssertionError, tf.errors.OpError) as exc:
        raise WeightsError(f"checkpoint {path} cannot be loaded ({str(exc).splitlines()[0]}); "
                           f"start the run again without --resume") from None
