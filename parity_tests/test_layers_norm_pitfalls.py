"""Pitfalls of Linear and the normalisations between torch and Keras 3, and the configurations
``common.converters.core`` refuses (split from test_layers_norm.py, whose helpers it uses).

Each pitfall: the wrong way differs by more than a stated amount, the right way agrees
(float32 as users run it, tolerance 1e-5 absolute on outputs of order 1), and the converter
refuses the wrong configuration with one sentence naming the fix. Batch norm's eps and
momentum defaults are test_pitfalls.py::test_pitfall_bn_eps_and_momentum_defaults; here the
converter's refusal of them.
"""
import numpy as np
import pytest
import torch
import keras

from common import layout
from common.converters.base import ConversionError, lookup
from parity_tests.test_layers_norm import differs, floats, randomise, state, torch_config

ATOL = 1e-5


def convert(module, layer, input_shape, direction="to_keras"):
    """Build `layer` for `input_shape` (Keras layout) and convert `module`'s weights into it
    (or, with direction="to_torch", the layer's weights to torch's); returns the result."""
    layer.build(input_shape)
    converter, t_config, k_config = lookup(type(module).__name__), torch_config(module), layer.get_config()
    if direction == "to_torch":
        return converter.to_torch(layer.get_weights(), t_config, k_config)
    weights = converter.to_keras(state(module), t_config, k_config)
    layer.set_weights(weights)
    return weights


def torch_output(module, x):
    with torch.no_grad():
        return module.float()(torch.tensor(x)).numpy()


# -- eps defaults ------------------------------------------------------------------------------
EPS_CASES = {
    "layer_norm": (lambda: torch.nn.LayerNorm(6), keras.layers.LayerNormalization, (4, 6), None),
    "group_norm": (lambda: torch.nn.GroupNorm(2, 4), lambda **kw: keras.layers.GroupNormalization(
        2, **kw), (2, 4, 3, 3), layout.nchw_to_nhwc),
}


@pytest.mark.parametrize("name", EPS_CASES)
def test_pitfall_norm_eps_default_1e3_vs_1e5(name):
    """torch's LayerNorm/GroupNorm eps is 1e-5, Keras's default epsilon 1e-3: on
    small-variance inputs (std 0.02, variance 4e-4, comparable to 1e-3) the outputs (fresh
    layers: gamma 1, beta 0) shrink by sqrt(4e-4 / 1.4e-3) and differ by more than 0.3
    (1.16 measured in the research); epsilon=1e-5 agrees to 1e-5, and the converter refuses
    the Keras default, naming epsilon=1e-05."""
    make_torch, make_keras, shape, to_keras = EPS_CASES[name]
    to_keras, from_keras = (to_keras, layout.nhwc_to_nchw) if to_keras else (np.asarray,) * 2
    x = floats(*shape, scale=0.02).astype(np.float32)
    module, right, wrong = make_torch(), make_keras(epsilon=1e-5), make_keras()
    with pytest.raises(ConversionError, match=r"epsilon=1e-05"):
        convert(module, wrong, to_keras(x).shape)
    convert(module, right, to_keras(x).shape)
    wrong.set_weights(right.get_weights())  # copied by hand: the converter refuses
    expected = torch_output(module, x)
    np.testing.assert_allclose(from_keras(right(to_keras(x)).numpy()), expected, atol=ATOL)
    assert differs(from_keras(wrong(to_keras(x)).numpy()), expected, 0.3)


def test_pitfall_layer_norm_normalized_shape_vs_axis():
    """torch LayerNorm((T, C)) normalises over the last two dims; Keras's default axis=-1
    over the last one only, with gamma (C,) instead of (T, C). axis=(-2, -1) agrees; the
    converter refuses axis=-1, naming the fix."""
    x = floats(3, 4, 5, scale=2.0).astype(np.float32)
    module = randomise(torch.nn.LayerNorm((4, 5), elementwise_affine=False))
    expected = torch_output(module, x)
    wrong = keras.layers.LayerNormalization(epsilon=1e-5, center=False, scale=False)
    assert differs(wrong(x).numpy(), expected, 0.5)
    with pytest.raises(ConversionError, match=r"axis=\(-2, -1\)"):
        convert(module, wrong, x.shape)
    right = keras.layers.LayerNormalization(axis=(-2, -1), epsilon=1e-5, center=False, scale=False)
    convert(module, right, x.shape)
    np.testing.assert_allclose(right(x).numpy(), expected, atol=ATOL)


def test_pitfall_group_norm_channel_layout():
    """torch's GroupNorm groups axis 1 of NCHW input; Keras's GroupNormalization groups the
    last axis. Fed NCHW (here C = H = W, so nothing fails) with the default axis=-1 it groups
    W and differs; NHWC input with axis=-1, or NCHW with axis=1, agrees."""
    x = floats(2, 4, 4, 4, scale=2.0).astype(np.float32)
    module = randomise(torch.nn.GroupNorm(2, 4))
    expected = torch_output(module, x)
    layers = {axis: keras.layers.GroupNormalization(2, axis=axis, epsilon=1e-5) for axis in (-1, 1)}
    for layer in layers.values():
        convert(module, layer, x.shape)
    assert differs(layers[-1](x).numpy(), expected, 0.5)
    np.testing.assert_allclose(layers[1](x).numpy(), expected, atol=ATOL)
    nhwc = layout.nhwc_to_nchw(layers[-1](layout.nchw_to_nhwc(x)).numpy())
    np.testing.assert_allclose(nhwc, expected, atol=ATOL)


# -- refused configurations ----------------------------------------------------------------------
REFUSED = {
    "linear-bias": (lambda: torch.nn.Linear(5, 3, bias=False), lambda: keras.layers.Dense(3),
                    (4, 5), "use_bias=False"),
    "linear-units": (lambda: torch.nn.Linear(5, 3), lambda: keras.layers.Dense(4), (4, 5), "units=3"),
    "batch_norm-keras_eps": (lambda: torch.nn.BatchNorm1d(4), lambda: keras.layers.BatchNormalization(
        momentum=0.9), (2, 4), "epsilon=1e-05"),
    "batch_norm-keras_momentum": (lambda: torch.nn.BatchNorm1d(4),
                                  lambda: keras.layers.BatchNormalization(epsilon=1e-5), (2, 4),
                                  "momentum=0.9"),
    "batch_norm-affine": (lambda: torch.nn.BatchNorm2d(4, affine=False),
                          lambda: keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9),
                          (2, 3, 3, 4), "scale=False, center=False"),
    "batch_norm-no_running_stats": (lambda: torch.nn.BatchNorm1d(4, track_running_stats=False),
                                    lambda: keras.layers.BatchNormalization(epsilon=1e-5,
                                                                            momentum=0.9),
                                    (2, 4), "track_running_stats=True"),
    "batch_norm-cumulative_momentum": (lambda: torch.nn.BatchNorm1d(4, momentum=None),
                                       lambda: keras.layers.BatchNormalization(epsilon=1e-5),
                                       (2, 4), "momentum such as 0.1"),
    "layer_norm-bias": (lambda: torch.nn.LayerNorm(5, bias=False),
                        lambda: keras.layers.LayerNormalization(epsilon=1e-5), (3, 5),
                        "center=False"),
    "layer_norm-rms_scaling": (lambda: torch.nn.LayerNorm(5), lambda: keras.layers.LayerNormalization(
        epsilon=1e-5, rms_scaling=True), (3, 5), "rms_scaling=False"),
    "group_norm-groups": (lambda: torch.nn.GroupNorm(2, 4), lambda: keras.layers.GroupNormalization(
        4, epsilon=1e-5), (2, 3, 4), "groups=2"),
    "group_norm-keras_eps": (lambda: torch.nn.GroupNorm(2, 4),
                             lambda: keras.layers.GroupNormalization(2), (2, 3, 4), "epsilon=1e-05"),
}


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("direction", ["to_keras", "to_torch"])
@pytest.mark.parametrize("name", REFUSED)
def test_linear_and_norm_conversion_refused(name, direction):
    """Configurations that do not compute the same function (or would train differently:
    momentum) are refused both ways with one sentence naming the fix."""
    make_torch, make_keras, shape, fix = REFUSED[name]
    module = randomise(make_torch()).float()
    with pytest.raises(ConversionError, match=r"differ|has no|twin|cannot|does not") as info:
        convert(module, make_keras(), shape, direction)
    assert fix in str(info.value) and str(info.value).count(". ") == 0, str(info.value)
