"""The shared models in Keras 3, in all three model-building APIs, and the shared weights format.

Twins: ``torch_impl/models.py`` (``nn.Module`` classes) and ``tf1_compat/models.py``
(``tf.compat.v1`` variables and ``tf.nn`` ops). Sizes come from ``common.config``; the
layers that hold weights carry the names of the shared weights file (``conv1``, ``bn1``,
..., ``fc3``), so a model in any API converts to and from it.

The same network three ways, built with ``build_mlp`` / ``build_cnn(..., api=...)``:

* Sequential: a list of layers, one input, one output;
* Functional: ``keras.Input``, layers called on symbolic tensors, ``keras.Model(inputs,
  outputs)``; any graph of layers, still inspectable layer by layer;
* Subclassing (``MLPRegressor`` / ``CNNClassifier``): layers made in ``__init__`` and used
  in ``call(self, x, training=None)``, the API closest to a torch ``nn.Module``.
  ``training`` is what ``model.train()`` / ``model.eval()`` set in torch: it reaches every
  layer that behaves differently while training (batch norm, dropout).

Given the same weights the three compute the same outputs (parity_tests/test_tf2_impl.py).

Keras works in NHWC: images enter the CNN as (N, H, W, C), so the map before ``fc1``
flattens in (H, W, C) order. ``export_weights`` / ``import_weights`` convert each layer
through the converter registry (``common.shared_layers``, ``common.converters``), which also
permutes fc1's rows to the shared format's torch (C, H, W) order.

Logits out, no softmax (the course manual ends with ``Dense(classes, activation="softmax")``):
the losses take logits (``from_logits=True``, ``train.make_loss``) and compute log-softmax
in one stable step, where log(softmax(z)) in float32 rounds small probabilities to 0 and
Keras then clips them, zeroing the gradient of the worst-classified examples. torch's
``F.cross_entropy`` takes logits too, so outputs compare one to one.
"""
import keras
import numpy as np
from keras import layers

from common import config, shared_layers
from common.config import CNNShape
from common.converters import ConversionError
from common.converters.core import bn_momentum_torch_to_keras
from common.errors import WeightsError

APIS = ("sequential", "functional", "subclassing")


# -- settings shared by the three APIs ----------------------------------------------------
# Batch norm in torch's convention (common.config): Keras's momentum weights the *old*
# moving value (default 0.99), torch's the new batch statistic (0.1); Keras's default eps
# is 1e-3, torch's 1e-5. Keras normalises the last axis, the channels of NHWC.
KERAS_BN_MOMENTUM = bn_momentum_torch_to_keras(config.BN_MOMENTUM)
# A conv has no bias (use_bias=False) when batch norm follows it: batch norm subtracts the
# batch mean, which removes any per-channel constant, and its beta takes the bias's place.
# padding="same" (stride 1, odd kernel) pads (k-1)/2 on every side: torch's padding=k//2.
# `sync_bn` (--sync-bn, data-parallel): synchronized=True all-reduces each batch's moments
# over the replicas, so N replicas normalise as one process does; without it (Keras's and
# DDP's default) each replica uses its own rows. Both fold the biased batch variance into
# the moving variance, Keras's convention (torch folds the unbiased one: test_pitfalls.py).


def _bn_options(sync_bn):
    """The batch-norm arguments shared by every BN layer of the CNN."""
    return dict(epsilon=config.BN_EPS, momentum=KERAS_BN_MOMENTUM, synchronized=sync_bn)


def output_dtype():
    """The output layer's dtype (fc3; the RNN's fc): its variables' under the global policy.
    With --mixed-precision (``tf2_impl/recipes.py``) the other layers compute in bf16/fp16
    and the output layer in float32, so the logits and the loss get neither bf16's
    rounding nor fp16's range (torch casts its outputs with ``.float()``); under a
    float32 or float64 policy it is every layer's dtype anyway."""
    return keras.mixed_precision.global_policy().variable_dtype


# -- MLP regressor --------------------------------------------------------------------------
class MLPRegressor(keras.Model):
    """features -> fc1 100 -> ReLU -> fc2 100 -> ReLU -> fc3 1 (one prediction per row)."""

    def __init__(self, num_features, **kwargs):
        super().__init__(name="mlp_regressor", **kwargs)
        hidden1, hidden2 = config.MLP_HIDDEN
        # Keras infers each layer's input size at the first call: only output sizes here.
        self.fc1 = layers.Dense(hidden1, activation="relu", name="fc1")
        self.fc2 = layers.Dense(hidden2, activation="relu", name="fc2")
        self.fc3 = layers.Dense(1, name="fc3", dtype=output_dtype())
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
        layers.Dense(1, name="fc3", dtype=output_dtype()),
    ], name="mlp_sequential")


def _mlp_functional(num_features):
    hidden1, hidden2 = config.MLP_HIDDEN
    inputs = keras.Input(shape=(num_features,), name="features")
    x = layers.Dense(hidden1, activation="relu", name="fc1")(inputs)
    x = layers.Dense(hidden2, activation="relu", name="fc2")(x)
    outputs = layers.Dense(1, name="fc3", dtype=output_dtype())(x)
    return keras.Model(inputs, outputs, name="mlp_functional")


def build_mlp(num_features, api="subclassing"):
    """The MLP regressor in one of ``APIS``, built (its weights exist)."""
    builders = {"sequential": _mlp_sequential, "functional": _mlp_functional,
                "subclassing": MLPRegressor}
    return builders[api](num_features)


# -- CNN classifier -------------------------------------------------------------------------
class CNNClassifier(keras.Model):
    """Three blocks of conv 3x3 'same' -> batch norm -> ReLU -> 2x2 max pool, then
    fc1 100 -> ReLU -> dropout -> fc2 100 -> ReLU -> fc3 classes. Outputs logits."""

    def __init__(self, input_shape, num_classes, sync_bn=False, **kwargs):
        super().__init__(name="cnn_classifier", **kwargs)
        # `input_shape` is the dataset's (H, W, C); keras.Model reserves that attribute name.
        self.image_shape = tuple(input_shape)
        filters1, filters2, filters3 = config.CNN_FILTERS
        kernel, bn = config.CNN_KERNEL, _bn_options(sync_bn)
        self.conv1 = layers.Conv2D(filters1, kernel, padding="same", use_bias=False, name="conv1")
        self.bn1 = layers.BatchNormalization(**bn, name="bn1")
        self.conv2 = layers.Conv2D(filters2, kernel, padding="same", use_bias=False, name="conv2")
        self.bn2 = layers.BatchNormalization(**bn, name="bn2")
        self.conv3 = layers.Conv2D(filters3, kernel, padding="same", use_bias=False, name="conv3")
        self.bn3 = layers.BatchNormalization(**bn, name="bn3")
        self.pool = layers.MaxPooling2D(config.CNN_POOL, name="pool")
        self.flatten = layers.Flatten(name="flatten")
        fc1, fc2 = config.CNN_FC
        self.fc1 = layers.Dense(fc1, activation="relu", name="fc1")
        self.dropout = layers.Dropout(config.DROPOUT, name="dropout")
        self.fc2 = layers.Dense(fc2, activation="relu", name="fc2")
        self.fc3 = layers.Dense(num_classes, name="fc3", dtype=output_dtype())
        self(np.zeros((1, *self.image_shape), np.float32))  # creates the weights

    def call(self, x, training=None):  # x: (N, H, W, C)
        relu = keras.ops.relu
        x = self.pool(relu(self.bn1(self.conv1(x), training=training)))
        x = self.pool(relu(self.bn2(self.conv2(x), training=training)))
        x = self.pool(relu(self.bn3(self.conv3(x), training=training)))
        x = self.flatten(x)  # (H, W, C) order
        x = self.dropout(self.fc1(x), training=training)
        x = self.fc2(x)
        return self.fc3(x)  # logits: the loss applies log-softmax itself


def _cnn_sequential(input_shape, num_classes, sync_bn):
    filters1, filters2, filters3 = config.CNN_FILTERS
    fc1, fc2 = config.CNN_FC
    kernel, pool, bn = config.CNN_KERNEL, config.CNN_POOL, _bn_options(sync_bn)
    # Sequential does not take one layer object twice, so each block has its own ReLU and
    # pooling layer (neither holds weights). fit and evaluate pass `training` to every layer.
    return keras.Sequential([
        keras.Input(shape=tuple(input_shape)),
        layers.Conv2D(filters1, kernel, padding="same", use_bias=False, name="conv1"),
        layers.BatchNormalization(**bn, name="bn1"),
        layers.ReLU(name="relu1"), layers.MaxPooling2D(pool, name="pool1"),
        layers.Conv2D(filters2, kernel, padding="same", use_bias=False, name="conv2"),
        layers.BatchNormalization(**bn, name="bn2"),
        layers.ReLU(name="relu2"), layers.MaxPooling2D(pool, name="pool2"),
        layers.Conv2D(filters3, kernel, padding="same", use_bias=False, name="conv3"),
        layers.BatchNormalization(**bn, name="bn3"),
        layers.ReLU(name="relu3"), layers.MaxPooling2D(pool, name="pool3"),
        layers.Flatten(name="flatten"),
        layers.Dense(fc1, activation="relu", name="fc1"),
        layers.Dropout(config.DROPOUT, name="dropout"),
        layers.Dense(fc2, activation="relu", name="fc2"),
        layers.Dense(num_classes, name="fc3", dtype=output_dtype()),
    ], name="cnn_sequential")


def _cnn_functional(input_shape, num_classes, sync_bn):
    filters1, filters2, filters3 = config.CNN_FILTERS
    fc1, fc2 = config.CNN_FC
    kernel, pool, bn = config.CNN_KERNEL, config.CNN_POOL, _bn_options(sync_bn)
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = layers.Conv2D(filters1, kernel, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(**bn, name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(pool, name="pool1")(x)
    x = layers.Conv2D(filters2, kernel, padding="same", use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(**bn, name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(pool, name="pool2")(x)
    x = layers.Conv2D(filters3, kernel, padding="same", use_bias=False, name="conv3")(x)
    x = layers.BatchNormalization(**bn, name="bn3")(x)
    x = layers.ReLU(name="relu3")(x)
    x = layers.MaxPooling2D(pool, name="pool3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(fc1, activation="relu", name="fc1")(x)
    x = layers.Dropout(config.DROPOUT, name="dropout")(x)
    x = layers.Dense(fc2, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, name="fc3", dtype=output_dtype())(x)  # logits
    return keras.Model(inputs, outputs, name="cnn_functional")


def build_cnn(input_shape, num_classes, api="subclassing", sync_bn=False):
    """The CNN classifier in one of ``APIS`` for (H, W, C) images, built (its weights exist);
    `sync_bn`: batch norm synchronised over the replicas."""
    builders = {"sequential": _cnn_sequential, "functional": _cnn_functional,
                "subclassing": CNNClassifier}
    return builders[api](input_shape, num_classes, sync_bn)


# -- the shared weights format ---------------------------------------------------------------
def _is_cnn(model):
    return any(layer.name == "conv1" for layer in model.layers)


def _flatten_chw(model):
    """(C, H, W) of the map flattened before fc1, from the model's input shape."""
    image_shape = model.image_shape if hasattr(model, "image_shape") else model.input_shape[1:]
    return CNNShape(tuple(image_shape), num_classes=0).flatten_chw


def _layers(model):
    """(shared name, Keras layer, flatten_chw) of each layer holding weights, in the shared
    format's order; flatten_chw is fc1's in the CNN, else None."""
    cnn = _is_cnn(model)
    for name in shared_layers.layer_names(cnn):
        yield name, model.get_layer(name), _flatten_chw(model) if cnn and name == "fc1" else None


def export_weights(model):
    """The shared weights format: torch names and layouts, float32 numpy arrays.

    Keras keeps a dense kernel as (in, out) and a conv kernel as (kh, kw, in, out);
    torch as (out, in) and (out, in, kh, kw).
    """
    tensors = {}
    for name, layer, chw in _layers(model):
        tensors.update(shared_layers.to_shared(name, layer.get_weights(), layer.get_config(), chw))
    return tensors


def import_weights(model, tensors):
    """Load shared-format tensors (as validated by ``common.weights.load_weights``); every
    layer converts before any is assigned."""
    updates = []
    for name, layer, chw in _layers(model):
        try:
            updates.append((layer, shared_layers.from_shared(
                name, tensors, layer.weights[0].shape, layer.get_config(), chw)))
        except ConversionError as exc:
            raise WeightsError(f"the weights do not fit {model.name}'s {name}: {exc}") from None
    for layer, arrays in updates:
        layer.set_weights(arrays)
    return model
