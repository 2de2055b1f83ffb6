"""Every speed variant of the TF1-style graph implementation, used with ``--fast``.

Each function has the name of the plain one it replaces (``models.batch_norm``,
``models.conv_block``, ``models.build_cnn``), so an entry point reads
``build = fast.build_cnn if args.fast else build_cnn``. Each computes the same
function as the plain code, with the same variables: ``parity_tests/test_fast_tf1.py``
checks outputs, gradients, one Adam step and the moving statistics from the same
weights. Twins: ``torch_impl/fast.py`` and ``tf2_impl/fast.py``.

Gains below: training throughput on 1,000 CIFAR-shaped images (batch 100), the
variants interleaved epoch by epoch in one process under ``disable_v2_behavior``
(as the entry points run), median of 11 epochs after a warm-up; each gain is
fast.build_cnn against fast.build_cnn without that variant, the range of two runs.
Machine: 2-core Intel Xeon (AVX-512), no GPU, TensorFlow 2.21, shared with other
jobs (load average 5-17). All three together: 1.7x-2.2x the plain graph (2,436
against 1,407 and 2,187 against 997 images/s).

The MLP has no variant: nothing measured faster (``Session.make_callable`` instead
of ``sess.run``: +3%, within the noise; one intra-op thread: no change), so
``run_nn --fast`` builds the plain graph and says so in metrics.json.

The recurrent classifier (``rnn_models.py``) has no variant either, so ``run_rnn --fast``
builds the plain graph and says so. Measured per LSTM training step under
``disable_v2_behavior``, batch 64, interleaved, median of 7-9 rounds of 30-40 steps,
same machine with load 6-7: ``control_flow_v2`` (the scan as one v2 ``While`` op) 0.88x
on 8 steps of 8 (digits) and 0.95x on 32 steps of 96 (CIFAR rows); the input matmul
hoisted out of the scan (one (T*N, F) x (F, 4H) product): 0.97x and 1.05x, within the
noise; the fused ``BlockLSTM`` kernel (gates reordered to i, c, f, o, ``forget_bias=0``,
no cell clip; the same function, 6e-7 relative on outputs and gradients) 1.3x on digits
but 0.5x-0.9x on CIFAR rows (oneDNN on and off), and nothing fused for the GRU
(``GRUBlockCell`` resets h before the recurrent matmul, Keras's ``reset_after=False``,
which is not torch's GRU). ``BlockLSTMV2``, whose i, f, c, o layout is Keras's, computes
the same outputs but wrong gradients in TF 2.21: its registered gradient is
``BlockLSTM``'s, which reads the i, c, f, o layout.
"""
import contextlib

import tensorflow as tf

from common import config
from tf1_compat import models
from tf1_compat.recipes import in_float32


@contextlib.contextmanager
def control_flow_v2():
    """Build the ``tf.cond`` ops inside as control-flow v2 (one ``If`` op), then
    restore the caller's setting.

    What: ``tf.compat.v1.enable_control_flow_v2`` for the duration of the block.
    ``disable_v2_behavior`` (what TF1 entry points run) selects v1 control flow,
    where ``tf.cond`` is a pair of ``Switch``/``Merge`` ops; in a TF2 process v2 is
    on already and this changes nothing. The gradient of an ``If`` op is an ``If``
    op whenever it is built, so the train step may be added after the block.
    Why faster: the gradient of a v1 cond fills a zero tensor the size of the
    untaken branch's input and adds it in: batch norm's cond on every layer's
    activation (and dropout's) at every training step. v2's ``If`` op
    differentiates the taken branch only. Both existed in TF 1.15 and compute
    the same numbers. Gain: 1.17x-1.35x.
    """
    enabled = tf.compat.v1.control_flow_v2_enabled()
    tf.compat.v1.enable_control_flow_v2()
    try:
        yield
    finally:
        if not enabled:
            tf.compat.v1.disable_control_flow_v2()


@in_float32
def batch_norm(x, training, name):
    """``models.batch_norm`` with the fused kernel, ``tf.compat.v1.nn.fused_batch_norm``.

    What: one op normalises, scales and shifts (and computes the batch statistics
    when training) instead of the moments, rsqrt, multiply and add ops of
    ``tf.nn.batch_normalization``; its gradient is one op too.
    Why faster: one pass over the activation instead of several, no intermediate
    tensors. Same numbers: it normalises with the biased batch variance and
    *returns* the unbiased one (times n/(n-1), n = N*H*W), what torch folds into
    running_var and ``models.batch_norm`` computes by hand. The wrapper raises eps
    to at least 1.001e-5 for cuDNN; against 1e-5 that changes 1/sqrt(var + eps) by
    about 5e-9 / var. Gain: 1.6x-2.2x.
    """
    with tf.compat.v1.variable_scope(name):
        gamma, beta, moving_mean, moving_variance = models.batch_norm_variables(x.shape[-1])

        def batch_statistics():
            return tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=config.BN_EPS,
                                                    is_training=True)

        def moving_statistics():
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=moving_mean, variance=moving_variance,
                epsilon=config.BN_EPS, is_training=False)
            return y, tf.identity(moving_mean), tf.identity(moving_variance)

        y, mean, variance = tf.cond(training, batch_statistics, moving_statistics)
        models.update_moving_averages(moving_mean, moving_variance, mean, variance)
        return y


def conv_block(x, filters, training, index):
    """``models.conv_block`` with the fused batch norm and the max pool before the ReLU.

    What: conv -> batch norm -> pool -> ReLU. ReLU and max pool commute
    (relu(max(a, b)) = max(relu(a), relu(b))), so the function and its gradients are
    the textbook block's. Why faster: the ReLU and its gradient run on a quarter of
    the elements. Gain: 1.08x-1.3x.
    """
    x = models.conv2d(x, filters, f"conv{index}")
    x = batch_norm(x, training, f"bn{index}")
    x = models.max_pool(x, f"pool{index}")
    return tf.nn.relu(x)


def build_cnn(input_shape, num_classes, dtype=tf.float32):
    """``models.build_cnn`` with the fast ``conv_block``, its conds built as control-flow v2."""
    with control_flow_v2():
        return models.build_cnn(input_shape, num_classes, block=conv_block, dtype=dtype)

