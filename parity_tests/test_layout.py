"""The numpy conversions in common/layout.py: one explicit permutation each,
checked against the frameworks' own layouts, and lossless round trips."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tensorflow as tf

from common import config, layout
from common.config import CNNShape, cnn_parameter_shapes, mlp_parameter_shapes

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
    tf_out = tf.nn.conv2d(x, layout.conv_kernel_torch_to_tf(w), 1, "SAME").numpy()
    np.testing.assert_allclose(layout.nchw_to_nhwc(torch_out), tf_out, atol=1e-12)
    np.testing.assert_array_equal(layout.conv_kernel_tf_to_torch(layout.conv_kernel_torch_to_tf(w)), w)


def test_dense_conversion_matches_both_frameworks():
    x, w = RNG.normal(size=(3, 7)), RNG.normal(size=(5, 7))  # torch (out, in)
    np.testing.assert_allclose(F.linear(torch.tensor(x), torch.tensor(w)).numpy(),
                               (tf.constant(x) @ layout.dense_torch_to_tf(w)).numpy(), atol=1e-12)
    np.testing.assert_array_equal(layout.dense_tf_to_torch(layout.dense_torch_to_tf(w)), w)


def test_flatten_dense_permutation_round_trip_and_shapes():
    chw = (32, 4, 4)
    w = RNG.normal(size=(100, 512)).astype(np.float32)
    k = layout.flatten_dense_torch_to_tf(w, chw)
    assert k.shape == (512, 100)
    # row (h, w, c) of the TF kernel is column (c, h, w) of the torch weight
    assert k[(1 * 4 + 2) * 32 + 5, 7] == w[7, (5 * 4 + 1) * 4 + 2]
    np.testing.assert_array_equal(layout.flatten_dense_tf_to_torch(k, chw), w)
    with pytest.raises(AssertionError):
        layout.flatten_dense_torch_to_tf(w, (16, 4, 4))


def test_batchnorm_names_round_trip():
    torch_bn = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.arange(3.0),
                "running_var": np.full(3, 2.0)}
    tf_bn = layout.batchnorm_torch_to_tf(torch_bn)
    assert sorted(tf_bn) == ["beta", "gamma", "moving_mean", "moving_variance"]
    back = layout.batchnorm_tf_to_torch(tf_bn)
    for k in torch_bn:
        np.testing.assert_array_equal(back[k], torch_bn[k])
    assert layout.bn_momentum_torch_to_keras(0.1) == pytest.approx(0.9)
    assert layout.bn_momentum_keras_to_torch(0.99) == pytest.approx(0.01)


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
