"""Activations whose defaults differ, Dropout and Flatten: torch vs Keras 3 vs TF1 (the TF1
twins with torch's arguments are ``tf1_compat/layers/activations.py``'s gelu, leaky_relu, elu,
softplus). No weights, so no converters: parity is of outputs and input gradients, float64,
tolerance 1e-10 relative to the largest entry, and the pitfalls show which defaults differ.
Two exceptions, tolerance 1e-8: TF's gelu and leaky_relu (so Keras's too) round constants
to float32 even in float64 (gelu's tf.cast of a Python 0.7071..., leaky_relu's float32 alpha
attribute), 5e-9 from the exact values; and Keras's softplus has no threshold, so past
torch's (x itself where beta x > 20) it differs by up to exp(-20) = 2e-9.

Measured here (torch 2.15, Keras 3.15, TF 2.21): GELU is exact (erf) by default everywhere
(torch approximate='none', keras.activations.gelu approximate=False, tf.nn.gelu
approximate=False); LeakyReLU's slope is 0.01 in torch, 0.3 in Keras's layer, 0.2 in
keras.activations.leaky_relu and tf.nn.leaky_relu; ELU's alpha is 1 in torch and Keras,
tf.nn.elu has none; Softplus's beta and threshold have no Keras or tf.nn argument.
Dropout's p-vs-keep_prob and train/eval pitfalls, and the flatten order, are in
test_pitfalls.py; here one short parity test each.
"""
from functools import partial

import numpy as np
import pytest
import torch
import tensorflow as tf
import keras

from common import layout
from common.converters.core import linear_weight_to_keras
from parity_tests.test_layers_norm import F64, close, differs, floats, run_keras, run_tf1, run_torch
from tf1_compat import models as tf1_models
from tf1_compat.layers import activations as tf1_layers

tf1 = tf.compat.v1
act = keras.activations
ACTIVATIONS = {  # name: (torch module, Keras layer, TF1 function)
    "gelu": (torch.nn.GELU, lambda: keras.layers.Activation("gelu", **F64), tf1_layers.gelu),
    "gelu-tanh": (partial(torch.nn.GELU, approximate="tanh"),
                  lambda: keras.layers.Activation(partial(act.gelu, approximate=True), **F64),
                  partial(tf1_layers.gelu, approximate="tanh")),
    "leaky_relu": (torch.nn.LeakyReLU, lambda: keras.layers.LeakyReLU(negative_slope=0.01, **F64),
                   tf1_layers.leaky_relu),
    "elu": (torch.nn.ELU, lambda: keras.layers.ELU(**F64), tf1_layers.elu),
    "elu-alpha_0.5": (partial(torch.nn.ELU, 0.5), lambda: keras.layers.ELU(alpha=0.5, **F64),
                      partial(tf1_layers.elu, alpha=0.5)),
    "silu": (torch.nn.SiLU, lambda: keras.layers.Activation("silu", **F64), tf.nn.silu),
    "softplus": (torch.nn.Softplus, lambda: keras.layers.Activation("softplus", **F64),
                 tf1_layers.softplus),
    "softplus-beta_2": (partial(torch.nn.Softplus, beta=2.0),
                        lambda: keras.layers.Activation(lambda x: act.softplus(2 * x) / 2, **F64),
                        partial(tf1_layers.softplus, beta=2.0)),
}


LOOSE = 1e-8  # the tolerance of TF's gelu and leaky_relu, and of Keras's softplus


def inputs():
    """float64 values, none at 0 (the kinks), four past softplus's threshold at beta 2."""
    x = floats(4, 25, scale=4.0)
    x[0, :4] = (-11.5, 10.25, 11.5, 15.0)
    return np.where(np.abs(x) < 1e-3, 0.5, x)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_parity_torch_keras_tf1(name):
    """Forward and input gradient agree when the arguments are matched."""
    make_torch, make_keras, tf1_fn = ACTIVATIONS[name]
    x = inputs()
    module, layer = make_torch(), make_keras()
    tol = LOOSE if name.startswith(("gelu", "leaky", "softplus")) else 1e-10
    t_out, (t_grad,), _, g = run_torch(module, module, [x])
    for out, (grad,), _ in (run_keras(layer, layer, [x], g), run_tf1(tf1_fn, [x], g, {})):
        close(out, t_out, tol)
        close(grad, t_grad, tol)


def _torch(module, x):
    return module(torch.tensor(x)).numpy()


def test_pitfall_gelu_tanh_approximation():
    """Documents torch/Keras/TF behaviour: the defaults agree (exact erf GELU); the tanh
    approximation differs from it by more than 1e-4 (at most 5e-4), so approximate='tanh'
    in torch needs approximate=True in Keras and tf.nn (tf1_layers.gelu takes torch's
    argument)."""
    x = inputs()
    exact = _torch(torch.nn.GELU(), x)
    close(act.gelu(x).numpy(), exact, LOOSE)
    close(tf.nn.gelu(x).numpy(), exact, LOOSE)
    tanh = act.gelu(x, approximate=True).numpy()
    assert 1e-4 < np.abs(tanh - exact).max() < 5e-4
    close(tanh, _torch(torch.nn.GELU(approximate="tanh"), x), LOOSE)
    tf1_tanh = run_tf1(partial(tf1_layers.gelu, approximate="tanh"), [x], np.ones_like(x), {})[0]
    close(tf1_tanh, tanh, LOOSE)


def test_pitfall_leaky_relu_slope_defaults():
    """torch's LeakyReLU slope is 0.01; Keras 3's LeakyReLU layer defaults to 0.3,
    keras.activations.leaky_relu and tf.nn.leaky_relu to 0.2: each differs on negative
    inputs by more than 0.1. negative_slope=0.01 (and tf1_layers.leaky_relu) agree."""
    x = inputs()
    expected = _torch(torch.nn.LeakyReLU(), x)
    for wrong in (keras.layers.LeakyReLU(**F64)(x), act.leaky_relu(x), tf.nn.leaky_relu(x)):
        assert differs(wrong.numpy(), expected, 0.1)
    for right in (keras.layers.LeakyReLU(negative_slope=0.01, **F64)(x).numpy(),
                  act.leaky_relu(x, negative_slope=0.01).numpy(),
                  run_tf1(tf1_layers.leaky_relu, [x], np.ones_like(x), {})[0]):
        close(right, expected, LOOSE)


def test_pitfall_elu_alpha_tf_nn_elu_has_none():
    """ELU's alpha is 1 by default in torch and Keras, but tf.nn.elu (the TF1 idiom) has no
    alpha: torch's ELU(alpha=0.5) differs from it by more than 0.1 on negative inputs;
    Keras's ELU(alpha=0.5) and tf1_layers.elu(alpha=0.5) agree."""
    x = inputs()
    expected = _torch(torch.nn.ELU(alpha=0.5), x)
    assert differs(tf.nn.elu(x).numpy(), expected, 0.1)
    close(keras.layers.ELU(alpha=0.5, **F64)(x).numpy(), expected)
    close(run_tf1(partial(tf1_layers.elu, alpha=0.5), [x], np.ones_like(x), {})[0], expected)


def test_pitfall_softplus_beta_and_threshold():
    """torch's Softplus(beta, threshold) has no Keras or tf.nn arguments: beta=2 differs from
    the plain softplus by more than 0.1; softplus(beta x) / beta agrees. The threshold (x
    itself where beta x > 20) differs from the exact formula by less than exp(-20) = 2e-9."""
    x = inputs()
    expected = _torch(torch.nn.Softplus(beta=2.0), x)
    assert differs(act.softplus(x).numpy(), expected, 0.1)
    close((act.softplus(2 * x) / 2).numpy(), expected, LOOSE)
    close(run_tf1(partial(tf1_layers.softplus, beta=2.0), [x], np.ones_like(x), {})[0], expected)
    exact = np.log1p(np.exp(2 * x)) / 2
    assert 0 < np.abs(exact - expected).max() < 2.1e-9


def test_dropout_parity_eval_identity_train_scaling():
    """torch p = Keras rate = TF1 rate (tf1_compat.models.dropout): identity in eval mode;
    in training each drops a fraction p and scales survivors by 1/(1-p), and the input
    gradient is that mask over (1-p). See test_pitfall_dropout_rate_vs_keep_prob and
    test_pitfall_train_eval_mode_batchnorm_dropout."""
    p, x = 0.3, np.abs(floats(100, 200)) + 0.5
    module, layer = torch.nn.Dropout(p), keras.layers.Dropout(p, **F64)

    def tf1_dropout(training):
        def build(t):
            tf1.train.get_or_create_global_step()
            return tf1_models.dropout(t, p, tf.constant(training))
        return build
    close(_torch(module.eval(), x), x)
    close(layer(x, training=False).numpy(), x)
    close(run_tf1(tf1_dropout(False), [x], np.ones_like(x), {"global_step": 0})[0], x)
    module.train()
    t_out, t_grads, _, g = run_torch(module, module, [x])
    for out, (grad,), _ in ((t_out, t_grads, None),
                            run_keras(layer, lambda t: layer(t, training=True), [x], g),
                            run_tf1(tf1_dropout(True), [x], g, {"global_step": 0})):
        assert np.mean(out == 0) == pytest.approx(p, abs=0.02)
        close(out[out != 0], x[out != 0] / (1 - p))
        close(grad, g * (out != 0) / (1 - p))


def test_flatten_parity_then_dense():
    """torch flattens NCHW in (C, H, W) order; Keras's Flatten gives (H, W, C) order, even with
    data_format='channels_first' on NCHW input (it moves channels last first: documents
    Keras behaviour), and so does TF1's tf.reshape of NHWC. The dense layer after it needs
    the flatten order, linear_weight_to_keras(weight, (C, H, W)) (common.converters.core;
    test_pitfall_flatten_order_first_dense_after_conv)."""
    x = floats(2, 3, 4, 5)
    fc = torch.nn.Linear(60, 7).double()
    expected = fc(torch.nn.Flatten()(torch.tensor(x))).detach().numpy()
    kernel = linear_weight_to_keras(fc.weight.detach().numpy(), (3, 4, 5))
    bias = fc.bias.detach().numpy()
    nhwc = layout.nchw_to_nhwc(x)
    close(keras.layers.Flatten(**F64)(nhwc).numpy() @ kernel + bias, expected)
    close(keras.layers.Flatten(data_format="channels_first", **F64)(x).numpy() @ kernel + bias, expected)
    close(run_tf1(lambda t: tf.reshape(t, (2, -1)) @ kernel + bias, [nhwc], 1.0, {})[0], expected)
