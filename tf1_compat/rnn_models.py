"""The recurrent sequence classifier as a TF1-style graph, and its shared-format weights.

Twins: ``torch_impl/rnn_models.py`` (``nn.LSTM``/``nn.GRU``) and ``tf2_impl/rnn_models.py``
(Keras ``layers.LSTM``/``layers.GRU``); the MLP and CNN siblings are in
``tf1_compat/models.py``. ``tf.compat.v1.nn.rnn_cell`` is not available with Keras 3, so the
recurrent layer is ``tf1_compat/layers/recurrent.py``: one cell function per cell type
(``lstm_cell``, ``gru_cell``: the gate order and the absent ``forget_bias`` are explained
there), run over the time-major sequence by ``tf.scan``.

``rnn_classifier`` is the graph function, in the style of slim's nets: a tensor in, logits
out, no placeholders. ``build_rnn`` puts the placeholders around it and returns what a
runner feeds and fetches (``RNNGraphModel``), as ``models.build_cnn`` does. Build inside
``with tf.Graph().as_default():``; it works with and without ``disable_v2_behavior``.

Variables take the Keras names and layouts (G gates: 4 for the LSTM, 3 for the GRU; H =
``RNN_HIDDEN``; D = 2 directions if bidirectional, else 1; F features; C classes), and
``common.converters`` maps them onto torch's ``state_dict``:

=======================================  ===========  =================================
TF1 variable                             TF1 shape    shared (torch) name and shape
=======================================  ===========  =================================
``rnn/layer0/forward/kernel``            (F, G*H)     ``rnn.weight_ih_l0`` (G*H, F)
``rnn/layer0/forward/recurrent_kernel``  (H, G*H)     ``rnn.weight_hh_l0`` (G*H, H)
``rnn/layer0/forward/bias`` (LSTM)       (4H,)        ``rnn.bias_ih_l0`` + ``bias_hh_l0``
``rnn/layer0/forward/bias`` (GRU)        (2, 3H)      rows ``rnn.bias_ih_l0``, ``bias_hh_l0``
``rnn/layer0/backward/...``              as forward   ``rnn.*_l0_reverse``
``fc/kernel``                            (D*H, C)     ``fc.weight`` (C, D*H)
``fc/bias``                              (C,)         ``fc.bias`` (C,)
=======================================  ===========  =================================

The GRU's gate blocks are z, r, h here and r, z, n in torch (the converter swaps the first
two). torch's LSTM adds two biases that always appear as their sum; this graph has one, so
``export_weights`` writes the sum into ``bias_ih`` and zeros into ``bias_hh``: torch ->
TF1 -> torch gives the same function, not the same two vectors.
"""
from collections import namedtuple

import numpy as np
import tensorflow as tf

from common import config
from common.converters import lookup
from common.converters.recurrent import DIRECTIONS, join_rnn_state_dict, split_rnn_state_dict
from tf1_compat.layers import recurrent
from tf1_compat.models import _start_model, _variables_since, dense
from tf1_compat.recipes import float32_variables

tf1 = tf.compat.v1

RNNGraphModel = namedtuple("RNNGraphModel", [
    "inputs",         # placeholder: (N, T, F) float32, batch first, any number of steps T
    "targets",        # placeholder: (N,) int64 class indices
    "training",       # placeholder_with_default(False, []): train.feed sets it; no op reads it
    "outputs",        # (N, classes) logits, no softmax
    "variables",      # {"rnn/layer0/forward/kernel": tf.Variable, ...}, in the shared order
    "cell",           # "lstm" or "gru"
    "bidirectional",  # whether there are backward variables
])


# -- model ---------------------------------------------------------------------------------
def rnn_classifier(inputs, num_classes, cell="lstm", bidirectional=False):
    """inputs (N, T, F) batch first -> logits (N, num_classes).

    rnn: ``recurrent.rnn`` (LSTM or GRU, ``RNN_HIDDEN`` units, ``RNN_LAYERS`` layers, forward
    and backward if `bidirectional`) reads the whole sequence; the classifier takes the last
    layer's final hidden state h (N, H): the forward direction's after step T (its output
    at the last step) and, if bidirectional, the backward one's after step 1, concatenated
    [forward, backward] (N, 2H), as torch's ``h_n`` and Keras's ``Bidirectional`` give.
    fc: (N, D*H) -> (N, num_classes).

    The initial weights follow the TF1 PTB tutorial's idiom, an initializer on the variable
    scope that every ``get_variable`` inside inherits: U(-1/sqrt(H), 1/sqrt(H)) for all three
    variables, torch's default for ``nn.LSTM``/``nn.GRU`` (Keras starts from Glorot,
    orthogonal and zero-with-unit-forget-bias instead). fc starts like ``models.dense``.
    """
    scale = 1.0 / np.sqrt(config.RNN_HIDDEN)
    uniform = tf1.random_uniform_initializer(-scale, scale)
    # Re-entering the current variable scope only adds the initializer: the variables keep
    # the names rnn/layer0/forward/kernel, ... that the converters map.
    with tf.name_scope("rnn"), tf1.variable_scope(tf1.get_variable_scope(), initializer=uniform):
        _, states = recurrent.rnn(inputs, cell, config.RNN_HIDDEN, "rnn", config.RNN_LAYERS,
                                  bidirectional, batch_first=True)
        last = config.RNN_LAYERS - 1
        # states[layer, direction] = (h, c) for the LSTM, (h,) for the GRU, each (N, H).
        h = tf.concat([states[last, d][0] for d in DIRECTIONS[:1 + bidirectional]], axis=-1)
    return dense(h, num_classes, "fc")  # logits: the loss applies the softmax itself


def build_rnn(num_features, num_classes, cell="lstm", bidirectional=False, dtype=tf.float32):
    """Recurrent classification graph: inputs (N, T, num_features) -> logits (N, num_classes)
    (``rnn_classifier``), with its placeholders and variables. `dtype`: the dtype the cells
    compute in (--mixed-precision: bfloat16 from float32 variables); the logits are float32."""
    existing, training = _start_model()
    inputs = tf1.placeholder(tf.float32, [None, None, num_features], name="inputs")
    targets = tf1.placeholder(tf.int64, [None], name="targets")
    with float32_variables():  # the cells ask get_variable for their input's dtype
        logits = tf.cast(rnn_classifier(tf.cast(inputs, dtype), num_classes, cell, bidirectional),
                         tf.float32)
    return RNNGraphModel(inputs=inputs, targets=targets, training=training, outputs=logits,
                         variables=_variables_since(existing), cell=cell,
                         bidirectional=bidirectional)


# -- shared weights ------------------------------------------------------------------------
def _layers(model):
    """{part: (converter, torch_config, keras_config, [TF variables in the converter's
    order])}, one part per recurrent layer and direction ((0, "forward"), ...), then "fc".

    The Keras config is that of the layer the TF1 cells compute: tanh and sigmoid gates, a
    bias, and for the GRU ``reset_after=True`` (the reset gate after the recurrent matmul)."""
    rnn, linear = lookup(model.cell.upper()), lookup("Linear")
    hidden = config.RNN_HIDDEN
    rnn_configs = ({"mode": model.cell.upper(), "hidden_size": hidden, "bias": True, "proj_size": 0},
                   {"units": hidden, "use_bias": True, "activation": "tanh",
                    "recurrent_activation": "sigmoid", "reset_after": True})
    layers = {}
    for index in range(config.RNN_LAYERS):
        for direction in DIRECTIONS[:1 + model.bidirectional]:
            scope = recurrent.scope_name("rnn", index, direction)
            layers[index, direction] = (rnn, *rnn_configs,
                                        [model.variables[f"{scope}/{n}"] for n in rnn.keras_names])
    n_in, n_out = model.variables["fc/kernel"].shape.as_list()
    layers["fc"] = (linear, {"in_features": n_in, "out_features": n_out, "bias": True},
                    {"units": n_out, "use_bias": True},
                    [model.variables[f"fc/{n}"] for n in linear.keras_names])
    return layers


def export_weights(sess, model):
    """The model's variables as shared-format arrays (torch names and layouts)."""
    layers = _layers(model)
    values = sess.run({part: variables for part, (*_, variables) in layers.items()})
    parts = {part: converter.to_torch(values[part], torch_config, keras_config)
             for part, (converter, torch_config, keras_config, _) in layers.items()}
    fc = parts.pop("fc")
    tensors = {**{f"rnn.{name}": value for name, value in join_rnn_state_dict(parts).items()},
               **{f"fc.{name}": value for name, value in fc.items()}}
    return {name: np.asarray(value, dtype=np.float32) for name, value in tensors.items()}


def import_weights(sess, model, tensors):
    """Assign shared-format arrays (already validated by common.weights) to the variables,
    by re-running each initializer with its initial value fed, as ``models.import_weights``."""
    parts = split_rnn_state_dict({name.removeprefix("rnn."): value for name, value in tensors.items()
                                  if name.startswith("rnn.")})
    parts["fc"] = {name.removeprefix("fc."): value for name, value in tensors.items()
                   if name.startswith("fc.")}
    feed_dict, initializers = {}, []
    for part, (converter, torch_config, keras_config, variables) in _layers(model).items():
        values = converter.to_keras(parts[part], torch_config, keras_config)
        for variable, value in zip(variables, values, strict=True):
            feed_dict[variable.initial_value] = value
            initializers.append(variable.initializer)
    sess.run(initializers, feed_dict=feed_dict)
