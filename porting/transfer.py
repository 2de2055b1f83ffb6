"""``transfer``: copy a user's model's weights from torch to Keras 3 or back, layer by layer.

Layers are matched by name: a torch submodule's attribute path (``encoder.conv1``, as in
``named_modules``) against the Keras layer's attribute path in a Subclassing model, or its
``name`` in a Functional or Sequential model (nested models joined with ``.``). Only layers
that hold weights need a partner. Each pair converts through ``common.converters``: one
converter per layer type, which refuses a pair of configurations with no exact twin.

Recurrent layers: a torch ``nn.LSTM``/``nn.GRU`` at ``rnn`` pairs with the Keras layer
``rnn`` (a ``Bidirectional`` one when torch's is bidirectional); with ``num_layers=L`` it
pairs with ``rnn.0`` ... ``rnn.L-1`` (a Subclassing list attribute, or layers so named) or
``rnn_l0`` ... (torch's own suffixes; Keras on its torch backend refuses "." in names).

A Linear reading a flattened conv map needs its input rows permuted, since torch flattens
(C, H, W) and Keras (H, W, C); without it the shapes fit and the outputs are wrong. The tool
finds those Linears by running the torch model on a sample (``layers.flatten_inputs``) or is
told (``flatten_shape``); its converter then permutes the rows (``flatten_chw``,
``common.converters.core.linear_weight_to_keras``).

TF1 variables named by scope go both ways through the same converters: ``porting/tf1.py``.
"""
import numpy as np
import torch

import keras  # after torch
from common.converters import ConversionError, lookup
from common.converters.recurrent import DIRECTIONS, join_rnn_state_dict, split_rnn_state_dict
from porting.layers import (CHANNELS_FIRST, RECURRENT, flatten_inputs, holds_weights, join,
                            keras_layers, keras_sample, torch_config, torch_layers, torch_tensors)


class TransferError(ValueError):
    """Every reason a transfer cannot be done, one per line; the target was not changed."""

    def __init__(self, problems, what="porting.transfer"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s), nothing was changed:\n{lines}")


class Pair:
    """One torch module (or one layer and direction of a recurrent one) and its Keras layer."""

    def __init__(self, path, torch_path, module, layer, part=None, chw=None):
        self.path, self.torch_path, self.module, self.layer = path, torch_path, module, layer
        self.part, self.chw = part, chw

    def converter(self):
        """The one converter both layer types map to (ConversionError if none or two)."""
        torch_type, keras_type = type(self.module).__name__, type(self.layer).__name__
        found = lookup(torch_type), lookup(keras_type)
        if found[0] is not found[1]:
            raise ConversionError(f"torch {torch_type} and Keras {keras_type} are different "
                                  f"layers (a {torch_type} pairs with Keras "
                                  f"{' or '.join(found[0].keras_types)})")
        return found[0]

    def to_keras(self):
        """The Keras layer's new weights, in get_weights() order, shapes checked."""
        tensors = torch_tensors(self.module)
        if self.part is not None:
            tensors = split_rnn_state_dict(tensors)[self.part]
        arrays = self.converter().to_keras(tensors, torch_config(self.module, self.chw),
                                           self.layer.get_config())
        expect_shapes("Keras", [np.shape(a) for a in arrays],
                      [tuple(v.shape) for v in self.layer.weights])
        return arrays

    def to_torch(self):
        """The torch tensors (this part's names, unsuffixed for a recurrent part)."""
        weights = [np.asarray(w) for w in self.layer.get_weights()]
        return self.converter().to_torch(weights, torch_config(self.module, self.chw),
                                         self.layer.get_config())


def expect_shapes(side, got, want):
    if list(map(tuple, got)) != list(map(tuple, want)):
        raise ConversionError(f"the converted weights have shapes {got}, the {side} layer's are "
                              f"{want}")


def _keras_part(module, layer, direction):
    """The Keras layer holding one direction of a torch recurrent layer, or a ConversionError."""
    wrapped = type(layer).__name__ == "Bidirectional"
    if module.bidirectional != wrapped:
        fix = ("wrap the Keras layer in layers.Bidirectional" if module.bidirectional else
               "use bidirectional=True in torch or an unwrapped Keras layer")
        raise ConversionError(f"torch {type(module).__name__} bidirectional="
                              f"{module.bidirectional}, the Keras layer is a "
                              f"{type(layer).__name__}; {fix}")
    if not wrapped:
        return layer
    if layer.merge_mode != "concat":
        raise ConversionError(f"Bidirectional merge_mode={layer.merge_mode!r}; torch "
                              "concatenates the directions: use merge_mode='concat'")
    return getattr(layer, f"{direction}_layer")


def match(torch_model, keras_model, flatten=None):
    """(pairs, problems): every weight-holding torch layer with its Keras partner, and why
    some have none. ``flatten``: {torch path: (C, H, W)} of Linears reading a flattened map."""
    tl = {p: m for p, m in torch_layers(torch_model).items() if holds_weights(m)}
    kl = {p: l for p, l in keras_layers(keras_model).items() if holds_weights(l)}
    pairs, problems, used = [], [], set()
    for path, module in tl.items():
        recurrent = type(module).__name__ in RECURRENT
        count = module.num_layers if recurrent else 1
        for index in range(count):
            names = [path] if count == 1 else [join(path, index), f"{path}_l{index}"]
            name = next((n for n in names if n in kl), names[0])
            if name not in kl:
                problems.append(f"{name}: the torch {type(module).__name__} holds weights but "
                                "the Keras model has no layer at that name")
                continue
            used.add(name)
            directions = DIRECTIONS[:1 + module.bidirectional] if recurrent else [None]
            for direction in directions:
                try:
                    layer = (kl[name] if direction is None else
                             _keras_part(module, kl[name], direction))
                    pair = Pair(name, path, module, layer,
                                (index, direction) if recurrent else None,
                                (flatten or {}).get(path))
                    pair.converter()
                    pairs.append(pair)
                except ConversionError as exc:
                    problems.append(f"{name}: {exc}")
                    break
    problems += [f"{p or '(the model itself)'}: the Keras {type(l).__name__} holds weights but "
                 "the torch model has no module at that attribute path"
                 for p, l in kl.items() if p not in used]
    if not kl and tl and not keras_model.built:
        problems.append("the Keras model is not built: call it on an input first")
    return pairs, problems


# -- the transfer ---------------------------------------------------------------------------
def transfer(source, target, sample=None, flatten_shape=None):
    """Copy every layer's weights from ``source`` to ``target`` (a torch nn.Module and a
    Keras model, either way round); returns the list of matched layer names.

    ``sample``: one input batch in the Keras layout, to find the Linears that read a flattened
    conv map (default: zeros in the Keras model's input shape, when it is known);
    ``flatten_shape``: {torch path of such a Linear: (C, H, W)} instead of tracing.
    Raises ``TransferError`` listing every unmatched layer that holds weights, unsupported
    layer or configuration and shape mismatch; the target is then unchanged."""
    to_keras = isinstance(target, keras.Model)  # Keras on the torch backend: layers are Modules
    torch_model, keras_model = (source, target) if to_keras else (target, source)
    if (isinstance(torch_model, keras.Layer) or not isinstance(torch_model, torch.nn.Module)
            or not isinstance(keras_model, keras.Model)):
        raise TypeError("transfer takes a torch nn.Module and a keras.Model, in either order; "
                        f"got {type(source).__name__} and {type(target).__name__}")
    flatten, traced = (dict(flatten_shape), []) if flatten_shape is not None else _trace(
        torch_model, keras_model, sample)
    pairs, problems = match(torch_model, keras_model, flatten)
    problems += traced + [f"{p}: flatten_shape names no torch Linear that holds weights"
                          for p in (flatten_shape or {})
                          if not any(pair.torch_path == p and pair.chw for pair in pairs)]
    keras_updates, torch_updates, failed = [], {}, set()
    for pair in pairs:
        try:
            if to_keras:
                keras_updates.append((pair.layer, pair.to_keras()))
            else:
                tensors = pair.to_torch()
                parts = torch_updates.setdefault(pair.torch_path, (pair.module, {}))[1]
                parts.update({pair.part: tensors} if pair.part else tensors)
        except (ConversionError, AssertionError) as exc:
            problems.append(f"{pair.path}: {exc}")
            failed.add(pair.torch_path)
    torch_updates = [(module, torch_state(path, module, parts, problems))
                     for path, (module, parts) in torch_updates.items() if path not in failed]
    if problems:
        raise TransferError(problems, f"porting.transfer({type(source).__name__} -> "
                                      f"{type(target).__name__})")
    assign(keras_updates, torch_updates)
    return [pair.path for pair in pairs]


def _trace(torch_model, keras_model, sample):
    """({Linear path: (C, H, W)}, problems): the Linears reading a flattened map, traced on
    ``sample`` or zeros in the Keras input shape. A torch model with a convolution and a
    Linear that cannot be traced is a problem: its flatten order would go unchecked."""
    try:
        sample = keras_sample(keras_model) if sample is None else sample
        if sample is None:
            raise ValueError("the Keras model's input shape is unknown")
        return flatten_inputs(torch_model, sample), []
    except Exception as exc:  # the user's forward pass, whatever it raises
        types = {type(m).__name__ for m in torch_layers(torch_model).values()}
        if "Linear" not in types or not any(CHANNELS_FIRST.fullmatch(t) for t in types):
            return {}, []
        return {}, [f"(flatten order) the torch model could not be traced ({type(exc).__name__}: "
                    f"{exc}); pass sample= (one input batch, Keras layout) or flatten_shape="
                    "{Linear path: (C, H, W)}"]


def torch_state(path, module, parts, problems):
    """A module's whole new state dict (recurrent parts joined), checked against its own."""
    if type(module).__name__ in RECURRENT:
        parts = join_rnn_state_dict(parts)
    own = torch_tensors(module)
    try:
        if sorted(parts) != sorted(own):
            raise ConversionError(f"the converter gave {sorted(parts)}, the module has "
                                  f"{sorted(own)}")
        expect_shapes("torch", [np.shape(parts[k]) for k in own], [v.shape for v in own.values()])
    except ConversionError as exc:
        problems.append(f"{path}: {exc}")
    return parts


def assign(keras_updates, torch_updates):
    """Write the converted weights; every shape was checked, so this cannot fail half-way."""
    for layer, arrays in keras_updates:
        layer.set_weights(arrays)
    with torch.no_grad():
        for module, tensors in torch_updates:
            state = module.state_dict()
            for name, value in tensors.items():
                state[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))

