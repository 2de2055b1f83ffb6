"""Recurrent layers: torch ``nn.LSTM`` / ``nn.GRU`` and Keras ``LSTM`` / ``GRU``, one layer and
one direction per conversion (a Keras recurrent layer is one direction of one layer; a
``Bidirectional`` wraps two, a stack of them makes a multi-layer torch RNN).

=====================  ==============================  ==================================
what                   PyTorch (per layer/direction)   Keras 3 / this project's TF1
=====================  ==============================  ==================================
input weights          weight_ih (G*H, I)              kernel (I, G*H)
recurrent weights      weight_hh (G*H, H)              recurrent_kernel (H, G*H)
LSTM gates             i, f, g, o                      i, f, c, o (the same order)
LSTM biases            bias_ih + bias_hh (both 4H)     bias (4H,) = their sum
GRU gates              r, z, n                         z, r, h (swap the first two blocks)
GRU biases             bias_ih, bias_hh (both 3H)      bias (2, 3H) = rows (input, recurrent)
names                  *_l{layer}, *_l{layer}_reverse  Bidirectional forward/backward_layer
=====================  ==============================  ==================================

The converters take torch's tensors without the layer/direction suffix (``weight_ih``, ...);
``split_rnn_state_dict`` and ``join_rnn_state_dict`` cut a whole module's state dict into
those parts and put them back. Keras ``GRU(reset_after=False)`` applies the reset gate before
the recurrent matmul and cannot express torch's GRU, so it is refused, as are projections
(``proj_size``), and any difference in hidden size, biases or activations.

TF1's own ``LSTMCell``/``BlockLSTM`` checkpoints store one kernel (I+H, 4H) in the order
i, j(=c), f, o and add ``forget_bias=1.0`` at run time: ``lstm_tf1_checkpoint_to_keras``
reorders the gates and folds that constant into the bias.
"""
import re

import numpy as np

from .base import ConversionError, Converter, expect_equal, expect_shape, register

DIRECTIONS = ("forward", "backward")  # torch suffix "" and "_reverse"
TORCH_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_SUFFIXED = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")
_GATES = {"LSTM": 4, "GRU": 3}
_TF1_LSTM_ORDER = [0, 2, 1, 3]  # i, j, f, o <-> i, f, j, o (its own inverse)


def split_rnn_state_dict(state_dict):
    """{"weight_ih_l0": ..., "bias_hh_l1_reverse": ...} -> {(layer, direction): {"weight_ih":
    ..., ...}}, ordered by layer then forward/backward: the per-layer, per-direction parts
    that ``to_keras`` takes, one per Keras LSTM/GRU (or Bidirectional half)."""
    parts = {}
    for key, value in state_dict.items():
        match = _SUFFIXED.match(key)
        if match is None:
            raise ConversionError(f"{key} is not an nn.LSTM/nn.GRU tensor name such as "
                                  "weight_ih_l0 or bias_hh_l1_reverse (projections, "
                                  "proj_size > 0, have no Keras twin: use proj_size=0)")
        name, layer, reverse = match.groups()
        parts.setdefault((int(layer), DIRECTIONS[bool(reverse)]), {})[name] = value
    return dict(sorted(parts.items(), key=lambda kv: (kv[0][0], DIRECTIONS.index(kv[0][1]))))


def join_rnn_state_dict(parts):
    """The inverse of ``split_rnn_state_dict``: per-(layer, direction) tensors (as
    ``to_torch`` returns them) -> one state dict with torch's suffixed names."""
    return {f"{name}_l{layer}{'_reverse' if direction == 'backward' else ''}": value
            for (layer, direction), tensors in parts.items() for name, value in tensors.items()}


def _check_configs(kind, torch_config, keras_config):
    """Refuse a pair of configurations that do not compute the same recurrence."""
    if torch_config.get("mode", kind) != kind:
        raise ConversionError(f"a torch {torch_config['mode']} is not a Keras {kind}; convert "
                              f"it with lookup({torch_config['mode']!r})")
    if torch_config.get("proj_size", 0):
        raise ConversionError(f"torch LSTM proj_size={torch_config['proj_size']} projects h and "
                              "has no Keras twin; use proj_size=0")
    expect_equal("hidden size", torch_config["hidden_size"], keras_config["units"],
                 "give the Keras layer units=hidden_size")
    expect_equal("bias", torch_config.get("bias", True), keras_config["use_bias"],
                 "set Keras use_bias to torch's bias")
    fix = f"torch's {kind} always uses tanh and sigmoid: keep Keras's defaults"
    expect_equal("activation", "tanh", keras_config["activation"], fix)
    expect_equal("recurrent_activation", "sigmoid", keras_config["recurrent_activation"], fix)
    if kind == "GRU" and not keras_config["reset_after"]:
        raise ConversionError("Keras GRU reset_after=False resets h before the recurrent matmul "
                              "and cannot express torch's GRU; use reset_after=True")


def _torch_tensors(kind, tensors, torch_config):
    """weight_ih, weight_hh, bias_ih, bias_hh (biases None without bias), shapes asserted;
    the input size is read from weight_ih (it is H * directions above the first layer)."""
    names = TORCH_NAMES if torch_config.get("bias", True) else TORCH_NAMES[:2]
    if set(tensors) != set(names):
        raise ConversionError(f"expected the tensors {', '.join(names)} of one layer and "
                              f"direction, got {', '.join(sorted(tensors))}; split a whole "
                              "module's state dict with split_rnn_state_dict first")
    rows = _GATES[kind] * torch_config["hidden_size"]
    w_ih = np.asarray(tensors["weight_ih"])
    expect_shape("weight_ih", w_ih, (rows, w_ih.shape[-1]))
    w_hh = expect_shape("weight_hh", np.asarray(tensors["weight_hh"]), (rows, rows // _GATES[kind]))
    biases = [expect_shape(n, np.asarray(tensors[n]), (rows,)) for n in names[2:]] or [None, None]
    return w_ih, w_hh, *biases


def _keras_weights(kind, weights, keras_config):
    """kernel, recurrent_kernel, bias (None without bias), shapes asserted."""
    rows = _GATES[kind] * keras_config["units"]
    if len(weights) != 2 + keras_config["use_bias"]:
        raise ConversionError(f"a Keras {kind} with use_bias={keras_config['use_bias']} has "
                              f"{2 + keras_config['use_bias']} weights, got {len(weights)}")
    kernel = np.asarray(weights[0])
    expect_shape("kernel", kernel, (kernel.shape[0], rows))
    recurrent = expect_shape("recurrent_kernel", np.asarray(weights[1]),
                             (keras_config["units"], rows))
    bias_shape = (2, rows) if kind == "GRU" else (rows,)
    bias = expect_shape("bias", np.asarray(weights[2]), bias_shape) if len(weights) == 3 else None
    return kernel, recurrent, bias


def _swap_r_z(a):
    """GRU gate blocks along the last axis: torch r, z, n <-> Keras z, r, h (self-inverse)."""
    r, z, n = np.split(a, 3, axis=-1)
    return np.ascontiguousarray(np.concatenate([z, r, n], axis=-1))


def lstm_to_keras(tensors, torch_config, keras_config):
    """Transpose both matrices, keep the gate order, sum the two biases into one."""
    _check_configs("LSTM", torch_config, keras_config)
    w_ih, w_hh, b_ih, b_hh = _torch_tensors("LSTM", tensors, torch_config)
    out = [np.ascontiguousarray(w_ih.T), np.ascontiguousarray(w_hh.T)]
    return out + ([b_ih + b_hh] if b_ih is not None else [])


def lstm_to_torch(weights, torch_config, keras_config):
    """Transpose back; the one bias goes to bias_ih and bias_hh is zero (same sum)."""
    _check_configs("LSTM", torch_config, keras_config)
    kernel, recurrent, bias = _keras_weights("LSTM", weights, keras_config)
    out = {"weight_ih": np.ascontiguousarray(kernel.T),
           "weight_hh": np.ascontiguousarray(recurrent.T)}
    if bias is not None:
        out.update(bias_ih=bias.copy(), bias_hh=np.zeros_like(bias))
    return out


def gru_to_keras(tensors, torch_config, keras_config):
    """Transpose, swap the r/z gate blocks, stack the two biases as rows (input, recurrent)."""
    _check_configs("GRU", torch_config, keras_config)
    w_ih, w_hh, b_ih, b_hh = _torch_tensors("GRU", tensors, torch_config)
    out = [_swap_r_z(w_ih.T), _swap_r_z(w_hh.T)]
    return out + ([np.stack([_swap_r_z(b_ih), _swap_r_z(b_hh)])] if b_ih is not None else [])


def gru_to_torch(weights, torch_config, keras_config):
    """Swap the z/r blocks back, transpose, unstack the bias rows."""
    _check_configs("GRU", torch_config, keras_config)
    kernel, recurrent, bias = _keras_weights("GRU", weights, keras_config)
    out = {"weight_ih": _swap_r_z(kernel).T.copy(), "weight_hh": _swap_r_z(recurrent).T.copy()}
    if bias is not None:
        out.update(bias_ih=_swap_r_z(bias[0]), bias_hh=_swap_r_z(bias[1]))
    return out


def lstm_tf1_checkpoint_to_keras(kernel, bias, input_size, forget_bias=1.0):
    """A TF1 ``LSTMCell``/``BlockLSTM`` kernel (I+H, 4H) and bias (4H,), gates i, j, f, o with
    ``forget_bias`` added at run time -> Keras [kernel, recurrent_kernel, bias] (i, f, c, o,
    the constant folded into the forget block of the bias)."""
    kernel, bias = np.asarray(kernel), np.asarray(bias)
    units = kernel.shape[-1] // 4
    expect_shape("TF1 LSTM kernel", kernel, (input_size + units, 4 * units))
    expect_shape("TF1 LSTM bias", bias, (4 * units,))
    kernel, bias = _reorder_tf1(kernel), _reorder_tf1(bias)
    bias[units:2 * units] += forget_bias
    return [kernel[:input_size].copy(), kernel[input_size:].copy(), bias]


def lstm_keras_to_tf1_checkpoint(weights, forget_bias=1.0):
    """The inverse of ``lstm_tf1_checkpoint_to_keras``: -> (kernel (I+H, 4H), bias (4H,))."""
    kernel, recurrent, bias = (np.asarray(w) for w in weights)
    units = recurrent.shape[0]
    expect_shape("recurrent_kernel", recurrent, (units, 4 * units))
    expect_shape("kernel", kernel, (kernel.shape[0], 4 * units))
    bias = expect_shape("bias", bias, (4 * units,)).copy()
    bias[units:2 * units] -= forget_bias
    return _reorder_tf1(np.concatenate([kernel, recurrent])), _reorder_tf1(bias)


def _reorder_tf1(a):
    """LSTM gate blocks along the last axis: TF1 i, j, f, o <-> Keras i, f, j, o."""
    blocks = np.split(a, 4, axis=-1)
    return np.concatenate([blocks[i] for i in _TF1_LSTM_ORDER], axis=-1)


# torch's and Keras's class names are the same ("LSTM", "GRU"), and register() refuses a name
# given twice: each is listed once, under torch_types, and lookup() finds it for both.
LSTM = register(Converter(
    ("LSTM",), (), ("kernel", "recurrent_kernel", "bias"), lstm_to_keras, lstm_to_torch,
    "weight_ih/hh (4H, in) -> kernel/recurrent_kernel .T, same gates i,f,g,o; "
    "bias = bias_ih + bias_hh"))
GRU = register(Converter(
    ("GRU",), (), ("kernel", "recurrent_kernel", "bias"), gru_to_keras, gru_to_torch,
    "weight_ih/hh (3H, in) -> .T with gates r,z,n -> z,r,h; "
    "bias (2, 3H) = stack(bias_ih, bias_hh); reset_after=True only"))
