"""Known answers from the course material, checked in PyTorch, TF2 and TF1.

Each number here was worked out by hand in the course; every framework must
reproduce it. TF1 code builds in its own ``tf.Graph()`` so it shares the process.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tensorflow as tf
import keras
from scipy import signal

tf1 = tf.compat.v1

# -- the backpropagation worked example ----------------------------------------------------
W0 = np.array([[3.0, 1.0, 2.0], [-2.0, -3.0, -1.0]])
W1 = np.array([3.0, 2.0])
X = np.array([1.0, 2.0, 3.0])
TARGET = 10.0
DW0 = np.array([[6.0, 12.0, 18.0], [4.0, 8.0, 12.0]])
DW1 = np.array([22.0, -22.0])


def backprop_torch():
    w0 = torch.tensor(W0, requires_grad=True)
    w1 = torch.tensor(W1, requires_grad=True)
    loss = (w1 @ (w0 @ torch.tensor(X)) - TARGET) ** 2
    loss.backward()
    return w0.grad.numpy(), w1.grad.numpy()


def backprop_tf2():
    w0, w1 = tf.Variable(W0), tf.Variable(W1)
    with tf.GradientTape() as tape:
        hidden = tf.linalg.matvec(w0, tf.constant(X))
        loss = (tf.reduce_sum(w1 * hidden) - TARGET) ** 2
    return [g.numpy() for g in tape.gradient(loss, [w0, w1])]


def backprop_tf1():
    with tf.Graph().as_default():
        w0 = tf1.get_variable("w0", initializer=W0)
        w1 = tf1.get_variable("w1", initializer=W1)
        x = tf1.placeholder(tf.float64, [3])
        loss = (tf.reduce_sum(w1 * tf.linalg.matvec(w0, x)) - TARGET) ** 2
        grads = tf1.gradients(loss, [w0, w1])
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            return sess.run(grads, feed_dict={x: X})


@pytest.mark.parametrize("framework", [backprop_torch, backprop_tf2, backprop_tf1],
                         ids=["torch", "tf2", "tf1"])
def test_backprop_worked_example(framework):
    dw0, dw1 = framework()
    np.testing.assert_allclose(dw0, DW0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dw1, DW1, rtol=0, atol=1e-12)


# -- the autograd examples: x = ones(2,2), y = x + 2, z = 3 y^2 -------------------------------
V = np.array([[1.0, 2.0], [3.0, 4.0]])
AUTOGRAD_CASES = {  # output gradient -> expected dx
    "mean": (None, np.full((2, 2), 4.5)),
    "ones": (np.ones((2, 2)), np.full((2, 2), 18.0)),
    "vector": (V, np.array([[18.0, 36.0], [54.0, 72.0]])),
}


def autograd_torch(grad_output):
    x = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    z = 3 * (x + 2) ** 2
    if grad_output is None:
        z.mean().backward()
    else:
        z.backward(torch.tensor(grad_output))  # a non-scalar output needs the vector of v^T J
    return x.grad.numpy()


def autograd_tf2(grad_output):
    x = tf.Variable(tf.ones((2, 2), tf.float64))
    with tf.GradientTape() as tape:
        z = 3 * (x + 2) ** 2
        target = tf.reduce_mean(z) if grad_output is None else z
    return tape.gradient(target, x, output_gradients=grad_output).numpy()


def autograd_tf1(grad_output):
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float64, [2, 2])
        z = 3 * (x + 2) ** 2
        target = tf.reduce_mean(z) if grad_output is None else z
        grad_ys = None if grad_output is None else tf.constant(grad_output)
        (dx,) = tf1.gradients(target, [x], grad_ys=grad_ys)
        with tf1.Session() as sess:
            return sess.run(dx, feed_dict={x: np.ones((2, 2))})


@pytest.mark.parametrize("case", AUTOGRAD_CASES)
@pytest.mark.parametrize("framework", [autograd_torch, autograd_tf2, autograd_tf1],
                         ids=["torch", "tf2", "tf1"])
def test_autograd_examples(framework, case):
    grad_output, expected = AUTOGRAD_CASES[case]
    np.testing.assert_allclose(framework(grad_output), expected, rtol=0, atol=1e-12)


# -- the 5x5 input 1..25 with the 3x3 kernel 1..9 ------------------------------------------
IMAGE = np.arange(1, 26, dtype=np.float64).reshape(5, 5)
KERNEL = np.arange(1, 10, dtype=np.float64).reshape(3, 3)


def conv_torch(image, kernel):
    return F.conv2d(torch.tensor(image)[None, None], torch.tensor(kernel)[None, None])[0, 0].numpy()


def conv_tf2(image, kernel):
    # NHWC input and (kh, kw, in, out) kernel: TF's layouts, see common/layout.py
    return tf.nn.conv2d(image[None, :, :, None], kernel[:, :, None, None], 1, "VALID")[0, :, :, 0].numpy()


def conv_tf1(image, kernel):
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float64, [1, 5, 5, 1])
        y = tf.nn.conv2d(x, tf.constant(kernel[:, :, None, None]), [1, 1, 1, 1], "VALID")
        with tf1.Session() as sess:
            return sess.run(y, feed_dict={x: image[None, :, :, None]})[0, :, :, 0]


@pytest.mark.parametrize("framework", [conv_torch, conv_tf2, conv_tf1], ids=["torch", "tf2", "tf1"])
def test_conv_5x5_first_valid_output_is_411(framework):
    out = framework(IMAGE, KERNEL)
    assert out.shape == (3, 3)
    assert out[0, 0] == pytest.approx(411.0, abs=1e-9)
    np.testing.assert_allclose(out, signal.correlate2d(IMAGE, KERNEL, mode="valid"), atol=1e-9)


def test_conv2d_equals_correlate2d_not_convolve2d():
    """Deep-learning 'convolution' is scipy's correlate2d; convolve2d flips the kernel."""
    deep = conv_torch(IMAGE, KERNEL)
    np.testing.assert_allclose(deep, signal.correlate2d(IMAGE, KERNEL, mode="valid"), atol=1e-9)
    flipped = signal.convolve2d(IMAGE, KERNEL, mode="valid")
    assert not np.allclose(deep, flipped)
    np.testing.assert_allclose(flipped, signal.correlate2d(IMAGE, KERNEL[::-1, ::-1], mode="valid"),
                               atol=1e-9)
    np.testing.assert_allclose(conv_tf2(IMAGE, KERNEL), deep, atol=1e-9)


# -- batch norm without affine on the course's 3x3 matrix ----------------------------------
BN_INPUT = np.array([[3.0, 2.0, 5.0], [16.0, 43.0, 1.0], [18.0, 3.1, 56.0]], dtype=np.float32)


def test_batchnorm_course_matrix_torch_values():
    """BatchNorm2d(1, affine=False) on the matrix as one 1x1x3x3 map: all nine values share
    one mean and (biased) variance."""
    bn = torch.nn.BatchNorm2d(1, affine=False)
    out = bn(torch.tensor(BN_INPUT)[None, None])[0, 0].detach().numpy()
    assert out[0, 0] == pytest.approx(-0.7067, abs=1e-4)
    assert out[2, 2] == pytest.approx(2.1000, abs=1e-4)
    expected = (BN_INPUT - BN_INPUT.mean()) / np.sqrt(BN_INPUT.var() + 1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _keras_bn(x, **kwargs):
    layer = keras.layers.BatchNormalization(center=False, scale=False, **kwargs)
    return layer(x[None, :, :, None], training=True)[0, :, :, 0].numpy()


def test_batchnorm_course_matrix_keras_default_eps():
    """Keras's default eps is 1e-3, torch's 1e-5. Against this matrix's variance (356.6)
    the difference is invisible; on data with small variance it is not."""
    torch_bn = torch.nn.BatchNorm2d(1, affine=False)
    reference = torch_bn(torch.tensor(BN_INPUT)[None, None])[0, 0].detach().numpy()
    np.testing.assert_allclose(_keras_bn(BN_INPUT), reference, atol=1e-4)
    small = BN_INPUT * 0.01  # variance 0.0357: eps 1e-3 is 3% of it
    reference = torch_bn(torch.tensor(small)[None, None])[0, 0].detach().numpy()
    assert np.abs(_keras_bn(small) - reference).max() > 1e-2
    np.testing.assert_allclose(_keras_bn(small, epsilon=1e-5), reference, atol=1e-5)
