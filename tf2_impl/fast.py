"""Every speed variant of the TensorFlow 2 / Keras 3 implementation, used with ``--fast``.

Each function has the name of the plain one it replaces (``models.build_cnn``,
``train.make_batches``, ``train.make_fit_batches``, ``train.train_one_epoch``,
``train.predict`` / ``train.evaluate``), so an entry point reads
``build = fast.build_cnn if args.fast else build_cnn``. Each computes the same function
as the plain code: ``parity_tests/test_fast_tf2.py`` checks outputs, gradients, an Adam
step and the moving statistics from the same weights, the batches, and the numbers an
epoch and an evaluation report. Twins: ``torch_impl/fast.py`` and ``tf1_compat/fast.py``.

Gains below: measured on this project's machine (2 cores of an Intel Xeon with AVX-512,
shared with other jobs; TF 2.21, Keras 3.15.1, no GPU) as the speed-up of a training
epoch plus validation (1,000 random 32x32x3 images, or 8x8x1 like digits, batches of
100) when the variant joins the ones above it in this file, epochs of the variants
alternated, best and median of 7-9 epochs in two or three runs; the other jobs' load
makes the ranges wide. All together: the GradientTape loop 2.0-3.5x (32x32x3) and
2.9-3.2x (8x8x1), ``model.fit`` 1.5-2.1x (32x32x3). Measured without gain, so left out:
pool before ReLU (1.00x; torch and TF1 gain from it).
"""
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from tqdm import tqdm

from common.datasets import batch_indices
from common.recipes import augment_batch
from tf2_impl import models, train


class FusedBatchNormalization(layers.BatchNormalization):
    """``layers.BatchNormalization`` whose training step on NHWC images is one fused kernel.

    What: while training on 4-D NHWC inputs, the layer calls TensorFlow's fused batch-norm
    kernel (``tf.compat.v1.nn.fused_batch_norm``, the one ``tf1_compat`` uses; TF2 has no
    other public wrapper for it) instead of Keras 3's separate moments, scale and shift
    ops. Variables, their names, weights files and inference are the Keras layer's.
    Why faster: Keras 2 used this kernel by default (``fused=True``); Keras 3 dropped it on
    every backend, and the unfused graph reads and writes each activation several times
    forward and backward. Gain: 1.25-1.95x on 32x32x3 (fit 1.4-2.0x), 1.0-1.3x on 8x8x1.
    The moving averages follow Keras's convention, not torch's: the kernel hands back the
    unbiased batch variance (times n/(n-1), n = N*H*W), so it is scaled back to the biased
    one that ``layers.BatchNormalization`` averages in.
    Synchronised (``--sync-bn``): Keras's path, which all-reduces the moments over the
    replicas; the kernel would normalise with this replica's rows only.
    """

    def call(self, inputs, training=None, mask=None):
        nhwc = len(inputs.shape) == 4 and self.axis in (-1, 3)
        if self.synchronized or not (training and self.trainable and nhwc and mask is None):
            return super().call(inputs, training=training, mask=mask)
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
        # float32 like the statistics the kernel returns, also for bf16/fp16 inputs
        n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], unbiased.dtype)
        variance = unbiased * ((n - 1.0) / n)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return y


def build_cnn(input_shape, num_classes, api="subclassing", sync_bn=False):
    """``models.build_cnn`` with ``FusedBatchNormalization`` for each batch norm.

    The plain model is built, then each ``BatchNormalization`` layer becomes the fused
    subclass in place (it adds no state: same variables, same config), so all three
    APIs get it without a second copy of their code."""
    model = models.build_cnn(input_shape, num_classes, api, sync_bn)
    for layer in model.layers:
        if type(layer) is layers.BatchNormalization:
            layer.__class__ = FusedBatchNormalization
    return model


_TENSORS = {}  # id(array) -> (a weak reference to the array, the array as a tensor)


def _as_tensor(array):
    """`array` as a tensor, converted on the first call only (until the array is freed)."""
    ref, tensor = _TENSORS.get(id(array), (None, None))
    if ref is None or ref() is not array:
        tensor = tf.identity(array)  # an op: it runs on, and leaves `array` on, the GPU if any
        ref = weakref.ref(array, lambda _, key=id(array): _TENSORS.pop(key, None))
        _TENSORS[id(array)] = ref, tensor
    return tensor


class TensorBatches:
    """(x, y) batches gathered from whole-split tensors, one ``tf.gather`` per batch;
    `augment(batch number, images)` (numpy) replaces the gather of x when given."""

    def __init__(self, x, y, index_batches, augment=None):
        self.x, self.y, self.index_batches = _as_tensor(x), _as_tensor(y), index_batches
        self.images, self.augment = x, augment

    def __len__(self):
        return len(self.index_batches)

    def __iter__(self):
        for b, index in enumerate(self.index_batches):
            x = tf.gather(self.x, index) if self.augment is None else \
                tf.constant(self.augment(b, self.images[index]))
            yield x, tf.gather(self.y, index)


def make_batches(x, y, batch_size, seed=None, epoch=1, augment=False, flip=False):
    """``train.make_batches``: the same batches, gathered from tensors converted once.

    Why faster: the plain ``tf.data`` feed copies the shuffled split into a new dataset
    each epoch, slices it sample by sample and costs a millisecond or more per batch to
    iterate in Python; here each split is converted once, and a batch is one eager
    ``tf.gather`` (on the GPU when there is one: torch's fast feed does the same).
    Gain: 1.1-1.6x on 32x32x3, 1.35-1.7x on 8x8x1. --augment's crops are numpy
    (``common.recipes.augment_batch``): those batches are gathered in numpy.
    """
    shuffle = seed is not None
    index_batches = batch_indices(len(x), batch_size, seed, epoch, shuffle=shuffle)
    crop = (lambda b, images: augment_batch(images, seed, epoch, b, flip)) if augment else None
    return TensorBatches(x, y, index_batches, crop)


def make_fit_batches(x, y, batch_size, seed, initial_epoch, augment=False, flip=False):
    """``train.make_fit_batches``: the same endless feed for ``model.fit`` as a ``tf.data``
    pipeline. Each epoch's order is drawn by ``batch_indices`` (a ``numpy_function``),
    and its batches are gathered in the pipeline.

    Why faster: the plain ``PyDataset`` runs Python for every batch, through
    ``tf.data.Dataset.from_generator``, holding the interpreter lock the training step's
    Python also needs; here only one call per epoch runs Python. Gain: 1.0-1.4x on
    32x32x3, 1.2-1.3x on 8x8x1. --augment: each batch's crops are one more
    ``numpy_function`` (``common.recipes.augment_batch``), told its epoch and batch number.
    """
    n, shape = len(x), x.shape[1:]

    def order(epoch):
        return np.concatenate(batch_indices(n, batch_size, seed, int(epoch)))

    def crop(images, epoch, b):
        return augment_batch(images, seed, int(epoch), int(b), flip)

    def epoch_batches(epoch):
        index = tf.ensure_shape(tf.numpy_function(order, [epoch], tf.int64), [n])
        return tf.data.Dataset.zip(tf.data.Dataset.from_tensors(epoch).repeat(),
                                   tf.data.Dataset.counter(),
                                   tf.data.Dataset.from_tensor_slices(index).batch(batch_size))

    def gather(epoch, b, index):
        images = tf.gather(x, index)
        if augment:
            images = tf.ensure_shape(tf.numpy_function(crop, [images, epoch, b], images.dtype),
                                     [None, *shape])
        return images, tf.gather(y, index)

    with tf.device("/CPU:0"):  # tf.data runs on the host; fit copies each batch to the GPU
        x, y = tf.constant(x), tf.constant(y)
    return (tf.data.Dataset.counter(initial_epoch + 1).flat_map(epoch_batches)
            .map(gather).prefetch(tf.data.AUTOTUNE))


_STEPS = weakref.WeakKeyDictionary()  # train_step -> (step with metric updates, its metrics)


def train_one_epoch(train_step, batches, task):
    """``train.train_one_epoch`` with the metric updates traced into the training step.

    Why faster: the plain loop updates the loss mean and the metric eagerly after each
    step, a dozen small ops dispatched one by one from Python per batch; here they run
    inside the step's graph (where Keras's own guide to custom loops puts them).
    Gain: 1.1-1.25x on 32x32x3, 1.35x on 8x8x1.
    """
    if train_step not in _STEPS:
        mean_loss, metric = keras.metrics.Mean(name="loss"), train.make_metric(task)

        @tf.function
        def step(x, y):
            loss, outputs = train_step(x, y)
            mean_loss.update_state(loss, sample_weight=tf.shape(x)[0])
            metric.update_state(y, outputs)

        _STEPS[train_step] = step, mean_loss, metric
    step, mean_loss, metric = _STEPS[train_step]
    mean_loss.reset_state()
    metric.reset_state()
    for x, y in tqdm(batches, desc="train", leave=False):
        step(x, y)
    return {"loss": float(mean_loss.result()), metric.name: float(metric.result())}


_PREDICT = weakref.WeakKeyDictionary()  # model -> its traced inference step


def predict(model, batches):
    """``train.predict`` through a traced inference step, one per model.

    Why faster: an eager Keras call dispatches each layer's ops from Python, about three
    times the work of the graph for a CIFAR-shaped batch of 100. Gain (validation being
    a fifth of the training set): 1.07-1.10x on 32x32x3, 1.3x on 8x8x1.
    """
    if model not in _PREDICT:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        _PREDICT[model] = tf.function(lambda x: ref()(x, training=False))
    return np.concatenate([_PREDICT[model](x).numpy() for x, _ in batches])


def evaluate(model, batches, loss_fn, task):
    """``train.evaluate`` with the traced ``predict`` above."""
    return train.evaluate(model, batches, loss_fn, task, predict=predict)
