"""The two shared models as TF1-style graphs, and their shared-format weights.

Twins: ``torch_impl/models.py`` (``nn.Module`` classes) and ``tf2_impl/models.py`` (Keras
models); the speed variants are in ``tf1_compat/fast.py``. Here a model is not an object
holding its layers: a function adds placeholders, variables and ops to the current default
graph and returns the tensors a runner feeds and fetches (``GraphModel``), in the style of
slim's ``nets/lenet.py``. Nothing is computed until a ``tf.compat.v1.Session`` runs it; the
loss and the optimizer are added afterwards (``train.make_loss``, ``train.make_train_step``).

Call the builders inside ``with tf.Graph().as_default():``; they work with and without
``tf.compat.v1.disable_v2_behavior()``. ``dtype=tf.bfloat16`` (or float16) builds the
``--mixed-precision`` graph: the layers compute in that dtype from float32 variables
(``recipes.float32_storage``), batch norm and the outputs in float32.

Variables come from ``tf.compat.v1.get_variable`` under one variable scope per
layer, named so that they map one to one onto torch's ``state_dict``:

=======================  =================  ====================================
TF1 variable             TF1 shape          shared (torch) name and shape
=======================  =================  ====================================
``conv1/kernel``         (kh, kw, in, out)  ``conv1.weight`` (out, in, kh, kw)
``bn1/gamma``            (C,)               ``bn1.weight`` (C,)
``bn1/beta``             (C,)               ``bn1.bias`` (C,)
``bn1/moving_mean``      (C,)               ``bn1.running_mean`` (C,)
``bn1/moving_variance``  (C,)               ``bn1.running_var`` (C,)
``fc1/kernel``           (in, out)          ``fc1.weight`` (out, in)
``fc1/bias``             (out,)             ``fc1.bias`` (out,)
=======================  =================  ====================================

Each layer converts through the converter registry (``common.shared_layers``,
``common.converters``), which also permutes the CNN's ``fc1/kernel`` rows on the way out
and in: NHWC flattens in (H, W, C) order, torch in (C, H, W).
"""
from collections import namedtuple

import tensorflow as tf

from common import config, shared_layers
from common.converters.core import bn_momentum_torch_to_keras
from tf1_compat.recipes import float32_variables, in_float32

GraphModel = namedtuple("GraphModel", [
    "inputs",       # placeholder: (N, features) or (N, H, W, C) float32
    "targets",      # placeholder: (N, 1) float32 (regression) or (N,) int64 class indices
    "training",     # placeholder_with_default(False, []): batch statistics and dropout when True
    "outputs",      # (N, 1) predictions or (N, classes) logits, no softmax
    "variables",    # {"fc1/kernel": tf.Variable, ...}, in the shared format's order
    "flatten_chw",  # (C, H, W) flattened before fc1 (CNN), None for the MLP
])

# Kernels start like Keras's Dense/Conv2D (Glorot uniform, zero bias). torch's
# default is Kaiming uniform with a=sqrt(5) for weights *and* biases, so fresh
# models differ between frameworks; the parity tests share weights instead.
KERNEL_INIT = tf.compat.v1.glorot_uniform_initializer


# -- layers --------------------------------------------------------------------------------
def dense(x, units, name):
    """x (N, in) -> (N, units) = x @ kernel + bias, kernel (in, out) (torch stores (out, in)).

    The variables are asked for in x's dtype, as every layer here: float32, or bfloat16
    read from float32 storage under mixed precision (``recipes.float32_storage``)."""
    with tf.compat.v1.variable_scope(name):
        kernel = tf.compat.v1.get_variable("kernel", [x.shape[-1], units], x.dtype,
                                           initializer=KERNEL_INIT())
        bias = tf.compat.v1.get_variable("bias", [units], x.dtype,
                                         initializer=tf.compat.v1.zeros_initializer())
        return tf.nn.bias_add(tf.matmul(x, kernel), bias)


def conv2d(x, filters, name):
    """x (N, H, W, in) -> (N, H, W, filters), 3x3 kernel (kh, kw, in, out), stride 1.

    No bias: batch norm follows and subtracts the batch mean, which removes any
    per-channel constant; its shift (beta) takes the bias's place.
    """
    with tf.compat.v1.variable_scope(name):
        kernel = tf.compat.v1.get_variable(
            "kernel", [config.CNN_KERNEL, config.CNN_KERNEL, x.shape[-1], filters], x.dtype,
            initializer=KERNEL_INIT())
        # "SAME" pads (k-1)/2 = 1 on every side for stride 1 and an odd kernel: symmetric,
        # so it equals torch's padding=1. (With stride 2 or an even kernel TF puts the
        # extra row/column at the bottom/right, which torch cannot express.)
        return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")


def batch_norm_variables(channels):
    """gamma, beta (trained) and the moving mean and variance (not trained), per channel."""
    def variable(name, initializer, trainable=True):
        return tf.compat.v1.get_variable(name, [channels], tf.float32, initializer=initializer,
                                         trainable=trainable)
    return (variable("gamma", tf.compat.v1.ones_initializer()),
            variable("beta", tf.compat.v1.zeros_initializer()),
            variable("moving_mean", tf.compat.v1.zeros_initializer(), trainable=False),
            variable("moving_variance", tf.compat.v1.ones_initializer(), trainable=False))


def update_moving_averages(moving_mean, moving_variance, mean, variance):
    """Add the moving-average updates to ``UPDATE_OPS``; only the train step runs them.

    torch: running = (1 - 0.1) * running + 0.1 * batch; the TF1 idiom (``assign_moving_average``
    with decay 1 - BN_MOMENTUM = 0.9) is moving -= (1 - decay) * (moving - batch), the same.
    """
    for moving, batch in ((moving_mean, mean), (moving_variance, variance)):
        update = tf.compat.v1.assign_sub(moving, (moving - batch) * config.BN_MOMENTUM)
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, update)


def moments(x):
    """x (N, H, W, C) -> its mean and biased variance over (N, H, W), each (C,), and n = N*H*W."""
    mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
    return mean, variance, tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)


@in_float32
def batch_norm(x, training, name, moments=moments):
    """x (N, H, W, C) -> (N, H, W, C); batch statistics when `training`, else the moving ones.

    Training normalises with the batch mean and the biased batch variance, as torch does,
    but the moving variance takes the *unbiased* one, times n/(n-1) with n = N*H*W: what
    torch folds into running_var (`moments` gives the biased one; over all towers' rows with
    --sync-bn: ``distributed.sync_moments``). Nothing in the forward pass depends on the
    moving-average updates, so a Session runs them only because the train step is built
    under ``tf.control_dependencies(UPDATE_OPS)`` (``train.make_train_step``).
    """
    with tf.compat.v1.variable_scope(name):
        gamma, beta, moving_mean, moving_variance = batch_norm_variables(x.shape[-1])

        def batch_statistics():
            mean, variance, n = moments(x)
            y = tf.nn.batch_normalization(x, mean, variance, beta, gamma, config.BN_EPS)
            return y, mean, variance * n / (n - 1)

        def moving_statistics():
            y = tf.nn.batch_normalization(x, moving_mean, moving_variance, beta, gamma,
                                          config.BN_EPS)
            # Handing the moving values back makes the update a no-op at inference.
            return y, tf.identity(moving_mean), tf.identity(moving_variance)

        y, mean, variance = tf.cond(training, batch_statistics, moving_statistics)
        update_moving_averages(moving_mean, moving_variance, mean, variance)
        return y


def max_pool(x, name):
    """x (N, H, W, C) -> (N, H//2, W//2, C); "VALID" floors odd sizes like torch's MaxPool2d."""
    with tf.name_scope(name):
        return tf.nn.max_pool2d(x, ksize=config.CNN_POOL, strides=config.CNN_POOL,
                                padding="VALID")


def dropout(x, rate, training, name="dropout"):
    """Zero a fraction `rate` of `x` and scale the rest by 1/(1-rate) when `training`.

    TF1 code wrote ``tf.nn.dropout(x, keep_prob=0.5)``: keep_prob = 1 - rate. This is the
    stateless form of ``tf.nn.dropout(x, rate=rate)``: the mask is a function of (graph seed,
    global step), not of a random state inside the Session; the Saver saves the step, so a
    restored Session draws the uninterrupted run's masks (towers: ``distributed.tower``).
    """
    seed = tf.compat.v1.get_default_graph().seed or 0  # tf.compat.v1.set_random_seed

    def drop():
        step = tf.compat.v1.train.get_global_step()  # read inside: inference never needs it
        return tf.nn.experimental.stateless_dropout(
            x, rate=rate, seed=tf.stack([tf.constant(seed, tf.int64), step]))

    with tf.name_scope(name):
        return tf.cond(training, drop, lambda: tf.identity(x))


def conv_block(x, filters, training, index, norm=None):
    """The textbook block: conv -> batch norm (`norm`, else ``batch_norm``) -> ReLU -> 2x2 max
    pool, (N, H, W, C) -> (N, H/2, W/2, filters); variables conv{index}/..., bn{index}/..."""
    x = conv2d(x, filters, f"conv{index}")
    x = (norm or batch_norm)(x, training, f"bn{index}")
    x = tf.nn.relu(x)
    return max_pool(x, f"pool{index}")


def _start_model():
    """The global step (created first, so it is not one of the model's variables), the
    number of variables before the model's, and the ``training`` switch."""
    tf.compat.v1.train.get_or_create_global_step()  # counts train steps; keys dropout masks
    existing = len(tf.compat.v1.global_variables())
    # False by default: evaluation and prediction feed nothing and get inference mode.
    training = tf.compat.v1.placeholder_with_default(False, [], name="training")
    return existing, training


def _variables_since(count):
    """The variables created after the graph held `count`, by name ("fc1/kernel")."""
    return {v.op.name: v for v in tf.compat.v1.global_variables()[count:]}


# -- models --------------------------------------------------------------------------------
def build_mlp(num_features, dtype=tf.float32):
    """MLP regression graph: inputs (N, num_features) -> predictions (N, 1).

    fc1 (num_features -> 100), ReLU, fc2 (100 -> 100), ReLU, fc3 (100 -> 1), computed in
    `dtype`; the predictions are float32 (the loss is).
    """
    existing, training = _start_model()
    inputs = tf.compat.v1.placeholder(tf.float32, [None, num_features], name="inputs")
    targets = tf.compat.v1.placeholder(tf.float32, [None, 1], name="targets")
    with float32_variables():
        x = tf.cast(inputs, dtype)
        for i, units in enumerate(config.MLP_HIDDEN, start=1):
            x = tf.nn.relu(dense(x, units, f"fc{i}"))
        predictions = tf.cast(dense(x, 1, f"fc{len(config.MLP_HIDDEN) + 1}"), tf.float32)
    return GraphModel(inputs=inputs, targets=targets, training=training, outputs=predictions,
                      variables=_variables_since(existing), flatten_chw=None)


def build_cnn(input_shape, num_classes, block=conv_block, dtype=tf.float32):
    """CNN classification graph: inputs (N, H, W, C) NHWC -> logits (N, num_classes).

    Three blocks (`block`: conv 3x3 "SAME" -> batch norm -> ReLU -> 2x2 max pool) ((N, H, W,
    C) -> (N, H/2, W/2, 32) -> (N, H/4, W/4, 32) -> (N, H/8, W/8, 32)), flatten in (H, W, C)
    order, fc1 (-> 100), ReLU, dropout(0.5), fc2 (-> 100), ReLU, fc3 (-> num_classes),
    computed in `dtype`; the logits are float32 (the softmax of the loss needs its range).
    """
    shape = config.CNNShape(tuple(input_shape), num_classes)
    existing, training = _start_model()
    inputs = tf.compat.v1.placeholder(tf.float32, [None, *input_shape], name="inputs")
    targets = tf.compat.v1.placeholder(tf.int64, [None], name="targets")
    with float32_variables():
        x = tf.cast(inputs, dtype)
        for i, filters in enumerate(config.CNN_FILTERS, start=1):
            x = block(x, filters, training, i)
        with tf.name_scope("flatten"):
            # NHWC flattens in (H, W, C) order, torch's NCHW in (C, H, W): fc1's kernel rows
            # are permuted on export/import (the Linear converter's flatten_chw), not here.
            x = tf.reshape(x, [-1, shape.flatten_features])
        x = tf.nn.relu(dense(x, config.CNN_FC[0], "fc1"))
        x = dropout(x, config.DROPOUT, training)
        x = tf.nn.relu(dense(x, config.CNN_FC[1], "fc2"))
        logits = tf.cast(dense(x, num_classes, "fc3"), tf.float32)
    return GraphModel(inputs=inputs, targets=targets, training=training, outputs=logits,
                      variables=_variables_since(existing), flatten_chw=shape.flatten_chw)


# -- shared weights ------------------------------------------------------------------------
def keras_config(name, shape):
    """What layer ``name`` computes, in Keras's words (the converters check it against the torch
    twin): ``conv2d`` a 'same' Conv2D, stride 1, no bias; ``batch_norm`` a BatchNormalization with
    torch's eps and momentum; ``dense`` a Dense. ``shape``: its kernel's (or gamma's) shape."""
    kind = name.rstrip("0123456789")
    if kind == "bn":
        return {"epsilon": config.BN_EPS, "scale": True, "center": True,
                "momentum": bn_momentum_torch_to_keras(config.BN_MOMENTUM)}
    if kind == "conv":
        return {"filters": shape[-1], "kernel_size": tuple(shape[:2]), "strides": (1, 1),
                "dilation_rate": (1, 1), "groups": 1, "padding": "same", "use_bias": False}
    return {"units": shape[-1], "use_bias": True}


KERAS_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def _layers(model):
    """[(shared name, [its TF variables in Keras's get_weights() order], kernel or gamma
    shape, flatten_chw)], in the shared format's order; an enclosing scope, if any, is not
    part of the name ("outer/conv1/kernel" is conv1's)."""
    by_layer = {}
    for tf_name, variable in model.variables.items():
        layer, param = tf_name.split("/")[-2:]
        by_layer.setdefault(layer, {})[param] = variable
    layers = []
    for name in shared_layers.layer_names(model.flatten_chw is not None):
        variables = [by_layer[name][p] for p in KERAS_ORDER if p in by_layer[name]]
        layers.append((name, variables, variables[0].shape.as_list(),
                       model.flatten_chw if name == "fc1" else None))
    return layers


def export_weights(sess, model):
    """The model's variables as shared-format arrays (torch names and layouts)."""
    layers = _layers(model)
    values = sess.run({name: variables for name, variables, *_ in layers})
    tensors = {}
    for name, _, shape, chw in layers:
        tensors.update(shared_layers.to_shared(name, values[name], keras_config(name, shape), chw))
    return tensors


def import_weights(sess, model, tensors):
    """Assign shared-format arrays (already validated by common.weights) to the variables.

    Re-running each variable's initializer with its initial value fed is how ``Variable.load``
    assigns: no new ops, so it also works on a finalized graph.
    """
    feed_dict, initializers = {}, []
    for name, variables, shape, chw in _layers(model):
        values = shared_layers.from_shared(name, tensors, shape, keras_config(name, shape), chw)
        for variable, value in zip(variables, values, strict=True):
            feed_dict[variable.initial_value] = value
            initializers.append(variable.initializer)
    sess.run(initializers, feed_dict=feed_dict)
