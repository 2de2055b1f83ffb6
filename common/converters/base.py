"""The converter registry's parts: one ``Converter`` per layer type, registered by name.

numpy only. A converter moves one layer's weights between PyTorch and Keras 3 (and TF1,
whose variables this project names and lays out as Keras does: ``scope/kernel``, ...):

* ``to_keras(tensors, torch_config, keras_config) -> [arrays]``: torch's tensors, named as
  in the module's ``state_dict`` without the module's prefix (``{"weight": ..., "bias":
  ...}``), to the Keras layer's weights in ``layer.get_weights()`` order;
* ``to_torch(weights, torch_config, keras_config) -> {name: array}``: the other way;
* ``keras_names``: the Keras variable names in that order (TF1's variable names too).

The configs are plain dicts: the torch module's public attributes (``in_features``,
``kernel_size``, ``groups``, ``hidden_size``, ``batch_first``, ...) and the Keras layer's
``get_config()``. A converter checks that the pair computes the same function and raises
``ConversionError`` naming the difference (for example GRU with ``reset_after=False``, or a
LayerNorm whose eps differs) rather than convert into a silently different model; each
converter asserts every shape it reads and writes.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np


class ConversionError(ValueError):
    """A layer pair that cannot be converted exactly: the message says why and what to do."""


@dataclass(frozen=True)
class Converter:
    torch_types: tuple      # torch.nn class names: ("Linear",)
    keras_types: tuple      # Keras layer class names: ("Dense",)
    keras_names: tuple      # Keras / TF1 variable names in get_weights() order
    to_keras: Callable
    to_torch: Callable
    doc: str = ""           # one line: the permutation, for the layer table


REGISTRY = {}


def register(converter):
    """Add `converter` under each of its torch and Keras type names (LSTM is both); returns it."""
    for name in dict.fromkeys(converter.torch_types + converter.keras_types):
        if name in REGISTRY:
            raise ValueError(f"two converters for {name}")
        REGISTRY[name] = converter
    return converter


def lookup(type_name):
    """The converter for a torch module or Keras layer class name."""
    if type_name not in REGISTRY:
        raise ConversionError(f"no converter for a {type_name} layer (supported: "
                              f"{', '.join(sorted(REGISTRY))})")
    return REGISTRY[type_name]


def expect_shape(name, array, shape):
    """Assert one array's shape, with a message that names it."""
    if tuple(array.shape) != tuple(shape):
        raise ConversionError(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def expect_equal(what, torch_value, keras_value, fix):
    """Refuse a configuration that differs between the two layers."""
    if torch_value != keras_value:
        raise ConversionError(f"{what} differs: torch {torch_value!r}, Keras {keras_value!r}; {fix}")


def take_tensors(tensors, wanted, ignored=()):
    """[tensors[name] for name in wanted], shapes asserted; any other name is refused.
    `wanted` is [(name, shape)]."""
    unexpected = sorted(set(tensors) - {name for name, _ in wanted} - set(ignored))
    missing = sorted({name for name, _ in wanted} - set(tensors))
    if unexpected or missing:
        raise ConversionError(f"torch tensors {sorted(tensors)} do not fit this configuration "
                              f"(missing {missing}, unexpected {unexpected})")
    return [expect_shape(name, np.asarray(tensors[name]), shape) for name, shape in wanted]


def expect_weights(weights, wanted):
    """Assert the Keras weights' count and shapes against [(keras name, shape)]."""
    if len(weights) != len(wanted):
        raise ConversionError(f"expected {len(wanted)} Keras weights "
                              f"({', '.join(name for name, _ in wanted)}), got {len(weights)}")
    return [expect_shape(name, np.asarray(w), shape) for w, (name, shape) in zip(weights, wanted)]
