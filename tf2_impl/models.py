"""The shared models in Keras 3, in all three model-building APIs, and the shared weights format.

Twins: ``torch_impl/models.py`` (``nn.Module`` classes) and ``tf1_compat/models.py``
(``tf.compat.v1`` variables and ``tf.nn`` ops). Sizes come from ``common.config``;
the layers that hold weights carry the names of the shared weights file (``conv1``,
``bn1``, ..., ``fc3``), so one model in any API converts to and from it.

The same network three ways:

* Sequential (``build_mlp("sequential", ...)``): a list of layers, one input, one output;
* Functional (``"functional"``): ``keras.Input``, layers called on symbolic tensors,
  ``keras.Model(inputs, outputs)``; any graph of layers, still inspectable layer by layer;
* Subclassing (``MLPRegressor`` / ``CNNClassifier``): layers made in ``__init__`` and used in
  ``call(self, x, training=None)``, the API closest to a torch ``nn.Module``. ``training``
  is what ``model.train()`` / ``model.eval()`` are in torch: it is passed to every layer
  that behaves differently while training (batch norm, dropout).

Given the same weights the three compute the same outputs (parity_tests/test_tf2_impl.py).

Keras works in NHWC: images enter the CNN as (N, H, W, C), so the feature map before
``fc1`` flattens in (H, W, C) order; ``export_weights`` / ``import_weights`` permute fc1's
rows to the shared format's torch (C, H, W) order (``common.layout``).

Logits out, no softmax: the course manual ends the CNN with ``Dense(classes,
activation="softmax")`` and a loss on probabilities. Here the losses take logits
(``from_logits=True``, see ``train.make_loss``), which computes log-softmax in one shifted
step (z - max z - log sum exp(z - max z)). The two-step log(softmax(z)) costs numerical
stability: in float32 a small probability rounds to 0 and log(0) = -inf, so Keras clips
probabilities to [1e-7, 1 - 1e-7], which caps the loss and zeroes the gradient of exactly
the worst-classified examples. Logits are also what torch's ``F.cross_entropy`` takes, so
outputs compare one to one across frameworks.
"""
import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import config, layout
from common.config import CNNShape
from common.errors import WeightsError

APIS = ("sequential", "functional", "subclassing")


# -- layers shared by the three APIs ------------------------------------------------------
class BroadcastBiasConv2D(layers.Conv2D):
    """``layers.Conv2D`` that adds its bias with a broadcasting add, not ``BiasAdd``.

    Same variables, weights and outputs as the Keras layer; only the graph differs.
    Keras adds a conv bias with ``tf.nn.bias_add`` (``keras.ops.add`` turns a
    bias-shaped add into one), and on the CPU TensorFlow's oneDNN pass then fuses the
    bias gradient into the kernel gradient (``Conv2DBackpropFilterWithBias``). On 2
    CPU cores that fused kernel measured 3 to 4 times slower than the plain one for
    conv1 (3 input channels, 32x32 maps: 4.4-4.7 ms a step against 1.0-1.4 ms), and a
    CNN training step 13% slower. A broadcasting ``tf.add`` differentiates to a
    separate sum over (N, H, W), which leaves the plain kernel; the forward pass still
    fuses conv and bias. ``tf1_compat`` keeps ``tf.nn.bias_add``: there the pass leaves
    the two gradients apart by itself.
    """

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel)
        if not self.use_bias:
            return outputs
        # tf.add, not keras.ops.add, which would turn this back into tf.nn.bias_add.
        return tf.add(outputs, tf.reshape(self.bias, (1, 1, 1, self.filters)))


def _conv(filters, name):
    # padding="same" with stride 1 and an odd kernel pads (k-1)/2 on every side: the
    # symmetric zero padding of torch's padding=k//2, so both compute the same map.
    # NHWC (Keras's default, spelled out): the bias broadcasts over the last axis.
    return BroadcastBiasConv2D(filters, config.CNN_KERNEL, padding="same",
                               data_format="channels_last", name=name)


class FusedBatchNormalization(layers.BatchNormalization):
    """``layers.BatchNormalization`` whose training step on NHWC images is one fused kernel.

    Keras 2 ran batch norm through TensorFlow's fused kernel (``fused=True``, its default);
    Keras 3 builds it from separate moments, scale and shift ops on every backend, and on
    2 CPU cores that made a CNN training step about 1.4x slower. This layer restores the
    fused kernel while training; everything else (variables and their names, weights
    files, inference with the moving statistics) is the Keras layer's. TF2 has no public
    function for the kernel; ``tf.compat.v1.nn.fused_batch_norm`` is its wrapper, the one
    ``tf1_compat/models.py::batch_norm`` uses.

    The moving variance then follows torch's convention: the kernel hands back the
    unbiased batch variance (times n/(n-1)) for the moving average, where the plain
    Keras layer uses the biased one (``parity_tests/test_pitfalls.py``). The wrapper
    also raises eps to at least 1.001e-5 for cuDNN: against torch's 1e-5 that changes
    1/sqrt(var + eps) by about 5e-9 / var.
    """

    def call(self, inputs, training=None, mask=None):
        nhwc = len(inputs.shape) == 4 and self.axis in (-1, 3)
        if not (training and self.trainable and nhwc):
            return super().call(inputs, training=training, mask=mask)
        # exponential_avg_factor weights the new batch statistic: torch's momentum, 1 - Keras's.
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=True, exponential_avg_factor=1.0 - self.momentum)
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return y


def _batch_norm(name):
    # Keras's momentum weights the *old* moving value (default 0.99), torch's the new
    # batch statistic (0.1); Keras's default eps is 1e-3, torch's 1e-5.
    return FusedBatchNormalization(
        epsilon=config.BN_EPS, momentum=layout.bn_momentum_torch_to_keras(config.BN_MOMENTUM),
        name=name)


# -- MLP regressor --------------------------------------------------------------------------
class MLPRegressor(keras.Model):
    """features -> fc1 100 -> ReLU -> fc2 100 -> ReLU -> fc3 1 (one prediction per row)."""

    def __init__(self, num_features, **kwargs):
        super().__init__(name="mlp_regressor", **kwargs)
        hidden1, hidden2 = config.MLP_HIDDEN
        # Keras infers each layer's input size at the first call: only output sizes here.
        self.fc1 = layers.Dense(hidden1, activation="relu", name="fc1")
        self.fc2 = layers.Dense(hidden2, activation="relu", name="fc2")
        self.fc3 = layers.Dense(1, name="fc3")
        self(np.zeros((1, num_features), np.float32))  # creates the weights

    def call(self, x, training=None):  # no dropout or batch norm: `training` is unused
        x = self.fc1(x)
        x = self.fc2(x)
        return self.fc3(x)  # (N, 1)


def _mlp_sequential(num_features):
    hidden1, hidden2 = config.MLP_HIDDEN
    return keras.Sequential([
        keras.Input(shape=(num_features,)),
        layers.Dense(hidden1, activation="relu", name="fc1"),
        layers.Dense(hidden2, activation="relu", name="fc2"),
        layers.Dense(1, name="fc3"),
    ], name="mlp_sequential")


def _mlp_functional(num_features):
    hidden1, hidden2 = config.MLP_HIDDEN
    inputs = keras.Input(shape=(num_features,), name="features")
    x = layers.Dense(hidden1, activation="relu", name="fc1")(inputs)
    x = layers.Dense(hidden2, activation="relu", name="fc2")(x)
    outputs = layers.Dense(1, name="fc3")(x)
    return keras.Model(inputs, outputs, name="mlp_functional")


def build_mlp(api, num_features):
    """The MLP regressor in one of ``APIS``, built (its weights exist)."""
    builders = {"sequential": _mlp_sequential, "functional": _mlp_functional,
                "subclassing": MLPRegressor}
    return builders[api](num_features)


# -- CNN classifier -------------------------------------------------------------------------
class CNNClassifier(keras.Model):
    """Three blocks of conv 3x3 'same' -> batch norm -> 2x2 max pool -> ReLU, then
    fc1 100 -> ReLU -> dropout -> fc2 100 -> ReLU -> fc3 classes. Outputs logits.

    Pool before ReLU: the two commute, so this is the textbook conv-bn-ReLU-pool
    block with a quarter of the ReLU work (``common.config``)."""

    def __init__(self, input_shape, num_classes, **kwargs):
        super().__init__(name="cnn_classifier", **kwargs)
        # `input_shape` is the dataset's (H, W, C); keras.Model reserves that attribute name.
        self.image_shape = tuple(input_shape)
        filters1, filters2, filters3 = config.CNN_FILTERS
        self.conv1 = _conv(filters1, "conv1")
        self.bn1 = _batch_norm("bn1")
        self.conv2 = _conv(filters2, "conv2")
        self.bn2 = _batch_norm("bn2")
        self.conv3 = _conv(filters3, "conv3")
        self.bn3 = _batch_norm("bn3")
        self.pool = layers.MaxPooling2D(config.CNN_POOL, name="pool")
        self.flatten = layers.Flatten(name="flatten")
        fc1, fc2 = config.CNN_FC
        self.fc1 = layers.Dense(fc1, activation="relu", name="fc1")
        self.dropout = layers.Dropout(config.DROPOUT, name="dropout")
        self.fc2 = layers.Dense(fc2, activation="relu", name="fc2")
        self.fc3 = layers.Dense(num_classes, name="fc3")
        self(np.zeros((1, *self.image_shape), np.float32))  # creates the weights

    def call(self, x, training=None):  # x: (N, H, W, C)
        relu = keras.ops.relu
        x = relu(self.pool(self.bn1(self.conv1(x), training=training)))
        x = relu(self.pool(self.bn2(self.conv2(x), training=training)))
        x = relu(self.pool(self.bn3(self.conv3(x), training=training)))
        x = self.flatten(x)  # (H, W, C) order
        x = self.dropout(self.fc1(x), training=training)
        x = self.fc2(x)
        return self.fc3(x)  # logits: the loss applies log-softmax itself


def _cnn_sequential(input_shape, num_classes):
    filters1, filters2, filters3 = config.CNN_FILTERS
    fc1, fc2 = config.CNN_FC
    pool = config.CNN_POOL
    # Sequential does not take one layer object twice, so each block has its own ReLU and
    # pooling layer (neither holds weights). fit and evaluate pass `training` to every layer.
    return keras.Sequential([
        keras.Input(shape=tuple(input_shape)),
        _conv(filters1, "conv1"), _batch_norm("bn1"), layers.MaxPooling2D(pool, name="pool1"),
        layers.ReLU(name="relu1"),
        _conv(filters2, "conv2"), _batch_norm("bn2"), layers.MaxPooling2D(pool, name="pool2"),
        layers.ReLU(name="relu2"),
        _conv(filters3, "conv3"), _batch_norm("bn3"), layers.MaxPooling2D(pool, name="pool3"),
        layers.ReLU(name="relu3"),
        layers.Flatten(name="flatten"),
        layers.Dense(fc1, activation="relu", name="fc1"),
        layers.Dropout(config.DROPOUT, name="dropout"),
        layers.Dense(fc2, activation="relu", name="fc2"),
        layers.Dense(num_classes, name="fc3"),
    ], name="cnn_sequential")


def _cnn_functional(input_shape, num_classes):
    filters1, filters2, filters3 = config.CNN_FILTERS
    fc1, fc2 = config.CNN_FC
    pool = config.CNN_POOL
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = _conv(filters1, "conv1")(inputs)
    x = _batch_norm("bn1")(x)
    x = layers.MaxPooling2D(pool, name="pool1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = _conv(filters2, "conv2")(x)
    x = _batch_norm("bn2")(x)
    x = layers.MaxPooling2D(pool, name="pool2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = _conv(filters3, "conv3")(x)
    x = _batch_norm("bn3")(x)
    x = layers.MaxPooling2D(pool, name="pool3")(x)
    x = layers.ReLU(name="relu3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(fc1, activation="relu", name="fc1")(x)
    x = layers.Dropout(config.DROPOUT, name="dropout")(x)
    x = layers.Dense(fc2, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, name="fc3")(x)  # logits
    return keras.Model(inputs, outputs, name="cnn_functional")


def build_cnn(api, input_shape, num_classes):
    """The CNN classifier in one of ``APIS``, built (its weights exist)."""
    builders = {"sequential": _cnn_sequential, "functional": _cnn_functional,
                "subclassing": CNNClassifier}
    return builders[api](input_shape, num_classes)


# -- the shared weights format ---------------------------------------------------------------
def _is_cnn(model):
    return any(layer.name == "conv1" for layer in model.layers)


def _flatten_chw(model):
    """(C, H, W) of the map flattened before fc1, from the model's input shape."""
    image_shape = model.image_shape if isinstance(model, CNNClassifier) else model.input_shape[1:]
    return CNNShape(tuple(image_shape), num_classes=0).flatten_chw


def export_weights(model):
    """The shared weights format: torch names and layouts, float32 numpy arrays.

    Keras keeps a dense kernel as (in, out) and a conv kernel as (kh, kw, in, out);
    torch as (out, in) and (out, in, kh, kw).
    """
    tensors = {}
    if _is_cnn(model):
        for i in range(1, len(config.CNN_FILTERS) + 1):
            conv, bn = model.get_layer(f"conv{i}"), model.get_layer(f"bn{i}")
            tensors[f"conv{i}.weight"] = layout.conv_kernel_tf_to_torch(conv.kernel.numpy())
            tensors[f"conv{i}.bias"] = conv.bias.numpy()
            torch_bn = layout.batchnorm_tf_to_torch(
                {key: getattr(bn, key).numpy() for key in layout.BN_TF_TO_TORCH})
            tensors.update({f"bn{i}.{k}": v for k, v in torch_bn.items()})
    for i in range(1, 4):
        fc = model.get_layer(f"fc{i}")
        kernel = fc.kernel.numpy()
        if i == 1 and _is_cnn(model):
            weight = layout.flatten_dense_tf_to_torch(kernel, _flatten_chw(model))
        else:
            weight = layout.dense_tf_to_torch(kernel)
        tensors[f"fc{i}.weight"] = weight
        tensors[f"fc{i}.bias"] = fc.bias.numpy()
    return {name: np.asarray(array, dtype=np.float32) for name, array in tensors.items()}


def _assign(variable, array, name):
    if tuple(variable.shape) != tuple(array.shape):
        raise WeightsError(f"tensor {name!r} converts to shape {tuple(array.shape)}, but the "
                           f"model's {variable.path} has shape {tuple(variable.shape)}")
    variable.assign(array)


def import_weights(model, tensors):
    """Load shared-format tensors (as validated by ``common.weights.load_weights``)."""
    if _is_cnn(model):
        for i in range(1, len(config.CNN_FILTERS) + 1):
            conv, bn = model.get_layer(f"conv{i}"), model.get_layer(f"bn{i}")
            _assign(conv.kernel, layout.conv_kernel_torch_to_tf(tensors[f"conv{i}.weight"]),
                    f"conv{i}.weight")
            _assign(conv.bias, tensors[f"conv{i}.bias"], f"conv{i}.bias")
            keras_bn = layout.batchnorm_torch_to_tf(
                {k: tensors[f"bn{i}.{k}"] for k in layout.BN_TORCH_TO_TF})
            for key, array in keras_bn.items():
                _assign(getattr(bn, key), array, f"bn{i}.{layout.BN_TF_TO_TORCH[key]}")
    for i in range(1, 4):
        fc = model.get_layer(f"fc{i}")
        weight = tensors[f"fc{i}.weight"]
        if i == 1 and _is_cnn(model):
            kernel = layout.flatten_dense_torch_to_tf(weight, _flatten_chw(model))
        else:
            kernel = layout.dense_torch_to_tf(weight)
        _assign(fc.kernel, kernel, f"fc{i}.weight")
        _assign(fc.bias, tensors[f"fc{i}.bias"], f"fc{i}.bias")
    return model
