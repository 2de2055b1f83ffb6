"""Linear and the normalisations in three frameworks through ``common.converters.core``: torch
``nn.Linear``/``BatchNorm1d``/``BatchNorm2d``/``LayerNorm``/``GroupNorm``, the Keras 3 layers and
this project's TF1 graphs (``tf1_compat/layers/``), with the same weights and inputs.

Each parity case compares the outputs and the gradients of sum(outputs * fixed random weights)
with respect to the inputs and every weight (Keras's and TF1's weight gradients taken to
torch's layout through the converter's ``to_torch``). All float64: tolerance 1e-10 relative to
the largest entry, 1e-6 for batch norm, whose conversion (``core.batch_norm_to_keras``) stores
float32 (the weights here are float32 values, so only the gradients round). Also the round
trips, the refused configurations and the pitfalls. The helpers serve the other
test_layers_*.py files of this family too.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import tensorflow as tf
import keras

from common.converters import core
from common.converters.base import lookup, register
from tf1_compat.layers import attention as tf1_layers, norm as tf1_norm

tf1 = tf.compat.v1
RNG = np.random.default_rng(17)
F64 = {"dtype": "float64"}
SCOPE = "layer"
TOL = 1e-10


# -- helpers shared by test_layers_{norm,attention,activations}.py -----------------------------
def floats(*shape, scale=1.0):
    """Random float64 values that float32 holds exactly (a float32 conversion loses nothing)."""
    return (RNG.normal(size=shape) * scale).astype(np.float32).astype(np.float64)


def torch_config(module):
    """The converter's torch_config: public attributes, plus the constructor flags that torch
    keeps as parameters or None (bias; add_bias_kv of MultiheadAttention)."""
    config = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    for name, flag in (("bias", "bias"), ("in_proj_bias", "bias"), ("bias_k", "add_bias_kv")):
        if hasattr(module, name):
            config[flag] = getattr(module, name) is not None
    return config


def randomise(module):
    """Every float parameter and buffer random (variances positive), float64; returns it."""
    module.double()
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                value = floats(*t.shape, scale=0.5)
                if name.endswith("var"):
                    value = (1 + np.abs(value)).astype(np.float32)
                t.copy_(torch.tensor(value))
    return module


def state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def close(actual, expected, tol=TOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    assert np.abs(actual - expected).max(initial=0) <= tol * scale, \
        f"max |diff| {np.abs(actual - expected).max():.3g} > {tol:g} * {scale:.3g}"


def differs(a, b, atol):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) > atol


def _is_float(a):
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def run_torch(module, call, inputs):
    """Outputs, gradients of sum(out * g) w.r.t. the float inputs, {parameter: gradient} and
    g (random, of the outputs' shape)."""
    ts = [torch.tensor(a, requires_grad=_is_float(a)) for a in inputs]
    out = call(*ts)
    g = floats(*out.shape)
    (out * torch.tensor(g)).sum().backward()
    return (out.detach().numpy(), [t.grad.numpy() for t in ts if t.requires_grad],
            {n: p.grad.numpy() for n, p in module.named_parameters()}, g)


def run_keras(layer, call, inputs, g):
    """Like run_torch; weight gradients in get_weights() order, zeros where not trainable."""
    ts = [tf.constant(a) for a in inputs]
    watched = [t for t in ts if t.dtype.is_floating]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        out = call(*ts)
        loss = tf.reduce_sum(out * g)
    grads = tape.gradient(loss, watched + list(layer.weights))
    weight_grads = [np.zeros(w.shape) if gr is None else tf.convert_to_tensor(gr).numpy()
                    for w, gr in zip(layer.weights, grads[len(watched):])]
    return out.numpy(), [gr.numpy() for gr in grads[:len(watched)]], weight_grads


def run_tf1(build, inputs, g, values):
    """Build a TF1 graph on constant inputs, load `values` ({variable name: array}, in the
    Keras order) by name, and return what run_keras returns (in `values`' order)."""
    with tf.Graph().as_default():
        ts = [tf.constant(a) for a in inputs]
        out = build(*ts)
        watched = [t for t in ts if t.dtype.is_floating]
        trainable = {v.op.name: v for v in tf1.trainable_variables()}
        names = [n for n in values if n in trainable]
        grads = tf1.gradients(tf.reduce_sum(out * g), watched + [trainable[n] for n in names])
        with tf1.Session() as sess:
            assert sorted(v.op.name for v in tf1.global_variables()) == sorted(values)
            sess.run([v.assign(values[v.op.name]) for v in tf1.global_variables()])
            out, grads = sess.run([out, [tf.convert_to_tensor(gr) for gr in grads]])
    by_name = dict(zip(names, grads[len(watched):]))
    return out, grads[:len(watched)], [by_name.get(n, np.zeros(np.shape(values[n]))) for n in values]


def check_parity(module, layer, tf1_build, inputs, torch_call=None, keras_call=None,
                 to_keras=lambda a: a, from_keras=lambda a: a, tol=TOL):
    """Convert `module`'s weights into `layer` and TF1's variables through the registry; the
    three outputs and gradients agree within `tol`. `to_keras`/`from_keras` move float
    inputs and outputs between torch's layout and Keras's."""
    converter = lookup(type(module).__name__)
    assert lookup(type(layer).__name__) is converter
    k_inputs = [to_keras(a) if _is_float(a) else a for a in inputs]
    keras_call = keras_call or layer
    keras_call(*k_inputs)  # builds the layer
    t_config, k_config = torch_config(module), layer.get_config()
    weights = converter.to_keras(state(module), t_config, k_config)
    layer.set_weights(weights)
    names = [f"{SCOPE}/{w.path.split('/', 1)[1]}" for w in layer.weights]
    t_out, t_inputs, t_weights, g = run_torch(module, torch_call or module, inputs)
    for out, input_grads, weight_grads in (run_keras(layer, keras_call, k_inputs, to_keras(g)),
                                           run_tf1(tf1_build, k_inputs, to_keras(g),
                                                   dict(zip(names, weights)))):
        close(from_keras(out), t_out, tol)
        for grad, expected in zip(input_grads, t_inputs, strict=True):
            close(from_keras(grad), expected, tol)
        back = converter.to_torch(weight_grads, t_config, k_config)
        for name, expected in t_weights.items():
            close(back[name], expected, tol)


def check_round_trip(module, layer):
    """With `layer` built: to_torch(to_keras(state dict)) is the state dict (num_batches_tracked
    aside: Keras has none) and loads strictly; to_keras(to_torch(Keras weights)) is the Keras
    weights; the layer's weights come in the converter's keras_names order."""
    converter, t_config, k_config = lookup(type(module).__name__), torch_config(module), layer.get_config()
    names = [w.path.split("/", 1)[1] for w in layer.weights]
    assert names == [n for n in converter.keras_names if n in names]  # keras_names' order
    tensors = {k: v for k, v in state(module).items() if k != "num_batches_tracked"}
    back = converter.to_torch(converter.to_keras(tensors, t_config, k_config), t_config, k_config)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    keras_weights = [floats(*w.shape) for w in layer.weights]
    again = converter.to_keras(converter.to_torch(keras_weights, t_config, k_config), t_config, k_config)
    for a, b in zip(again, keras_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    module.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)


# -- the cases -----------------------------------------------------------------------------------
@dataclass
class Case:
    torch: Callable          # () -> nn.Module
    keras: Callable          # () -> Keras layer (float64)
    tf1: Callable            # x -> TF1 output, variables under SCOPE
    shape: tuple             # input shape, torch's layout
    channels_first: bool = False  # torch's (N, C, ...) is Keras's (N, ..., C)
    train: bool = False

    def to_keras(self, a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if self.channels_first else a

    def from_keras(self, a):
        return np.ascontiguousarray(np.moveaxis(a, -1, 1)) if self.channels_first else a


def _bn_case(torch_cls, shape, train, affine=True):
    return Case(lambda: torch_cls(shape[1], affine=affine),
                lambda: keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, center=affine,
                                                        scale=affine, **F64),
                lambda x: tf1_norm.batch_norm(x, tf.constant(train), SCOPE, affine=affine),
                shape, len(shape) > 2, train)


CASES = {
    "linear": Case(lambda: torch.nn.Linear(5, 3), lambda: keras.layers.Dense(3, **F64),
                   lambda x: tf1_layers.dense(x, 3, SCOPE), (4, 5)),
    "linear-no_bias-3d": Case(lambda: torch.nn.Linear(5, 3, bias=False),
                              lambda: keras.layers.Dense(3, use_bias=False, **F64),
                              lambda x: tf1_layers.dense(x, 3, SCOPE, use_bias=False), (2, 4, 5)),
    **{f"batch_norm_{name}-{mode}": _bn_case(cls, shape, mode == "train")
       for name, cls, shape in (("1d", torch.nn.BatchNorm1d, (6, 4)),
                                ("1d-ncl", torch.nn.BatchNorm1d, (3, 4, 5)),
                                ("2d", torch.nn.BatchNorm2d, (2, 3, 4, 5)))
       for mode in ("train", "eval")},
    "batch_norm_2d-no_affine-train": _bn_case(torch.nn.BatchNorm2d, (2, 3, 4, 5), True, False),
    "layer_norm": Case(lambda: torch.nn.LayerNorm(5),
                       lambda: keras.layers.LayerNormalization(epsilon=1e-5, **F64),
                       lambda x: tf1_norm.layer_norm(x, SCOPE), (3, 4, 5)),
    "layer_norm-2d_shape": Case(lambda: torch.nn.LayerNorm((4, 5)),
                                lambda: keras.layers.LayerNormalization(axis=(-2, -1),
                                                                        epsilon=1e-5, **F64),
                                lambda x: tf1_norm.layer_norm(x, SCOPE, 2), (3, 4, 5)),
    "layer_norm-no_bias": Case(lambda: torch.nn.LayerNorm(5, bias=False),
                               lambda: keras.layers.LayerNormalization(epsilon=1e-5, center=False,
                                                                       **F64),
                               lambda x: tf1_norm.layer_norm(x, SCOPE, center=False), (3, 5)),
    "layer_norm-no_affine": Case(lambda: torch.nn.LayerNorm(5, elementwise_affine=False),
                                 lambda: keras.layers.LayerNormalization(
                                     epsilon=1e-5, center=False, scale=False, **F64),
                                 lambda x: tf1_norm.layer_norm(x, SCOPE, scale=False,
                                                               center=False), (3, 5)),
    "group_norm": Case(lambda: torch.nn.GroupNorm(2, 4),
                       lambda: keras.layers.GroupNormalization(2, epsilon=1e-5, **F64),
                       lambda x: tf1_norm.group_norm(x, 2, SCOPE), (2, 4, 3, 5), True),
    "group_norm-no_affine-ncl": Case(
        lambda: torch.nn.GroupNorm(3, 6, affine=False),
        lambda: keras.layers.GroupNormalization(3, epsilon=1e-5, center=False, scale=False, **F64),
        lambda x: tf1_norm.group_norm(x, 3, SCOPE, affine=False), (2, 6, 4), True),
}


def build(case):
    """The case's torch module (random float64 weights, in its mode) and Keras layer."""
    return randomise(case.torch()).train(case.train), case.keras()


@pytest.mark.parametrize("name", CASES)
def test_linear_and_norm_parity_torch_keras_tf1(name):
    case = CASES[name]
    module, layer = build(case)
    check_parity(module, layer, case.tf1, [floats(*case.shape, scale=2.0) + 1.0],
                 keras_call=lambda x: layer(x, training=case.train), to_keras=case.to_keras,
                 from_keras=case.from_keras, tol=1e-6 if name.startswith("batch_norm") else TOL)


@pytest.mark.parametrize("name", CASES)
def test_linear_and_norm_round_trip_is_identity(name):
    case = CASES[name]
    module, layer = build(case)
    layer.build((None,) + case.to_keras(np.zeros(case.shape)).shape[1:])
    check_round_trip(module, layer)


def test_linear_norm_embedding_converters_registered():
    """lookup finds each converter by its torch and Keras class names; "Embedding", the name
    both frameworks use, is registered once (a second registration is refused)."""
    for converter in (core.LINEAR, core.BATCH_NORM, core.LAYER_NORM, core.GROUP_NORM):
        assert len(converter.keras_types) == 1 and converter.doc
        for name in converter.torch_types + converter.keras_types:
            assert lookup(name) is converter
    assert lookup("Embedding") is core.EMBEDDING and core.EMBEDDING.keras_types == ()
    with pytest.raises(ValueError, match="two converters for Embedding"):
        register(core.EMBEDDING)


def test_batch_norm_running_statistics_after_train_steps():
    """After two training steps, TF1's moving statistics (UPDATE_OPS) equal torch's running
    ones, variance unbiased; Keras keeps the biased batch variance
    (test_pitfall_biased_vs_unbiased_running_var), so only its mean agrees."""
    case = CASES["batch_norm_2d-train"]
    module, layer = build(case)
    batches = [floats(*case.shape, scale=2.0) + 1.0 for _ in range(2)]
    layer.build((None,) + case.to_keras(batches[0]).shape[1:])
    converter, t_config = lookup("BatchNorm2d"), torch_config(module)
    weights = converter.to_keras(state(module), t_config, layer.get_config())
    layer.set_weights(weights)
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float64, (None,) + case.to_keras(batches[0]).shape[1:])
        tf1_norm.batch_norm(x, tf.constant(True), SCOPE)
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        with tf1.Session() as sess:
            sess.run([v.assign(w) for v, w in zip(tf1.global_variables(), weights, strict=True)])
            for b in batches:
                sess.run(updates, {x: case.to_keras(b)})
            tf1_weights = sess.run(tf1.global_variables())
    for b in batches:
        module(torch.tensor(b))
        layer(case.to_keras(b), training=True)
    torch_stats = state(module)
    tf1_stats = converter.to_torch(tf1_weights, t_config, layer.get_config())
    keras_stats = converter.to_torch(layer.get_weights(), t_config, layer.get_config())
    for name in ("running_mean", "running_var"):
        close(tf1_stats[name], torch_stats[name], 1e-6)
    close(keras_stats["running_mean"], torch_stats["running_mean"], 1e-6)
    assert differs(keras_stats["running_var"], torch_stats["running_var"], 1e-3)
