"""The scratch layers (``scratch/functional.py``, ``scratch/nn.py``) against torch and TF in
float64: forward values and gradients within 1e-10, the course's 411 convolution and
batch-norm example, running statistics, and Adam's steps against ``torch.optim.Adam``.
"""
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as TF_TORCH

from parity_tests.test_known_answers import BN_INPUT, IMAGE, KERNEL
from parity_tests.test_scratch_tensor import check_three
from scratch import Tensor, conv2d
from scratch import functional as F
from scratch.nn import Adam, BatchNorm2d, Conv2d, Dropout, Linear

RNG = np.random.default_rng(7)

# -- the course's known answers -----------------------------------------------------------


def test_conv_5x5_first_valid_output_is_411():
    out = conv2d(Tensor(IMAGE[None, None]), Tensor(KERNEL[None, None])).data[0, 0]
    assert out.shape == (3, 3) and out[0, 0] == 411.0
    np.testing.assert_allclose(out, TF_TORCH.conv2d(torch.tensor(IMAGE)[None, None],
                                                    torch.tensor(KERNEL)[None, None])[0, 0])


def test_batchnorm_course_matrix():
    """The course's 3x3 matrix as one 1x1x3x3 map: -0.7067 top left, 2.1000 bottom right."""
    x = Tensor(BN_INPUT[None, None])
    out = F.batch_norm(x, None, None, training=True).data[0, 0]
    assert out[0, 0] == pytest.approx(-0.7067, abs=1e-4)
    assert out[2, 2] == pytest.approx(2.1000, abs=1e-4)


# -- conv2d: every option, against torch and tf.nn.conv2d ---------------------------------
CONV_CASES = {  # name -> (input shape, weight shape, bias?, stride, padding, dilation, groups)
    "plain": ((2, 3, 7, 7), (4, 3, 3, 3), True, 1, 0, 1, 1),
    "same_no_bias": ((2, 3, 8, 8), (5, 3, 3, 3), False, 1, 1, 1, 1),
    "stride2_pad1": ((2, 3, 9, 8), (4, 3, 3, 3), True, 2, 1, 1, 1),
    "rect_kernel_stride_pair": ((1, 2, 9, 10), (3, 2, 2, 3), True, (2, 1), (0, 1), 1, 1),
    "dilation2": ((2, 2, 9, 9), (3, 2, 3, 3), True, 1, 2, 2, 1),
    "groups2": ((2, 4, 6, 6), (6, 2, 3, 3), True, 1, 1, 1, 2),
    "depthwise": ((2, 3, 6, 6), (3, 1, 3, 3), False, 1, 1, 1, 3),
    "all_options": ((2, 4, 9, 9), (6, 2, 3, 3), True, 2, 1, 2, 2),
}


def tf_conv2d(x, w, b, stride, padding, dilation, groups):
    """tf.nn.conv2d in NCHW/torch layouts: explicit padding, one call per group, the stride
    as a subsampling of the stride-1 output (TF refuses stride > 1 with dilation > 1), and
    dilation by tf.nn.atrous_conv2d (TF's CPU conv2d has no dilated gradient)."""
    (sh, sw), (ph, pw) = F.pair(stride), F.pair(padding)
    x = tf.transpose(tf.pad(x, [[0, 0], [0, 0], [ph, ph], [pw, pw]]), (0, 2, 3, 1))
    kernel = tf.transpose(w, (2, 3, 1, 0))
    outs = [tf.nn.atrous_conv2d(xg, kg, dilation, "VALID") if dilation > 1 else
            tf.nn.conv2d(xg, kg, 1, "VALID")
            for xg, kg in zip(tf.split(x, groups, axis=3), tf.split(kernel, groups, axis=3))]
    out = tf.transpose(tf.concat(outs, axis=3), (0, 3, 1, 2))[:, :, ::sh, ::sw]
    return out if b is None else out + tf.reshape(b, (1, -1, 1, 1))


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv2d_matches_torch_and_tf(name):
    x_shape, w_shape, bias, stride, padding, dilation, groups = CONV_CASES[name]
    arrays = [RNG.normal(size=x_shape), RNG.normal(size=w_shape)]
    arrays += [RNG.normal(size=w_shape[0])] if bias else []
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def call(conv):
        return lambda x, w, b=None: conv(x, w, b, **options)
    check_three(call(conv2d), call(TF_TORCH.conv2d), call(tf_conv2d), arrays, name)


def test_conv2d_layer_initialises_like_torch():
    layer = Conv2d(4, 6, 3, groups=2)
    bound = (2 * 3 * 3) ** -0.5
    assert layer.weight.shape == (6, 2, 3, 3) and layer.bias.shape == (6,)
    assert np.abs(layer.weight.data).max() <= bound and np.abs(layer.bias.data).max() <= bound


# -- pooling, batch norm, dense layers and losses ------------------------------------------


@pytest.mark.parametrize("kernel, stride, shape", [(2, None, (2, 3, 8, 7)), (3, 2, (2, 2, 9, 9))],
                         ids=["2x2", "3x3_stride2_overlapping"])
def test_max_pool2d_matches_torch_and_tf(kernel, stride, shape):
    def tf_pool(x):
        out = tf.nn.max_pool2d(tf.transpose(x, (0, 2, 3, 1)), kernel, stride or kernel, "VALID")
        return tf.transpose(out, (0, 3, 1, 2))
    check_three(lambda x: F.max_pool2d(x, kernel, stride),
                lambda x: TF_TORCH.max_pool2d(x, kernel, stride), tf_pool,
                [RNG.normal(size=shape)], "max_pool2d")


def test_batch_norm_training_matches_torch_and_tf():
    arrays = [RNG.normal(size=(4, 3, 5, 5)) * 2 + 1, RNG.normal(size=3), RNG.normal(size=3)]

    def tf_bn(x, w, b):
        mean, var = tf.nn.moments(x, axes=(0, 2, 3), keepdims=True)
        shape = (1, -1, 1, 1)
        return tf.nn.batch_normalization(x, mean, var, tf.reshape(b, shape), tf.reshape(w, shape), 1e-5)
    check_three(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                lambda x, w, b: TF_TORCH.batch_norm(x, None, None, w, b, training=True),
                tf_bn, arrays, "batch_norm training")


def test_batch_norm_running_statistics_and_eval_match_torch():
    mine, theirs = BatchNorm2d(3), torch.nn.BatchNorm2d(3).double()
    for step in range(3):
        x = RNG.normal(size=(4, 3, 5, 5)) * (step + 1) + step
        mine(Tensor(x))
        theirs(torch.tensor(x))
    np.testing.assert_allclose(mine.running_mean, theirs.running_mean.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mine.running_var, theirs.running_var.numpy(), rtol=0, atol=1e-12)
    arrays = [RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=3), RNG.normal(size=3)]
    rm, rv = mine.running_mean, mine.running_var
    check_three(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=False),
                lambda x, w, b: TF_TORCH.batch_norm(x, torch.tensor(rm), torch.tensor(rv), w, b),
                lambda x, w, b: tf.nn.batch_normalization(
                    x, rm.reshape(1, -1, 1, 1), rv.reshape(1, -1, 1, 1), tf.reshape(b, (1, -1, 1, 1)),
                    tf.reshape(w, (1, -1, 1, 1)), 1e-5), arrays, "batch_norm eval")


def test_linear_relu_flatten_match_torch_and_tf():
    arrays = [RNG.normal(size=(5, 2, 3, 2)), RNG.normal(size=(4, 12)), RNG.normal(size=4)]
    check_three(lambda x, w, b: F.relu(F.linear(F.flatten(x), w, b)),
                lambda x, w, b: TF_TORCH.relu(TF_TORCH.linear(torch.flatten(x, 1), w, b)),
                lambda x, w, b: tf.nn.relu(tf.reshape(x, (5, -1)) @ tf.transpose(w) + b),
                arrays, "linear")


def test_cross_entropy_and_mse_match_torch_and_tf():
    labels = np.array([3, 0, 1, 3, 2])
    check_three(lambda z: F.cross_entropy(z, labels),
                lambda z: TF_TORCH.cross_entropy(z, torch.tensor(labels)),
                lambda z: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, z)),
                [RNG.normal(size=(5, 4)) * 10], "cross_entropy")
    target = RNG.normal(size=(6, 1))
    check_three(lambda p: F.mse_loss(p, target), lambda p: TF_TORCH.mse_loss(p, torch.tensor(target)),
                lambda p: tf.reduce_mean((p - target) ** 2), [RNG.normal(size=(6, 1))], "mse")


def test_dropout_scales_kept_values_and_is_off_in_eval():
    F.manual_seed(0)
    x = Tensor(np.ones((200, 50)))
    layer = Dropout(0.5)
    out = layer(x)
    assert set(np.unique(out.data)) == {0.0, 2.0}
    assert abs((out.data == 0).mean() - 0.5) < 0.02
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, out.data)  # d(x * mask / (1 - p))/dx = mask / (1 - p)
    assert layer.eval()(x) is x


# -- Adam ----------------------------------------------------------------------------------


def test_adam_steps_match_torch():
    """Five steps on a small least-squares problem: parameters equal to torch.optim.Adam's."""
    start = [RNG.normal(size=(3, 4)), RNG.normal(size=3)]
    x, y = RNG.normal(size=(8, 4)), RNG.normal(size=(8, 3))
    layer = Linear(4, 3)
    layer.weight.data[...], layer.bias.data[...] = start
    mine = Adam(layer.parameters(), lr=0.05)
    ref = [torch.tensor(a, requires_grad=True) for a in start]
    theirs = torch.optim.Adam(ref, lr=0.05, eps=1e-8)
    for _ in range(5):
        mine.zero_grad()
        F.mse_loss(layer(Tensor(x, requires_grad=False)), y).backward()
        mine.step()
        theirs.zero_grad()
        TF_TORCH.mse_loss(TF_TORCH.linear(torch.tensor(x), *ref), torch.tensor(y)).backward()
        theirs.step()
    for p, r in zip(layer.parameters(), ref):
        np.testing.assert_allclose(p.data, r.detach().numpy(), rtol=0, atol=1e-12)
