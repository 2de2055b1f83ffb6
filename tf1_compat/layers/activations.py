"""TF1-style activations that take torch's arguments, where ``tf.nn``'s defaults differ
(twins of ``nn.GELU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.Softplus``; ``tf.nn.silu`` is
already torch's SiLU). No variables."""
import tensorflow as tf


def gelu(x, approximate="none"):
    """torch's GELU: exact (erf) by default, approximate="tanh" for the tanh formula; the
    same as ``tf.nn.gelu(x, approximate=False/True)``."""
    return tf.nn.gelu(x, approximate=approximate == "tanh")


def leaky_relu(x, negative_slope=0.01):
    """torch's LeakyReLU: slope 0.01 below zero (``tf.nn.leaky_relu``'s default is 0.2, Keras
    3's LeakyReLU layer's 0.3)."""
    return tf.nn.leaky_relu(x, alpha=negative_slope)


def elu(x, alpha=1.0):
    """torch's ELU: x above zero, alpha (exp(x) - 1) below (``tf.nn.elu`` has alpha 1 only)."""
    return tf.where(x > 0, x, alpha * tf.math.expm1(tf.minimum(x, 0)))


def softplus(x, beta=1.0, threshold=20.0):
    """torch's Softplus: log(1 + exp(beta x)) / beta, and x itself where beta x > threshold
    (``tf.nn.softplus`` has neither argument)."""
    return tf.where(beta * x > threshold, x, tf.nn.softplus(beta * x) / beta)
