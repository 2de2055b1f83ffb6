"""Training and evaluation in TensorFlow 2 / Keras 3, both ways: a custom
``tf.GradientTape`` loop and ``model.fit``; devices and checkpoints.

Twins: ``torch_impl/train.py`` (``loss.backward()`` / ``optimizer.step()``) and
``tf1_compat/train.py`` (``session.run`` of a train op). The idioms to learn here:

* the custom loop (``tf2_impl/run_cnn.py``): the forward pass runs under
  ``tf.GradientTape``, which records it; ``tape.gradient`` differentiates the loss and
  ``optimizer.apply_gradients`` applies the result (nothing accumulates between steps,
  so there is no ``zero_grad``). ``tf.function`` traces the Python step into a graph.
  ``training=True`` / ``False`` is passed on every call where torch sets a mode with
  ``model.train()`` / ``model.eval()``. Batches come from a ``tf.data.Dataset``.
* ``model.fit`` (``tf2_impl/run_cnn_keras.py``): ``compile`` names the optimizer, loss
  and metrics, and Keras builds the same step itself; a ``keras.utils.PyDataset`` feeds
  the shared batches and a callback (``TrainingRunCallback``) reports each epoch.

Both loops train on the shared batches of ``common.datasets.batch_indices`` and report
the same numbers: the loss as the mean over the epoch's samples of the training-mode loss.
The training recipes (schedules, decay, clipping, smoothing, augmentation, mixed
precision) enter through the arguments below; ``tf2_impl/recipes.py`` holds the rest.
"""
import math

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common import config
from common.datasets import batch_indices
from common.errors import UserError, WeightsError
from common.outputs import classification_metrics, regression_metrics
from common.recipes import augment_batch
from common.seed import set_deterministic_environment
from tf2_impl.models import APIS
from tf2_impl.recipes import SmoothedCrossEntropy


# -- command line ------------------------------------------------------------------------
def add_keras_arguments(parser, api, loop, other):
    """TF2's two flags on top of the shared ones (torch and TF1 have one way each):
    --api picks the Keras model-building API, --loop the training loop; `other` names
    the entry point that runs the other loop."""
    parser.add_argument("--api", choices=APIS, default=api,
                        help=f"Keras model-building API (default {api})")
    parser.add_argument("--loop", choices=("fit", "tape"), default=loop,
                        help=f"{loop}: this file's loop (default); the other: {other}")
    return parser


# -- devices ---------------------------------------------------------------------------
def resolve_device(name):
    """--device auto|cpu|cuda -> "cpu" or "cuda", the device TensorFlow will really use.

    TensorFlow places every op on the first GPU by itself when one is visible (torch
    waits for ``.to(device)``), so --device cpu hides the GPUs from this process. That
    is only possible before TensorFlow has set up its devices: a later run in the same
    process that asks for another device is refused rather than mislabelled.
    Memory growth (TensorFlow takes GPU memory as it needs it) is set by ``common``.
    """
    if name == "cpu":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass  # devices already set up by an earlier run in this process: checked below
    gpus = tf.config.get_visible_devices("GPU")
    if name == "cuda" and not gpus:
        raise UserError("--device cuda was asked for but no GPU is visible to TensorFlow "
                        "(it needs the CUDA 12 libraries of `uv sync --extra gpu`, and a "
                        "process that ran on the CPU keeps it); use --device cpu or auto")
    if name == "cpu" and gpus:
        raise UserError("--device cpu was asked for but TensorFlow already uses the GPU in "
                        "this process; start a new process, or set CUDA_VISIBLE_DEVICES=''")
    return "cuda" if gpus else "cpu"


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
    # TF32 matrix products and convolutions on Ampere or newer GPUs: off, as in torch.
    tf.config.experimental.enable_tensor_float_32_execution(False)


# -- data --------------------------------------------------------------------------------
def make_batches(x, y, batch_size, seed=None, epoch=1, augment=False, flip=False):
    """One epoch of (x, y) batches as a ``tf.data.Dataset``: the shared shuffled order of
    ``batch_indices(len(x), batch_size, seed, epoch)``, or in order when `seed` is None
    (validation, test). torch's twin is a ``DataLoader`` with a batch sampler. With
    `augment` (training images) each batch is cropped, and mirrored when `flip`, by
    ``common.recipes.augment_batch`` (torch's twin does it in the ``collate_fn``)."""
    order = np.arange(len(x)) if seed is None else \
        np.concatenate(batch_indices(len(x), batch_size, seed, epoch))
    x, y = x[order], y[order]
    if augment:
        x = np.concatenate([augment_batch(x[i:i + batch_size], seed, epoch, i // batch_size, flip)
                            for i in range(0, len(x), batch_size)])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


class EpochBatches(keras.utils.PyDataset):
    """The training batches for ``model.fit``, epoch after epoch, without end.

    ``fit(x, y, shuffle=True)`` would draw its own order; this feed keeps fit on the
    shared batches. Keras asks for batch i = 0, 1, 2, ... across all epochs of one fit
    call (``fit`` gets ``steps_per_epoch``), so batch i is batch i % per_epoch of epoch
    ``initial_epoch + 1 + i // per_epoch``: a function of i, as Keras requires.
    `augment`, `flip`: as in ``make_batches``.
    """

    def __init__(self, x, y, batch_size, seed, initial_epoch, augment=False, flip=False):
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.initial_epoch, self.augment, self.flip = initial_epoch, augment, flip
        self.per_epoch = math.ceil(len(x) / batch_size)
        self._epoch, self._batches = None, None  # the last epoch's batches, drawn once

    @property
    def num_batches(self):
        return None  # endless

    def __getitem__(self, i):
        epoch = self.initial_epoch + 1 + i // self.per_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = batch_indices(len(self.x), self.batch_size, self.seed, epoch)
        index = self._batches[i % self.per_epoch]
        x = self.x[index]
        if self.augment:
            x = augment_batch(x, self.seed, epoch, i % self.per_epoch, self.flip)
        return x, self.y[index]


def make_fit_batches(x, y, batch_size, seed, initial_epoch, augment=False, flip=False):
    """The ``model.fit`` feed of the shared batches, starting after `initial_epoch`."""
    return EpochBatches(x, y, batch_size, seed, initial_epoch, augment, flip)


# -- loss, metric, optimizer, dropout seeds ------------------------------------------------
def make_loss(task, label_smoothing=None):
    """The mean loss of a batch: cross-entropy on logits (smoothed by `label_smoothing`:
    ``recipes.SmoothedCrossEntropy``), or mean squared error."""
    if task == "classification" and label_smoothing is not None:
        return SmoothedCrossEntropy(label_smoothing)
    if task == "classification":
        # Logits and int64 class indices, as torch's nn.CrossEntropyLoss (models.py says
        # why the model has no softmax).
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Targets are (N, 1) like the outputs: an (N,) target would broadcast to (N, N).
    return keras.losses.MeanSquaredError()


def make_metric(task):
    """The task's metric, named as in metrics.json ("accuracy" or "mse")."""
    if task == "classification":
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    return keras.metrics.MeanSquaredError(name="mse")


def make_optimizer(model, lr, weight_decay=None, clip_grad_norm=None, loss_scale=False):
    """Adam with the shared constants (Keras's eps default is 1e-7, torch's 1e-8); `lr` a
    rate or a schedule (``recipes.learning_rate``).

    `weight_decay`: ``AdamW``, decoupled (``w -= lr * wd * w`` on every trainable variable,
    torch's ``AdamW``; Keras's default decay is 0.004, torch's 0.01: always given here).
    `clip_grad_norm`: ``global_clipnorm``, the norm of all gradients together as torch's
    ``clip_grad_norm_`` (``clipnorm`` would clip each variable's gradient on its own).
    `loss_scale` (fp16): a ``LossScaleOptimizer``; ``compile`` would wrap one for ``fit``
    by itself, but made here it is the optimizer the checkpoint saves, loss scale included.
    Keras creates Adam's moment variables at the first step; building them now lets a
    checkpoint restore into them (torch's optimizer takes the parameters instead)."""
    options = dict(learning_rate=lr, beta_1=config.ADAM_BETA1, beta_2=config.ADAM_BETA2,
                   epsilon=config.ADAM_EPS, global_clipnorm=clip_grad_norm)
    optimizer = keras.optimizers.Adam(**options) if weight_decay is None else \
        keras.optimizers.AdamW(weight_decay=weight_decay, **options)
    if loss_scale:
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def reseed_dropout(model, seed):
    """Make this epoch's dropout masks a function of `seed` (``common.seed.epoch_seed``).

    Keras 3 gives each Dropout layer a ``SeedGenerator`` whose state is a variable
    ``[seed, counter]``, advanced by every call; setting it at each epoch start makes a
    resumed run draw the masks of the uninterrupted one (torch: ``torch.manual_seed``).
    """
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    for i, layer in enumerate(dropouts):
        layer.seed_generator.state.assign(np.array([seed + i, 0], dtype=np.int64))


# -- the custom loop: one epoch and evaluation ------------------------------------------------
def make_train_step(model, loss_fn, optimizer):
    """One optimisation step, traced into a graph by ``tf.function``: (loss, outputs).

    Built once per run: every new ``tf.function`` traces again. It traces once per batch
    shape: for the full batches and for the smaller last one.
    """
    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)  # batch statistics, dropout on
            loss = loss_fn(y, outputs)
            # fp16: the loss times the LossScaleOptimizer's scale (Keras 3's custom loops
            # scale it themselves; apply_gradients unscales); else the loss itself.
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss, outputs

    return train_step


def train_one_epoch(train_step, batches, task):
    """One pass over `batches`; returns {"loss", "accuracy" | "mse"}.

    Keras metric objects accumulate over the epoch; they are read once at the end
    (a ``float()`` per batch would wait for every step).
    """
    mean_loss, metric = keras.metrics.Mean(name="loss"), make_metric(task)
    for x, y in tqdm(batches, desc="train", leave=False):
        loss, outputs = train_step(x, y)
        mean_loss.update_state(loss, sample_weight=tf.shape(x)[0])
        metric.update_state(y, outputs)
    return {"loss": float(mean_loss.result()), metric.name: float(metric.result())}


def predict(model, batches):
    """Logits (N, classes) or predictions (N, 1) of (x, y) `batches` as numpy.

    ``training=False``: dropout off, batch norm uses its moving statistics (torch:
    ``model.eval()``). Eager calls, one per batch, like torch's; ``model.predict`` would
    trace a step, with XLA whenever a GPU is visible unless the model was compiled
    with ``jit_compile=False``."""
    return np.concatenate([model(x, training=False).numpy() for x, _ in batches])


def evaluate(model, batches, loss_fn, task, predict=predict):
    """(metrics, outputs) on one split of (x, y) `batches`: metrics as in metrics.json.
    (`predict`: this module's, or ``fast.predict``.)"""
    outputs = predict(model, batches)
    targets = np.concatenate([np.asarray(y) for _, y in batches])
    loss = float(loss_fn(targets, outputs))
    if task == "classification":
        return classification_metrics(outputs, targets, loss), outputs
    return regression_metrics(outputs, targets, loss), outputs


# -- model.fit: the epoch hook ----------------------------------------------------------------
class TrainingRunCallback(keras.callbacks.Callback):
    """Connects ``model.fit`` to ``common.runner.TrainingRun``: the epoch start (dropout
    seeds, timer) and the epoch end (summary line, best epoch, checkpoint, --early-stop).
    Keras counts epochs from 0, the shared history from 1. (Keras's ``EarlyStopping``
    would keep the last epoch's weights: ``restore_best_weights=False`` by default.)"""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch, logs=None):
        self.run.start_epoch(epoch + 1)

    def on_epoch_end(self, epoch, logs=None):
        metric = self.run.metric
        train = {"loss": float(logs["loss"]), metric: float(logs[metric])}
        val = {"loss": float(logs["val_loss"]), metric: float(logs[f"val_{metric}"])}
        self.run.end_epoch(epoch + 1, train, val)
        self.model.stop_training = self.run.should_stop


# -- checkpoints ------------------------------------------------------------------------
def save_checkpoint(path, model, optimizer):
    """Model and optimizer (weights, Adam's moments and step count) as a
    ``tf.train.Checkpoint``: files ``<path>.index`` and ``<path>.data-*``."""
    tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(path))


def load_checkpoint(path, model, optimizer=None):
    """Restore a save_checkpoint prefix into `model` (and `optimizer`, built by
    ``make_optimizer``)."""
    objects = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    try:
        status = tf.train.Checkpoint(**objects).read(str(path))
        status.assert_existing_objects_matched()
        status.expect_partial()  # model only: the optimizer's values stay unread
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
        raise WeightsError(f"checkpoint {path} cannot be loaded ({str(exc).splitlines()[0]}); "
                           f"start the run again without --resume") from None
