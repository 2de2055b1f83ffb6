"""The converter registry: one converter per layer type, torch <-> Keras 3 (and TF1, whose
variables take the Keras names and layouts), numpy only.

``lookup(type_name)`` gives the ``Converter`` for a torch module or Keras layer class name
(``base.py`` says what a converter is). The families: ``core`` (Linear, batch, layer and
group norm, Embedding), ``conv`` (convolutions, depthwise and transposed), ``recurrent``
(LSTM, GRU), ``attention`` (multi-head attention). The table of docs/PORTING.md lists them.
"""
from common.converters import attention, conv, core, recurrent
from common.converters.base import REGISTRY, ConversionError, Converter, lookup

FAMILIES = (core, conv, recurrent, attention)  # importing each registers its converters
__all__ = ["FAMILIES", "REGISTRY", "ConversionError", "Converter", "lookup"]
