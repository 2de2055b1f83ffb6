"""Activation layouts between PyTorch and TensorFlow, in numpy.

=================  =======================  =========================
what               PyTorch                  TensorFlow / Keras
=================  =======================  =========================
activations        NCHW                     NHWC
=================  =======================  =========================

Weights convert layer by layer through the converter registry, ``common.converters``: one
converter per layer type (``lookup("Conv2d")``, ...), shapes asserted, with the layouts in
its family modules' tables (``core.py``: Linear, the flatten order, batch norm; ``conv.py``:
convolutions).
"""
import numpy as np


def nhwc_to_nchw(x):
    """Activations (N, H, W, C) -> (N, C, H, W)."""
    assert x.ndim == 4, f"expected a 4-D NHWC array, got shape {x.shape}"
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nchw_to_nhwc(x):
    """Activations (N, C, H, W) -> (N, H, W, C)."""
    assert x.ndim == 4, f"expected a 4-D NCHW array, got shape {x.shape}"
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
