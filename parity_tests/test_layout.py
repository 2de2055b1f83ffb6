"""Layouts: the activation conversions of common/layout.py, and the per-layer weight
permutations of the converter registry (common/converters: ``conv.py``'s conv kernel,
``core.py``'s Linear with its flatten order and batch norm's names and momentum), each
checked against the frameworks' own ops, with lossless round trips; and the shared models'
layers (common/shared_layers.py) converting through the registry."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tensorflow as tf

from common import config, layout, shared_layers
from common.config import CNNShape, cnn_parameter_shapes, mlp_parameter_shapes
from common.converters import ConversionError, lookup
from common.converters.conv import conv_weight_to_keras, conv_weight_to_torch
from common.converters.core import (BN_KERAS_TO_TORCH, bn_momentum_torch_to_keras,
                                    linear_weight_to_keras, linear_weight_to_torch)

RNG = np.random.default_rng(11)


def test_activation_layout_round_trip():
    x = RNG.normal(size=(2, 5, 4, 3)).astype(np.float32)  # NHWC
    nchw = layout.nhwc_to_nchw(x)
    assert nchw.shape == (2, 3, 5, 4)
    assert nchw[1, 2, 3, 1] == x[1, 3, 1, 2]
    np.testing.assert_array_equal(layout.nchw_to_nhwc(nchw), x)


def test_conv_kernel_conversion_matches_both_frameworks():
    x = RNG.normal(size=(2, 6, 6, 3))       # NHWC, float64 sharpens the check
    w = RNG.normal(size=(4, 3, 3, 3))       # torch (out, in, kh, kw)
    torch_out = F.conv2d(torch.tensor(layout.nhwc_to_nchw(x)), torch.tensor(w), padding=1).numpy()
    tf_out = tf.nn.conv2d(x, conv_weight_to_keras(w), 1, "SAME").numpy()
    np.testing.assert_allclose(layout.nchw_to_nhwc(torch_out), tf_out, atol=1e-12)
    np.testing.assert_array_equal(conv_weight_to_torch(conv_weight_to_keras(w)), w)
    w1 = RNG.normal(size=(4, 3, 5))         # Conv1d (out, in, k): the same permutation
    x1 = RNG.normal(size=(2, 9, 3))         # (N, W, C)
    torch_out = F.conv1d(torch.tensor(x1.transpose(0, 2, 1)), torch.tensor(w1)).numpy()
    np.testing.assert_allclose(torch_out.transpose(0, 2, 1),
                               tf.nn.conv1d(x1, conv_weight_to_keras(w1), 1, "VALID").numpy(),
                               atol=1e-12)
    np.testing.assert_array_equal(conv_weight_to_torch(conv_weight_to_keras(w1)), w1)


def test_dense_conversion_matches_both_frameworks():
    x, w = RNG.normal(size=(3, 7)), RNG.normal(size=(5, 7))  # torch (out, in)
    np.testing.assert_allclose(F.linear(torch.tensor(x), torch.tensor(w)).numpy(),
                               (tf.constant(x) @ linear_weight_to_keras(w)).numpy(), atol=1e-12)
    np.testing.assert_array_equal(linear_weight_to_torch(linear_weight_to_keras(w)), w)


def test_flatten_dense_permutation_round_trip_and_shapes():
    chw = (32, 4, 4)
    w = RNG.normal(size=(100, 512)).astype(np.float32)
    k = linear_weight_to_keras(w, chw)
    assert k.shape == (512, 100)
    # row (h, w, c) of the Keras kernel is column (c, h, w) of the torch weight
    assert k[(1 * 4 + 2) * 32 + 5, 7] == w[7, (5 * 4 + 1) * 4 + 2]
    np.testing.assert_array_equal(linear_weight_to_torch(k, chw), w)
    with pytest.raises(AssertionError):
        linear_weight_to_keras(w, (16, 4, 4))
    # the Linear converter applies it when its torch config says which map the Linear reads
    linear, b = lookup("Linear"), np.zeros(100, np.float32)
    torch_config = {"in_features": 512, "out_features": 100, "flatten_chw": chw}
    keras_config = {"units": 100, "use_bias": True}
    kernel, _ = linear.to_keras({"weight": w, "bias": b}, torch_config, keras_config)
    np.testing.assert_array_equal(kernel, k)
    np.testing.assert_array_equal(linear.to_torch([k, b], torch_config, keras_config)["weight"], w)


def test_batchnorm_names_round_trip():
    torch_bn = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.arange(3.0),
                "running_var": np.full(3, 2.0)}
    torch_config = {"num_features": 3, "eps": 1e-5, "momentum": 0.1, "affine": True,
                    "track_running_stats": True}
    keras_config = {"epsilon": 1e-5, "momentum": bn_momentum_torch_to_keras(0.1), "scale": True,
                    "center": True}
    converter = lookup("BatchNorm2d")
    assert converter.keras_names == ("gamma", "beta", "moving_mean", "moving_variance")
    keras_bn = converter.to_keras(torch_bn, torch_config, keras_config)
    assert all(a.dtype == np.float32 for a in keras_bn)
    back = converter.to_torch(keras_bn, torch_config, keras_config)
    assert sorted(back) == sorted(BN_KERAS_TO_TORCH.values())
    for k in torch_bn:
        np.testing.assert_array_equal(back[k], torch_bn[k])
    assert bn_momentum_torch_to_keras(0.1) == pytest.approx(0.9)


def test_shared_layers_refuse_a_keras_layer_unlike_the_torch_twin():
    """The entry points convert each layer against torch_impl's twin: Keras's default
    eps, or a conv with a bias, is refused by name instead of converted."""
    tensors = {f"bn1.{k}": np.ones(4, np.float32) for k in BN_KERAS_TO_TORCH.values()}
    right = {"epsilon": config.BN_EPS, "scale": True, "center": True,
             "momentum": bn_momentum_torch_to_keras(config.BN_MOMENTUM)}
    assert len(shared_layers.from_shared("bn1", tensors, (4,), right)) == 4
    with pytest.raises(ConversionError, match="eps differs"):
        shared_layers.from_shared("bn1", tensors, (4,), {**right, "epsilon": 1e-3})
    conv = {"filters": 4, "kernel_size": (3, 3), "strides": (1, 1), "dilation_rate": (1, 1),
            "groups": 1, "padding": "same", "use_bias": True}
    with pytest.raises(ConversionError, match="bias differs"):
        shared_layers.from_shared("conv1", {"conv1.weight": np.ones((4, 2, 3, 3))}, (3, 3, 2, 4),
                                  conv)
    assert shared_layers.layer_names(cnn=False) == ["fc1", "fc2", "fc3"]


@pytest.mark.parametrize("input_shape, flatten", [((32, 32, 3), (32, 4, 4)), ((8, 8, 1), (32, 1, 1))])
def test_shared_format_shapes_follow_the_input(input_shape, flatten):
    assert CNNShape(input_shape, 10).flatten_chw == flatten
    shapes = cnn_parameter_shapes(input_shape, 10)
    assert shapes["conv1.weight"] == (32, input_shape[2], 3, 3)
    assert shapes["fc1.weight"] == (config.CNN_FC[0], int(np.prod(flatten)))
    assert shapes["fc3.weight"] == (10, config.CNN_FC[1])
    assert "bn3.running_var" in shapes and not any("num_batches" in k for k in shapes)
    assert mlp_parameter_shapes(10) == {"fc1.weight": (100, 10), "fc1.bias": (100,),
                                        "fc2.weight": (100, 100), "fc2.bias": (100,),
                                        "fc3.weight": (1, 100), "fc3.bias": (1,)}
    names = [n.split(".")[0] for n in shapes]
    assert shared_layers.layer_names(cnn=True) == list(dict.fromkeys(names))
