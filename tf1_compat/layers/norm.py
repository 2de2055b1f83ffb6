"""TF1-style batch, layer and group normalisation: ``get_variable`` plus ``tf.nn.moments``.

Channels last, as Keras: x is (N, ..., C). Variables are named as the Keras layers' (``gamma``,
``beta``, ``moving_mean``, ``moving_variance``) in one ``variable_scope`` per layer and take
x's dtype, so ``common.converters.core`` fills them and float64 graphs work. The defaults are
torch's (eps 1e-5, momentum 0.1 on the new value), not Keras's (1e-3, 0.99 on the old one).

Build inside ``with tf.Graph().as_default():`` and run in a ``tf.compat.v1.Session()``.
"""
import tensorflow as tf

from common import config
from tf1_compat.models import update_moving_averages

tf1 = tf.compat.v1


def _affine_variables(shape, dtype, scale, center):
    """gamma (ones) and beta (zeros) of `shape`, or None where the layer has none."""
    gamma = (tf1.get_variable("gamma", shape, dtype, initializer=tf1.ones_initializer())
             if scale else None)
    beta = (tf1.get_variable("beta", shape, dtype, initializer=tf1.zeros_initializer())
            if center else None)
    return gamma, beta


def batch_norm(x, training, name, eps=config.BN_EPS, affine=True):
    """x (N, C) or (N, ..., C) -> same shape: torch's BatchNorm1d/2d on channels-last input.

    `training` (a bool tensor): normalise with the batch mean and biased variance, and queue
    updates of the moving statistics in ``UPDATE_OPS`` (``tf1_compat.models.update_moving_
    averages``: momentum 0.1 on the new value, the variance unbiased as torch stores it);
    otherwise normalise with the moving statistics. Variables gamma, beta (if `affine`),
    moving_mean, moving_variance, each (C,).
    """
    with tf1.variable_scope(name):
        c = [x.shape[-1]]
        gamma, beta = _affine_variables(c, x.dtype, affine, affine)
        moving_mean = tf1.get_variable("moving_mean", c, x.dtype, trainable=False,
                                       initializer=tf1.zeros_initializer())
        moving_variance = tf1.get_variable("moving_variance", c, x.dtype, trainable=False,
                                           initializer=tf1.ones_initializer())

        def batch_statistics():
            mean, variance = tf.nn.moments(x, axes=list(range(x.shape.rank - 1)))
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
            return mean, variance, variance * n / (n - 1)

        def moving_statistics():
            return (tf.identity(moving_mean), tf.identity(moving_variance),
                    tf.identity(moving_variance))

        mean, variance, unbiased = tf.cond(training, batch_statistics, moving_statistics)
        update_moving_averages(moving_mean, moving_variance, mean, unbiased)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, eps)


def layer_norm(x, name, normalized_dims=1, eps=1e-5, scale=True, center=True):
    """x (N, ..., D1..Dk) -> same shape, normalised over its last k = `normalized_dims` dims
    (torch's ``normalized_shape``, Keras's ``axis=(-k, ..., -1)``) with the biased variance.
    Variables gamma (if `scale`), beta (if `center`), each (D1..Dk): torch's
    ``elementwise_affine`` and ``bias``."""
    with tf1.variable_scope(name):
        shape = x.shape[-normalized_dims:]
        gamma, beta = _affine_variables(shape, x.dtype, scale, center)
        mean, variance = tf.nn.moments(x, axes=list(range(-normalized_dims, 0)), keepdims=True)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, eps)


def group_norm(x, groups, name, eps=1e-5, affine=True):
    """x (N, ..., C) -> same shape: C split into `groups` contiguous groups (channels 0..C/G-1
    form group 0, as in torch's NCHW GroupNorm), each normalised over its channels and all
    positions of one sample. Variables gamma, beta (if `affine`), each (C,)."""
    with tf1.variable_scope(name):
        c = x.shape[-1]
        gamma, beta = _affine_variables([c], x.dtype, affine, affine)
        grouped_shape = tf.concat([tf.shape(x)[:-1], [groups, c // groups]], axis=0)
        grouped = tf.reshape(x, grouped_shape)
        axes = list(range(1, x.shape.rank - 1)) + [x.shape.rank]  # positions and channels
        mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
        y = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + eps), tf.shape(x))
        if gamma is not None:
            y = y * gamma + beta
        return y
