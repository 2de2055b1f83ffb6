"""``compare``: run a torch model and its Keras twin on the same inputs, layer by layer.

Inputs are given in the Keras layout. torch gets them unchanged, or with the channel axis
moved from last to second (NHWC -> NCHW, (B, T, C) -> (B, C, T)) when the first layer that
reads the input is a channels-first one, a convolution, batch norm or pooling applied to
the input itself (``transfer.torch_input``); a torch model that transposes its input itself
(``self.conv(x.transpose(1, 2))``) gets the array as it is. ``torch_inputs`` overrides this.

Every layer found on both sides under the same name (``transfer.torch_layers`` /
``keras_layers``) is recorded: torch's by forward hooks, Keras's by wrapping the layer's
``call`` for one eager call of the model, which works for Functional, Sequential and
Subclassing models alike. Outputs are brought to the Keras layout before they are compared:
channels-first maps to channels-last, a flattened (C, H, W) map to (H, W, C) order, a
recurrent layer's (output, state) tuple to its sequence, or to the last step when the Keras
layer returns only that (Bidirectional: the forward half's last step, the backward half's
first); an activation fused into the Keras layer (``Conv2D(activation="relu")``) is applied
to torch's output. A layer called n times gives n rows.
"""
from collections import namedtuple

import numpy as np
import torch

import keras  # after torch

from porting.layers import CHANNELS_FIRST, RECURRENT, keras_layers, torch_input, torch_layers


Row = namedtuple("Row", "layer torch keras shape max_abs_diff")


class Report:
    """One ``Row`` per recorded layer output in torch's execution order, then the models'
    outputs ("(output)"): layer name, torch type, Keras type, Keras shape, max |difference|."""

    def __init__(self, rows, atol):
        self.rows, self.atol = rows, atol

    @property
    def first_divergence(self):
        """The first row whose difference exceeds atol (NaN: shapes that could not be
        aligned), or None."""
        return next((row for row in self.rows if not row.max_abs_diff <= self.atol), None)

    @property
    def max_abs_diff(self):
        """The models' outputs' difference (the last row)."""
        return self.rows[-1].max_abs_diff

    def __str__(self):
        cells = [Row._fields] + [(*r[:3], "x".join(map(str, r.shape)), f"{r.max_abs_diff:.2e}")
                                 for r in self.rows]
        widths = [max(len(str(c[i])) for c in cells) for i in range(5)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        first = self.first_divergence
        lines.append(f"all layers within atol={self.atol:g}" if first is None else
                     f"first layer beyond atol={self.atol:g}: {first.layer} "
                     f"({first.max_abs_diff:.2e})")
        return "\n".join(lines)

    __repr__ = __str__


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _numpy(value):
    value = _first(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return keras.ops.convert_to_numpy(value).astype(np.float64)


def _torch_as_keras(module, inputs, output, keras_shape):
    """A torch layer's output in the Keras layer's layout."""
    out = _numpy(output)
    name = type(module).__name__
    if getattr(module, "batch_first", None) is False:  # RNNs, MultiheadAttention
        out = out.swapaxes(0, 1)
    if name in RECURRENT:
        if len(keras_shape) == 2:  # Keras returns the last step only
            h = module.hidden_size
            out = np.concatenate([out[:, -1, :h], out[:, 0, h:]], axis=-1)
    elif CHANNELS_FIRST.fullmatch(name) and out.ndim >= 3:
        out = np.moveaxis(out, 1, -1)
    elif name == "Flatten" and inputs and inputs[0].dim() == 4 and out.ndim == 2:
        out = _numpy(inputs[0]).transpose(0, 2, 3, 1).reshape(out.shape)
    return out


def _fused_activation(module, layer):
    """The activation a Keras layer applies after its weights (Dense(activation="relu"));
    torch applies it outside the module, so it is applied to torch's output to compare."""
    activation = layer.get_config().get("activation")
    if type(module).__name__ in RECURRENT or activation in (None, "linear"):
        return None
    return activation


def _diff(t, k):
    """max |t - k|, t brought to k's shape by moving its channels last or its time axis
    second (time-major torch data) when it has another; NaN when neither fits."""
    for candidate in (t, np.moveaxis(t, 1, -1) if t.ndim >= 3 else t,
                      t.swapaxes(0, 1) if t.ndim >= 2 else t):
        if candidate.shape == k.shape:
            return float(np.max(np.abs(candidate - k))) if k.size else 0.0
    return float("nan")


def compare(torch_model, keras_model, inputs, atol=1e-5, torch_inputs=None):
    """Run both models on ``inputs`` (Keras layout; see the module docstring for torch's) in
    inference mode and return a ``Report`` of every same-named layer's max |difference|,
    naming the first beyond ``atol``."""
    x = np.asarray(inputs)
    device = next(iter(torch_model.parameters()), torch.empty(0)).device
    tx = (torch_input(torch_model, x) if torch_inputs is None else
          torch.as_tensor(torch_inputs, device=device))
    torch_side, keras_side = torch_layers(torch_model), keras_layers(keras_model)
    shared = [p for p in torch_side if p and p in keras_side]
    torch_calls, keras_calls = [], {p: [] for p in shared}
    hooks = [torch_side[p].register_forward_hook(
        lambda m, args, out, p=p: torch_calls.append((p, m, args, out))) for p in shared]
    training = torch_model.training
    try:
        for p in shared:  # an instance attribute, shadowing the class's call until removed
            keras_side[p].call = _recording(keras_side[p].call, keras_calls[p])
        with torch.no_grad():
            torch_out = torch_model.eval()(tx)
        keras_out = keras_model(x, training=False)
    finally:
        torch_model.train(training)
        for hook in hooks:
            hook.remove()
        for p in shared:
            vars(keras_side[p]).pop("call", None)
    rows, seen = [], {}
    for path, module, args, out in torch_calls:
        index = seen[path] = seen.get(path, -1) + 1
        if index >= len(keras_calls[path]):
            continue
        layer, k = keras_side[path], _numpy(keras_calls[path][index])
        t = _torch_as_keras(module, args, out, k.shape)
        keras_type, activation = type(layer).__name__, _fused_activation(module, layer)
        if activation:
            t = keras.ops.convert_to_numpy(keras.activations.get(activation)(t))
            keras_type = f"{keras_type}+{activation}"
        label = path if len(keras_calls[path]) == 1 else f"{path}[{index}]"
        rows.append(Row(label, type(module).__name__, keras_type, k.shape, _diff(t, k)))
    k = _numpy(keras_out)
    rows.append(Row("(output)", type(torch_model).__name__, type(keras_model).__name__,
                 k.shape, _diff(_numpy(torch_out), k)))
    return Report(rows, atol)


def _recording(call, calls):
    def record(*args, **kwargs):
        out = call(*args, **kwargs)
        calls.append(out)
        return out
    return record
