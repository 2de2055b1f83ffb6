"""Deep learning from scratch in numpy: an autograd ``Tensor``, the layers, Adam, and the
project's two models, checked against PyTorch and TensorFlow by ``parity_tests/test_scratch_*``.

``scratch.tensor`` (the Tensor and its graph), ``scratch.functional`` (conv2d by im2col,
pooling, batch norm, losses), ``scratch.nn`` (layers, Adam, the MLP and CNN and the shared
weights format), ``scratch.train`` (``python -m scratch.train --task cnn|mlp``). No
framework is imported anywhere in this package.
"""
from scratch.functional import conv2d
from scratch.tensor import Tensor, no_grad

__all__ = ["Tensor", "conv2d", "no_grad"]
