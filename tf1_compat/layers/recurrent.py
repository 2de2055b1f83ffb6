"""TF1-style LSTM and GRU: ``get_variable`` plus ``tf.scan`` over time-major sequences.

``tf.compat.v1.nn.rnn_cell`` is gone under Keras 3, so the cells are written out. Their
variables use the Keras layout and gate order, so ``common.converters.recurrent`` fills them:

* LSTM: ``kernel`` (I, 4H), ``recurrent_kernel`` (H, 4H), ``bias`` (4H,), gates i, f, c, o
  (torch's i, f, g, o) and **no** ``forget_bias``. This is not TF1's own ``LSTMCell`` /
  ``BlockLSTM``, which used i, j(=c), f, o and added ``forget_bias=1.0`` at run time: convert
  such a checkpoint with ``lstm_tf1_checkpoint_to_keras`` first.
* GRU: ``kernel`` (I, 3H), ``recurrent_kernel`` (H, 3H), ``bias`` (2, 3H) = rows (input,
  recurrent), gates z, r, h, Keras's ``reset_after=True`` formula (torch's GRU).

Build inside ``with tf.Graph().as_default():`` and run in a ``tf.compat.v1.Session()``.
"""
import tensorflow as tf

from common.converters.recurrent import DIRECTIONS

tf1 = tf.compat.v1


def lstm_cell(x_t, state, kernel, recurrent_kernel, bias=None):
    """One LSTM step: x_t (B, I), state (h, c) each (B, H) -> new (h, c).

    z = x W + h U + b split as i, f, c~, o; c' = s(f) c + s(i) tanh(c~); h' = s(o) tanh(c').
    Keras's (and torch's) gate order and one bias, with no forget_bias added at run time:
    not TF1's LSTMCell layout (i, j, f, o, forget_bias=1.0)."""
    h, c = state
    z = tf.matmul(x_t, kernel) + tf.matmul(h, recurrent_kernel)
    if bias is not None:
        z += bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def gru_cell(x_t, state, kernel, recurrent_kernel, bias=None):
    """One GRU step: x_t (B, I), state (h,) with h (B, H) -> (h',).

    With x W + b_in and h U + b_rec each split as z, r, h: z, r = s(x_z + h_z), s(x_r + h_r);
    h~ = tanh(x_h + r * h_h) (reset after the recurrent matmul); h' = z h + (1 - z) h~."""
    (h,) = state
    x_w, h_u = tf.matmul(x_t, kernel), tf.matmul(h, recurrent_kernel)
    if bias is not None:
        x_w, h_u = x_w + bias[0], h_u + bias[1]
    x_z, x_r, x_h = tf.split(x_w, 3, axis=-1)
    h_z, h_r, h_h = tf.split(h_u, 3, axis=-1)
    z, r = tf.sigmoid(x_z + h_z), tf.sigmoid(x_r + h_r)
    return (z * h + (1 - z) * tf.tanh(x_h + r * h_h),)


CELLS = {"lstm": (lstm_cell, 4, 2), "gru": (gru_cell, 3, 1)}  # step, gates, state tensors


def scope_name(name, layer, direction):
    """The variable scope of one layer and direction of ``rnn(..., name=name)``: its variables
    are ``<scope>/kernel``, ``<scope>/recurrent_kernel``, ``<scope>/bias``."""
    return f"{name}/layer{layer}/{direction}"


def rnn_direction(x, cell, units, scope, reverse=False, use_bias=True):
    """One direction of one layer over a time-major x (T, B, I).

    Returns (outputs (T, B, H), final state: (h, c) for "lstm", (h,) for "gru", each (B, H)).
    reverse=True (torch's ``_reverse``, Keras's backward layer) scans from the last step to
    the first; its outputs stay aligned with x's steps and its final state is after step 0."""
    step, gates, n_state = CELLS[cell]
    with tf1.variable_scope(scope):
        shape = (gates * units,)
        kernel = tf1.get_variable("kernel", (x.shape[-1],) + shape, x.dtype)
        recurrent = tf1.get_variable("recurrent_kernel", (units,) + shape, x.dtype)
        bias = None
        if use_bias:
            bias = tf1.get_variable("bias", ((2,) if cell == "gru" else ()) + shape, x.dtype)
    zeros = tuple(tf.zeros(tf.stack([tf.shape(x)[1], units]), x.dtype) for _ in range(n_state))
    states = tf.scan(lambda state, x_t: step(x_t, state, kernel, recurrent, bias), x,
                     initializer=zeros, reverse=reverse)
    return states[0], tuple(s[0] if reverse else s[-1] for s in states)


def rnn(x, cell, units, name, num_layers=1, bidirectional=False, batch_first=True, use_bias=True):
    """torch's ``nn.LSTM``/``nn.GRU`` (``cell`` "lstm" or "gru") as a TF1 graph.

    x: (B, T, I) if batch_first else (T, B, I), torch's two layouts. Returns (outputs, states):
    outputs in x's layout with H * (2 if bidirectional else 1) features, the forward and
    backward halves concatenated as torch and Keras's Bidirectional do; states:
    {(layer, direction): (h, c) or (h,)}, the keys of ``split_rnn_state_dict``."""
    directions = DIRECTIONS if bidirectional else DIRECTIONS[:1]
    states = {}
    h = tf.transpose(x, (1, 0, 2)) if batch_first else x
    for layer in range(num_layers):
        outputs = []
        for direction in directions:
            out, states[layer, direction] = rnn_direction(
                h, cell, units, scope_name(name, layer, direction),
                reverse=direction == "backward", use_bias=use_bias)
            outputs.append(out)
        h = tf.concat(outputs, axis=-1)
    return (tf.transpose(h, (1, 0, 2)) if batch_first else h), states
