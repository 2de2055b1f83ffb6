"""The training recipes (``common.recipes``) in TF1-style graph code: ops on the global step,
a learning-rate variable, an AdamW optimizer and the float32-storage custom getter.

Twins: ``torch_impl/train.py`` (``make_scheduler``, ``AdamW``, ``clip_grad_norm_``,
``autocast``) and ``tf2_impl/recipes.py``. ``common.recipes`` states each rule and holds
the reference the parity tests compare with (``epoch_lr``);
``parity_tests/test_recipes_tf1.py`` holds this file to it and to torch. What the others
do with a scheduler object or a callback is here a tensor in the graph: the step and cosine
schedules are functions of the global step, which ``make_train_step`` increments and the
Saver saves, so ``--resume`` continues them; the plateau rule is a variable assigned at
each epoch's start from the validation losses so far. The rest of the recipes are in
``tf1_compat/train.py``: ``make_batches`` (``--augment``), ``make_loss``
(``--label-smoothing``), ``make_optimizer`` (``--weight-decay``, loss scaling) and
``make_train_step`` (``--clip-grad-norm``).
"""
import contextlib
import functools
import math

import tensorflow as tf

from common import recipes

tf1 = tf.compat.v1

# --mixed-precision -> the dtype the layers compute in; variables are float32 in every case.
COMPUTE_DTYPES = {"off": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


# -- learning rate -------------------------------------------------------------------------
class LearningRate:
    """The --lr-schedule rate as a tensor for the optimizer (build it with the graph), and
    ``start_epoch``, what the runner records at each epoch's start.

    step: ``exponential_decay(staircase=True)`` over ``lr_step`` epochs of optimizer steps;
    cosine: ``cosine_decay``'s formula over all the run's steps. Both read the global step,
    so they decay only because ``minimize``/``apply_gradients`` get ``global_step=``
    (without it the rate never moves: a TF1 pitfall). plateau: a variable, assigned
    between epochs.

    In float64 (Adam casts the rate to its float32 variables itself): in float32 the stock
    ``cosine_decay`` came out one float32 step from ``common.recipes.epoch_lr``
    (0.0007938927 against 0.0007938926 recorded in epoch 4 of 10, 4 steps an epoch).
    """

    def __init__(self, args, steps_per_epoch):
        self.args, self._assign = args, None
        step = tf1.train.get_or_create_global_step()
        with tf.name_scope("learning_rate"):
            lr = tf.constant(args.lr, tf.float64)
            if args.lr_schedule == "step":
                self.tensor = tf1.train.exponential_decay(
                    lr, step, args.lr_step * steps_per_epoch, args.lr_gamma, staircase=True)
            elif args.lr_schedule == "cosine":
                # cosine_decay by hand: the stock op multiplies by a float32 pi, a TypeError
                # with a float64 rate in TF 2.21.
                done = tf.minimum(tf.cast(step, tf.float64) / (args.epochs * steps_per_epoch), 1.0)
                self.tensor = 0.5 * lr * (1 + tf.cos(math.pi * done))
            elif args.lr_schedule == "plateau":
                self.tensor = tf1.Variable(lr, trainable=False, name="plateau")
                self._value = tf1.placeholder(tf.float64, [], name="value")
                self._assign = tf1.assign(self.tensor, self._value)
            else:
                self.tensor = lr

    def start_epoch(self, sess, val_losses):
        """The rate of the epoch's first step. plateau: first assigned from the validation
        losses of the epochs before (``common.recipes.plateau_lr``), from the history after
        a --resume too, so its count of bad epochs needs no state of its own."""
        if self._assign is not None:
            args = self.args
            sess.run(self._assign, {self._value: recipes.plateau_lr(
                args.lr, val_losses, args.plateau_patience, args.plateau_factor,
                args.plateau_threshold)})
        return float(sess.run(self.tensor))


# -- weight decay --------------------------------------------------------------------------
class AdamWOptimizer(tf1.train.AdamOptimizer):
    """Adam with decoupled weight decay: ``w -= lr * weight_decay * w`` on every variable
    that has a gradient, after the gradients are computed and before Adam's update, as
    torch's ``AdamW`` and Keras's ``AdamW`` do.

    TF1 had this as ``tf.contrib.opt.AdamWOptimizer``, gone with contrib; unlike this one it
    decayed by ``weight_decay * w`` alone (its users scaled weight_decay with the schedule
    themselves). Here the decay follows the learning rate, schedule included, as in torch.
    """

    def __init__(self, weight_decay, learning_rate, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self._weight_decay, self._decay_rate = weight_decay, learning_rate

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        # The gradients were computed from the weights before the decay: run them first.
        with tf.control_dependencies([g for g, _ in grads_and_vars]):
            decay = [tf1.assign_sub(v, tf.cast(self._decay_rate, v.dtype.base_dtype)
                                    * self._weight_decay * v) for _, v in grads_and_vars]
        with tf.control_dependencies(decay):
            return super().apply_gradients(grads_and_vars, global_step, name)


# -- gradient clipping ---------------------------------------------------------------------
def clip_gradients(grads_and_vars, max_norm):
    """--clip-grad-norm: scale all gradients by max_norm / global_norm when the global norm
    is larger (``clip_by_global_norm``, torch's ``clip_grad_norm_``, Keras's
    ``global_clipnorm``; torch divides by norm + 1e-6). None: unchanged."""
    if max_norm is None:
        return grads_and_vars
    grads, variables = zip(*grads_and_vars)
    clipped, _ = tf.clip_by_global_norm(grads, max_norm)
    return list(zip(clipped, variables))


# -- mixed precision -----------------------------------------------------------------------
def float32_storage(getter, *args, dtype=tf.float32, **kwargs):
    """The classic mixed-precision custom getter: a layer that asks ``get_variable`` for a
    bfloat16 or float16 variable gets a float32 one (Adam's small updates would round away
    in 16 bits) read through a cast to the dtype it asked for; other requests pass."""
    if dtype not in (tf.bfloat16, tf.float16):
        return getter(*args, dtype=dtype, **kwargs)
    return tf.cast(getter(*args, dtype=tf.float32, **kwargs), dtype)


def in_float32(layer):
    """`layer(x, ...)` computed on x cast to float32, its output cast back to x's dtype
    (no op when x is float32): batch norm under mixed precision, as Keras's
    BatchNormalization does (torch's kernels accumulate in float32 too): a variance summed
    with bfloat16's 8 significant bits is noise."""
    @functools.wraps(layer)
    def float32_layer(x, *args, **kwargs):
        return tf.cast(layer(tf.cast(x, tf.float32), *args, **kwargs), x.dtype)
    return float32_layer


@contextlib.contextmanager
def float32_variables():
    """The current variable scope again (variable names unchanged) with ``float32_storage``."""
    with tf1.variable_scope(tf1.get_variable_scope(), custom_getter=float32_storage):
        yield


def scale_loss(optimizer, precision):
    """fp16: the optimizer wrapped in TF1's dynamic ``MixedPrecisionLossScaleOptimizer``
    (the loss is multiplied before the gradients and they are divided after, so that small
    float16 gradients do not flush to zero; a step whose gradients overflow is skipped,
    the global step too, and the scale halves). bf16 has float32's range: unchanged."""
    if precision != "fp16":
        return optimizer
    return tf1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimizer, "dynamic")
