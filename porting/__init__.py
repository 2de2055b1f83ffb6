"""Port a user's own model between PyTorch and Keras 3 (and TF1 variables), layer by layer.

* ``transfer(source, target)``: copy the weights of a torch ``nn.Module`` into a Keras
  model or back, matching layers by name and converting each through ``common.converters``;
  one ``TransferError`` lists everything that does not fit, and the target is then unchanged.
* ``compare(torch_model, keras_model, inputs)``: both models on the same inputs, every
  matched layer's max absolute difference in a ``Report``, naming the first layer that
  diverges.
* TF1 variables named by scope (``scope/kernel``, ``scope/bias``, ...), through the same
  converters (``porting/tf1.py``): torch -> TF1 with ``tf1_values`` / ``tf1_load``, TF1 ->
  torch with ``tf1_read`` / ``torch_values`` / ``torch_load``.

Each module imports torch before keras, and the import-order guard is installed before
either: a process that imports tensorflow before triton can abort (common/frameworks.py).
"""
from common.frameworks import install_import_guard

install_import_guard()

from porting.compare import Report, compare
from porting.tf1 import tf1_load, tf1_read, tf1_values, torch_load, torch_values
from porting.transfer import TransferError, transfer

__all__ = ["Report", "TransferError", "compare", "tf1_load", "tf1_read", "tf1_values",
           "torch_load", "torch_values", "transfer"]
