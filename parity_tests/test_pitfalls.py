"""Porting pitfalls, one named test each: the wrong way gives different numbers,
the right way agrees. Tolerances are stated per test; float64 where it sharpens
the check. TF1 code builds in its own ``tf.Graph()``.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tensorflow as tf
import keras

from common import config, layout
from common.converters.conv import conv_weight_to_torch
from common.converters.core import (bn_momentum_torch_to_keras, linear_weight_to_keras,
                                    linear_weight_to_torch)

tf1 = tf.compat.v1
RNG = np.random.default_rng(2024)
ATOL = 1e-5  # float32 forward passes of a few layers


def _differs(a, b, atol=1e-3):
    return np.abs(np.asarray(a) - np.asarray(b)).max() > atol


# -- flatten order --------------------------------------------------------------------------
def test_pitfall_flatten_order_first_dense_after_conv():
    """torch flattens (C, H, W), TF flattens (H, W, C): transposing fc1 is not enough."""
    features = RNG.normal(size=(2, 4, 3, 3)).astype(np.float32)  # NCHW, >1 channel, >1x1
    weight = RNG.normal(size=(5, 36)).astype(np.float32)          # torch (out, C*H*W)
    expected = torch.flatten(torch.tensor(features), 1) @ torch.tensor(weight).T
    tf_flat = tf.reshape(layout.nchw_to_nhwc(features), (2, -1))   # (H, W, C) order
    wrong = tf_flat @ linear_weight_to_keras(weight)
    right = tf_flat @ linear_weight_to_keras(weight, (4, 3, 3))
    assert wrong.shape == right.shape == (2, 5)  # the shapes cannot tell
    assert _differs(wrong, expected)
    np.testing.assert_allclose(right, expected.numpy(), atol=ATOL)
    np.testing.assert_array_equal(linear_weight_to_torch(
        linear_weight_to_keras(weight, (4, 3, 3)), (4, 3, 3)), weight)


# -- padding='same' with stride 2 on even inputs -------------------------------------------------
def test_pitfall_padding_same_stride2_even_input():
    """TF's 'SAME' pads the missing row/column at the bottom/right only; torch's
    padding=1 pads both sides. Stride 1 with an odd kernel is symmetric in both."""
    x = RNG.normal(size=(1, 8, 8, 2)).astype(np.float32)  # NHWC, even size
    k = RNG.normal(size=(3, 3, 2, 4)).astype(np.float32)
    tf_out = tf.nn.conv2d(x, k, strides=2, padding="SAME").numpy()
    x_t, k_t = torch.tensor(layout.nhwc_to_nchw(x)), torch.tensor(conv_weight_to_torch(k))
    wrong = layout.nchw_to_nhwc(F.conv2d(x_t, k_t, stride=2, padding=1).numpy())
    right = layout.nchw_to_nhwc(F.conv2d(F.pad(x_t, (0, 1, 0, 1)), k_t, stride=2).numpy())
    assert wrong.shape == tf_out.shape == (1, 4, 4, 4)
    assert _differs(wrong, tf_out)
    np.testing.assert_allclose(right, tf_out, atol=ATOL)
    stride1 = layout.nchw_to_nhwc(F.conv2d(x_t, k_t, padding=1).numpy())
    np.testing.assert_allclose(stride1, tf.nn.conv2d(x, k, 1, "SAME").numpy(), atol=ATOL)


# -- default initialisers --------------------------------------------------------------------------
def test_pitfall_default_init_differs():
    """torch.nn.Linear: U(+-1/sqrt(in)) weights and biases; keras Dense: Glorot uniform
    weights and zero biases. Same architecture, different starting point: copy the weights."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(100, 100)
    dense = keras.layers.Dense(100)
    dense.build((None, 100))
    t_std, k_std = fc.weight.detach().numpy().std(), dense.kernel.numpy().std()
    assert abs(t_std - 1 / np.sqrt(300)) < 3e-3      # bound 1/sqrt(100) -> std 0.0577
    assert abs(k_std - np.sqrt(2 / 200)) < 3e-3      # glorot bound sqrt(6/200) -> std 0.1
    assert np.all(dense.bias.numpy() == 0) and np.any(fc.bias.detach().numpy() != 0)
    x = RNG.normal(size=(8, 100)).astype(np.float32)
    assert _differs(dense(x), fc(torch.tensor(x)).detach())
    dense.set_weights([linear_weight_to_keras(fc.weight.detach().numpy()), fc.bias.detach().numpy()])
    np.testing.assert_allclose(dense(x).numpy(), fc(torch.tensor(x)).detach().numpy(), atol=ATOL)


# -- softmax in the model vs from_logits ------------------------------------------------------------
def test_pitfall_softmax_in_model_vs_from_logits():
    """torch's cross_entropy takes logits. Keras's loss takes probabilities unless
    from_logits=True; softmax-in-the-model then clips at 1e-7 and loses large losses."""
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 40.0, -40.0]], dtype=np.float32)
    labels = np.array([0, 2])
    expected = F.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    wrong = keras.losses.SparseCategoricalCrossentropy()(labels, logits).numpy()
    right = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits).numpy()
    # tf.nn.softmax: plain probabilities (a Keras softmax layer may keep its logits
    # on the side for the loss to use, which hides the problem only inside Keras).
    softmax_in_model = keras.losses.SparseCategoricalCrossentropy()(
        labels, tf.nn.softmax(logits)).numpy()
    assert abs(wrong - expected) > 0.1
    assert right == pytest.approx(expected, abs=1e-5)
    assert expected > 40 and softmax_in_model < 10  # clipped at -log(1e-7) = 16.1 per sample


# -- loss argument order --------------------------------------------------------------------------
def test_pitfall_loss_argument_order():
    """torch losses are f(input, target); Keras losses are f(y_true, y_pred). With an
    asymmetric loss (binary cross-entropy on soft targets) swapping them changes the value."""
    pred = np.array([0.99, 0.01, 0.5], dtype=np.float32)
    target = np.array([0.6, 0.3, 0.9], dtype=np.float32)
    expected = F.binary_cross_entropy(torch.tensor(pred), torch.tensor(target)).item()
    bce = keras.losses.BinaryCrossentropy()
    wrong = float(bce(pred[:, None], target[:, None]))   # torch order given to Keras
    right = float(bce(target[:, None], pred[:, None]))   # y_true first
    assert abs(wrong - expected) > 0.05
    assert right == pytest.approx(expected, abs=1e-5)


# -- dropout rate vs keep_prob --------------------------------------------------------------------
def _zero_fraction(values):
    return float(np.mean(np.asarray(values) == 0))


def test_pitfall_dropout_rate_vs_keep_prob():
    """torch's p and tf.nn.dropout's rate are the probability to DROP; TF1's keep_prob
    was the probability to KEEP. Passing p as keep_prob drops 1 - p instead of p."""
    p = 0.2
    x = np.ones((200, 500), dtype=np.float32)
    torch_out = F.dropout(torch.tensor(x), p=p, training=True).numpy()
    rate_out = tf.nn.dropout(x, rate=p, seed=1).numpy()
    with tf.Graph().as_default():
        wrong_t = tf1.nn.dropout(tf.constant(x), keep_prob=p, seed=1)
        right_t = tf1.nn.dropout(tf.constant(x), keep_prob=1 - p, seed=1)
        with tf1.Session() as sess:
            wrong, right = sess.run([wrong_t, right_t])
    assert _zero_fraction(torch_out) == pytest.approx(p, abs=0.01)
    assert _zero_fraction(rate_out) == pytest.approx(p, abs=0.01)
    assert _zero_fraction(wrong) == pytest.approx(1 - p, abs=0.01)
    assert _zero_fraction(right) == pytest.approx(p, abs=0.01)
    for out in (torch_out, rate_out, right):  # survivors are scaled by 1 / (1 - p)
        assert out.max() == pytest.approx(1 / (1 - p), rel=1e-6)


# -- train / eval mode of batch norm and dropout ---------------------------------------------------
def _bn_dropout_pair():
    torch_model = torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5))
    with torch.no_grad():
        torch_model[0].running_mean.copy_(torch.linspace(-1, 1, 6))
        torch_model[0].running_var.copy_(torch.linspace(0.5, 2, 6))
    keras_model = keras.Sequential([keras.Input((6,)),
                                    keras.layers.BatchNormalization(epsilon=config.BN_EPS),
                                    keras.layers.Dropout(0.5)])
    keras_model.layers[0].set_weights([np.ones(6), np.zeros(6), np.linspace(-1, 1, 6),
                                       np.linspace(0.5, 2, 6)])
    return torch_model, keras_model


def test_pitfall_train_eval_mode_batchnorm_dropout():
    """A fresh torch module is in training mode (batch statistics, dropout on); a Keras
    model called without `training` runs in inference mode. Call model.eval() in torch,
    or pass training=False explicitly in Keras."""
    torch_model, keras_model = _bn_dropout_pair()
    x = RNG.normal(2.0, 3.0, size=(16, 6)).astype(np.float32)
    inference = keras_model(x, training=False).numpy()
    np.testing.assert_allclose(keras_model(x).numpy(), inference, atol=ATOL)
    wrong = torch_model(torch.tensor(x)).detach().numpy()  # still in training mode
    assert _differs(wrong, inference)
    # ...and that call also moved the running statistics: start again from a fresh copy.
    torch_model, _ = _bn_dropout_pair()
    torch_model.eval()
    with torch.no_grad():
        right = torch_model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(right, inference, atol=ATOL)


# -- biased vs unbiased running variance ----------------------------------------------------------
def test_pitfall_biased_vs_unbiased_running_var():
    """Both normalise a training batch with its biased variance, but torch folds the
    UNBIASED batch variance (n/(n-1)) into running_var, Keras the biased one. TF1's
    fused_batch_norm returns the unbiased one, like torch."""
    x = RNG.normal(size=(4, 3, 3, 2)).astype(np.float32)  # n = 36 values per channel
    torch_bn = torch.nn.BatchNorm2d(2, eps=config.BN_EPS, momentum=config.BN_MOMENTUM)
    torch_bn(torch.tensor(layout.nhwc_to_nchw(x)))
    keras_bn = keras.layers.BatchNormalization(
        epsilon=config.BN_EPS, momentum=bn_momentum_torch_to_keras(config.BN_MOMENTUM))
    keras_bn(x, training=True)
    m = config.BN_MOMENTUM
    unbiased = (1 - m) + m * x.var(axis=(0, 1, 2), ddof=1)
    biased = (1 - m) + m * x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(torch_bn.running_var.numpy(), unbiased, rtol=1e-5)
    np.testing.assert_allclose(keras_bn.moving_variance.numpy(), biased, rtol=1e-5)
    assert _differs(keras_bn.moving_variance.numpy(), torch_bn.running_var.numpy(), atol=1e-4)
    with tf.Graph().as_default():
        _, _, batch_var = tf1.nn.fused_batch_norm(x, np.ones(2, np.float32), np.zeros(2, np.float32),
                                                  epsilon=config.BN_EPS, is_training=True)
        with tf1.Session() as sess:
            np.testing.assert_allclose(sess.run(batch_var), x.var(axis=(0, 1, 2), ddof=1), rtol=1e-5)


# -- batch-norm eps and momentum conventions ----------------------------------------------------------
def _bn_after_steps(keras_kwargs, steps=5):
    batches = [RNG.normal(1.0, 0.05, size=(32, 4)).astype(np.float32) for _ in range(steps)]
    torch_bn = torch.nn.BatchNorm1d(4)  # torch defaults: eps 1e-5, momentum 0.1
    keras_bn = keras.layers.BatchNormalization(**keras_kwargs)
    for b in batches:
        torch_out = torch_bn(torch.tensor(b)).detach().numpy()
        keras_out = keras_bn(b, training=True).numpy()
    return torch_bn, keras_bn, torch_out, keras_out


def test_pitfall_bn_eps_and_momentum_defaults():
    """Keras: eps 1e-3 and momentum 0.99 on the OLD value; torch: eps 1e-5 and momentum
    0.1 on the NEW value. With the defaults both the outputs (small variance) and the
    running statistics drift; mapped (eps=1e-5, momentum=1-0.1) they agree."""
    torch_bn, keras_bn, t_out, k_out = _bn_after_steps({})
    assert _differs(k_out, t_out, atol=1e-2)                                     # eps
    assert _differs(keras_bn.moving_mean.numpy(), torch_bn.running_mean.numpy())  # momentum
    torch_bn, keras_bn, t_out, k_out = _bn_after_steps(
        {"epsilon": config.BN_EPS, "momentum": bn_momentum_torch_to_keras(config.BN_MOMENTUM)})
    np.testing.assert_allclose(k_out, t_out, atol=1e-4)
    np.testing.assert_allclose(keras_bn.moving_mean.numpy(), torch_bn.running_mean.numpy(), atol=1e-6)


# -- Adam epsilon -----------------------------------------------------------------------------
def _adam_steps(keras_epsilon, grad_scale, torch_eps_like_keras=False, steps=10):
    """Per-step weight changes of torch's and Keras's Adam on the same gradients."""
    rng = np.random.default_rng(7)  # the same weights and gradients in every call
    w0 = rng.normal(size=(5,))
    grads = [rng.normal(scale=grad_scale, size=(5,)) for _ in range(steps)]
    w_t = torch.tensor(w0, requires_grad=True)
    opt_t = torch.optim.Adam([w_t], lr=1e-3, eps=config.ADAM_EPS)
    w_k = tf.Variable(w0)
    opt_k = keras.optimizers.Adam(learning_rate=1e-3, epsilon=keras_epsilon)
    for t, g in enumerate(grads, start=1):
        if torch_eps_like_keras:
            # Keras (and TF1) add eps to sqrt(v) BEFORE the bias correction (the paper's
            # "epsilon hat"), torch after it: the same update needs eps / sqrt(1 - beta2^t).
            opt_t.param_groups[0]["eps"] = keras_epsilon / np.sqrt(1 - config.ADAM_BETA2 ** t)
        w_t.grad = torch.tensor(g)
        opt_t.step()
        opt_k.apply_gradients([(tf.constant(g), w_k)])
    return w_t.detach().numpy() - w0, w_k.numpy() - w0


def test_pitfall_adam_eps_default_1e8_vs_1e7():
    """torch's Adam eps is 1e-8, Keras's 1e-7. With ordinary gradients, matching eps
    makes 10 steps agree; with tiny gradients (where eps dominates) the default
    differs grossly, and even a matched eps differs by where eps enters the update."""
    torch_step, keras_step = _adam_steps(config.ADAM_EPS, grad_scale=1e-2)
    np.testing.assert_allclose(keras_step, torch_step, atol=1e-6)  # 1e-3 of one lr-sized step
    torch_step, keras_step = _adam_steps(1e-7, grad_scale=1e-7)
    assert np.abs(keras_step - torch_step).max() > 0.3 * np.abs(torch_step).max()
    torch_step, keras_step = _adam_steps(config.ADAM_EPS, grad_scale=1e-7)
    assert np.abs(keras_step - torch_step).max() > 0.01 * np.abs(torch_step).max()
    torch_step, keras_step = _adam_steps(config.ADAM_EPS, grad_scale=1e-7, torch_eps_like_keras=True)
    # rtol 1e-4, not 1e-9: Keras rounds beta_2 = 0.999 to float32 before 1 - beta_2^t.
    np.testing.assert_allclose(keras_step, torch_step, rtol=1e-4)


# -- the TF1 UPDATE_OPS dependency ------------------------------------------------------------------
def _tf1_moving_mean_after_step(with_update_ops):
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, [None, 3])
        w = tf1.get_variable("w", initializer=tf.ones([3]))
        moving_mean = tf1.get_variable("moving_mean", initializer=tf.zeros([3]), trainable=False)
        h = x * w
        mean, _ = tf.nn.moments(h, axes=[0])
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS,
                              tf1.assign_sub(moving_mean, config.BN_MOMENTUM * (moving_mean - mean)))
        loss = tf.reduce_sum((h - mean) ** 2)
        optimizer = tf1.train.GradientDescentOptimizer(0.01)
        if with_update_ops:
            # Nothing fetches the moving-average update, so it only runs if the train op
            # depends on it: the classic UPDATE_OPS control dependency.
            with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                train_op = optimizer.minimize(loss)
        else:
            train_op = optimizer.minimize(loss)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            sess.run(train_op, feed_dict={x: np.full((4, 3), 2.0, np.float32)})
            return sess.run(moving_mean)


def test_pitfall_tf1_update_ops_dependency():
    np.testing.assert_array_equal(_tf1_moving_mean_after_step(False), np.zeros(3))
    np.testing.assert_allclose(_tf1_moving_mean_after_step(True), np.full(3, 0.2), rtol=1e-6)
