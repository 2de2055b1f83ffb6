"""The recurrent sequence classifier in Keras 3, in all three model-building APIs, and its
weights in the shared format.

Twins: ``torch_impl/rnn_models.py`` (``nn.LSTM`` / ``nn.GRU``) and
``tf1_compat/rnn_models.py`` (the cell equations with ``get_variable`` and ``tf.scan``).
Sizes come from ``common.config`` (``RNN_HIDDEN``, ``RNN_LAYERS``). The same network three
ways, as in ``tf2_impl/models.py``: Sequential, Functional and Subclassing
(``RNNClassifier``), built with ``build_rnn(..., api=...)``.

The layer named ``rnn`` is the whole recurrent part, as torch's one ``nn.LSTM`` module is:
a ``layers.LSTM`` / ``layers.GRU``, wrapped in ``layers.Bidirectional`` when asked (its
output is [forward, backward] concatenated, the forward half's state after the last step
and the backward half's after the first: torch's final ``h_n``); with ``RNN_LAYERS`` > 1 a
Sequential of them, each returning its whole sequence to the next (``return_sequences=True``)
but the last. Keras's recurrent layers read (N, T, F), batch first, the only layout they
take. ``fc`` maps the final hidden state to the logits (no softmax: ``models.py`` says why).

The shared weights format is torch's ``state_dict`` (``rnn.weight_ih_l0``, ...):
``export_weights`` / ``import_weights`` convert one layer and direction at a time through
``common.converters`` (``recurrent.py`` tabulates the layouts). A torch LSTM has two biases
that only ever appear as their sum, Keras's LSTM one: a torch file comes in as the sum, and
goes back out with the whole sum in ``bias_ih`` and ``bias_hh`` zero (the same function).
"""
import keras
import numpy as np
from keras import layers

from common import config
from common.converters import ConversionError, lookup
from common.converters.base import expect_shape
from common.converters.recurrent import join_rnn_state_dict, split_rnn_state_dict
from common.errors import WeightsError
from tf2_impl.models import output_dtype  # float32 logits under mixed precision

__all__ = ["RNNClassifier", "build_rnn", "export_weights", "import_weights"]


def _recurrent_layer(cell, bidirectional, return_sequences, name):
    """One layer of the recurrent stack: LSTM or GRU, one or two directions."""
    units, inner = config.RNN_HIDDEN, cell if bidirectional else name
    if cell == "lstm":
        rnn = layers.LSTM(units, return_sequences=return_sequences, name=inner)
    else:
        # reset_after=True (Keras 3's default, spelled out): the reset gate multiplies the
        # recurrent product, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), which is torch's
        # GRU. reset_after=False (Keras 2's default under TF1) resets h before the product
        # and no torch weights express it: the converter refuses it.
        rnn = layers.GRU(units, reset_after=True, return_sequences=return_sequences, name=inner)
    if bidirectional:  # merge_mode "concat": [forward, backward]
        return layers.Bidirectional(rnn, name=name)
    return rnn


def _rnn(cell, bidirectional):
    """The layer named ``rnn``: torch's ``nn.LSTM(..., num_layers=RNN_LAYERS)``. Every layer
    but the last returns its whole output sequence, the input of the next."""
    n = config.RNN_LAYERS
    if n == 1:
        return _recurrent_layer(cell, bidirectional, False, "rnn")
    return keras.Sequential([_recurrent_layer(cell, bidirectional, k < n - 1, f"l{k}")
                             for k in range(n)], name="rnn")


# -- the three APIs ------------------------------------------------------------------------
class RNNClassifier(keras.Model):
    """(N, T, F) sequences -> rnn (LSTM or GRU) -> final hidden state -> fc -> logits."""

    def __init__(self, num_features, num_classes, cell="lstm", bidirectional=False, **kwargs):
        super().__init__(name="rnn_classifier", **kwargs)
        self.rnn = _rnn(cell, bidirectional)
        self.fc = layers.Dense(num_classes, name="fc", dtype=output_dtype())
        self(np.zeros((1, 1, num_features), np.float32))  # creates the weights (any length T)

    def call(self, x, training=None):  # x: (N, T, F); no dropout: `training` is unused
        x = self.rnn(x)  # the final hidden state, (N, hidden * directions)
        return self.fc(x)  # logits: the loss applies log-softmax itself


def _rnn_sequential(num_features, num_classes, cell, bidirectional):
    return keras.Sequential([
        keras.Input(shape=(None, num_features)),  # any number of time steps
        _rnn(cell, bidirectional),
        layers.Dense(num_classes, name="fc", dtype=output_dtype()),
    ], name="rnn_sequential")


def _rnn_functional(num_features, num_classes, cell, bidirectional):
    inputs = keras.Input(shape=(None, num_features), name="sequences")
    x = _rnn(cell, bidirectional)(inputs)
    outputs = layers.Dense(num_classes, name="fc", dtype=output_dtype())(x)  # logits
    return keras.Model(inputs, outputs, name="rnn_functional")


def build_rnn(num_features, num_classes, cell="lstm", bidirectional=False, api="subclassing"):
    """The recurrent classifier in one of ``models.APIS`` for sequences of `num_features`
    features per step, built (its weights exist)."""
    builders = {"sequential": _rnn_sequential, "functional": _rnn_functional,
                "subclassing": RNNClassifier}
    return builders[api](num_features, num_classes, cell, bidirectional)


# -- the shared weights format -------------------------------------------------------------
def _directions(model):
    """{(layer, direction): Keras LSTM/GRU} of the ``rnn`` layer, in torch's order (the keys
    of ``split_rnn_state_dict``)."""
    rnn = model.get_layer("rnn")
    stack = rnn.layers if isinstance(rnn, keras.Sequential) else [rnn]
    halves = {}
    for k, layer in enumerate(stack):
        if isinstance(layer, layers.Bidirectional):
            halves[k, "forward"], halves[k, "backward"] = layer.forward_layer, layer.backward_layer
        else:
            halves[k, "forward"] = layer
    return halves


def _torch_config(layer):
    """What the converter reads of the torch module twin of a Keras layer (its attributes)."""
    if isinstance(layer, layers.Dense):
        return {"in_features": layer.kernel.shape[0], "out_features": layer.units, "bias": True}
    return {"mode": type(layer).__name__, "hidden_size": layer.units, "bias": layer.use_bias,
            "proj_size": 0}


def _to_torch(layer):
    """One Keras layer's weights as its torch twin's tensors (names without the prefix)."""
    return lookup(type(layer).__name__).to_torch(layer.get_weights(), _torch_config(layer),
                                                  layer.get_config())


def _to_keras(layer, tensors):
    """One Keras layer's weights (``get_weights()`` order) from its torch twin's tensors."""
    arrays = lookup(type(layer).__name__).to_keras(tensors, _torch_config(layer),
                                                   layer.get_config())
    return [expect_shape(w.path, a, w.shape) for w, a in zip(layer.weights, arrays, strict=True)]


def export_weights(model):
    """The shared weights format: torch names and layouts, float32 numpy arrays.

    Keras keeps a kernel as (in, gates * hidden), torch as (gates * hidden, in); the GRU's
    gates are ordered z, r, h in Keras and r, z, n in torch; the LSTM's one bias becomes
    ``bias_ih`` with a zero ``bias_hh``."""
    parts = {key: _to_torch(layer) for key, layer in _directions(model).items()}
    tensors = {f"rnn.{name}": array for name, array in join_rnn_state_dict(parts).items()}
    fc = _to_torch(model.get_layer("fc"))
    tensors.update({f"fc.{name}": array for name, array in fc.items()})
    return {name: np.asarray(array, dtype=np.float32) for name, array in tensors.items()}


def import_weights(model, tensors):
    """Load shared-format tensors (as validated by ``common.weights.load_weights``); every
    layer converts before any is assigned."""
    halves = _directions(model)
    rnn = {name[len("rnn."):]: array for name, array in tensors.items() if name.startswith("rnn.")}
    parts = [(halves[key], part) for key, part in split_rnn_state_dict(rnn).items()]
    fc = {"weight": tensors["fc.weight"], "bias": tensors["fc.bias"]}
    parts.append((model.get_layer("fc"), fc))
    try:
        updates = [(layer, _to_keras(layer, part)) for layer, part in parts]
    except ConversionError as exc:
        raise WeightsError(f"the weights do not fit {model.name}: {exc}") from None
    for layer, arrays in updates:
        layer.set_weights(arrays)
    return model
