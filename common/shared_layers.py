"""The shared models' layers in the converter registry's words, numpy only.

The shared weights format is the torch twins' ``state_dict`` (torch_impl/models.py,
``common.weights``); tf2_impl/models.py and tf1_compat/models.py convert it one layer at a
time through ``common.converters``, which reads a config from each side. ``torch_twin``
gives the torch side's for a layer of the shared models (``conv{i}``, ``bn{i}``, ``fc{i}``):
its sizes come from the layer's Keras kernel (or gamma), the rest from ``common.config`` as
torch_impl builds it (a 3x3 Conv2d with padding 1 and no bias, BatchNorm2d with ``BN_EPS``
and ``BN_MOMENTUM``, Linear with a bias). The converter checks the Keras side's config
against it, so a layer built otherwise is refused, naming the difference, rather than
converted into a different model.
"""
import numpy as np

from common import config
from common.converters import lookup


def layer_names(cnn):
    """The layers holding weights, in the shared format's order."""
    blocks = [f"{kind}{i}" for i in range(1, len(config.CNN_FILTERS) + 1)
              for kind in ("conv", "bn")]
    dense = len(config.CNN_FC if cnn else config.MLP_HIDDEN) + 1
    return (blocks if cnn else []) + [f"fc{i}" for i in range(1, dense + 1)]


def torch_twin(name, shape, flatten_chw=None):
    """(torch type name, torch config) of shared layer ``name``, whose Keras kernel (or
    gamma) has ``shape``; ``flatten_chw``: the (C, H, W) map a Linear reads flattened."""
    kind = name.rstrip("0123456789")
    if kind == "bn":
        return "BatchNorm2d", {"num_features": shape[0], "eps": config.BN_EPS,
                               "momentum": config.BN_MOMENTUM, "affine": True,
                               "track_running_stats": True}
    n_in, n_out = shape[-2:]
    if kind == "conv":
        k = config.CNN_KERNEL
        return "Conv2d", {"in_channels": n_in, "out_channels": n_out, "kernel_size": k,
                          "stride": 1, "padding": k // 2, "dilation": 1, "groups": 1,
                          "padding_mode": "zeros"}
    return "Linear", {"in_features": n_in, "out_features": n_out, "bias": True,
                      "flatten_chw": flatten_chw}


def to_shared(name, weights, keras_config, flatten_chw=None):
    """{"name.param": float32 array}: layer ``name``'s Keras weights (``get_weights()``
    order) as shared-format tensors; ``keras_config``: the layer's (or what TF1 computes)."""
    torch_type, torch_config = torch_twin(name, np.shape(weights[0]), flatten_chw)
    tensors = lookup(torch_type).to_torch(weights, torch_config, keras_config)
    return {f"{name}.{param}": np.asarray(a, dtype=np.float32) for param, a in tensors.items()}


def from_shared(name, tensors, shape, keras_config, flatten_chw=None):
    """Layer ``name``'s Keras weights (``get_weights()`` order) from the shared-format
    ``tensors``; ``shape``: its Keras kernel's (or gamma's). Raises ``ConversionError``."""
    torch_type, torch_config = torch_twin(name, shape, flatten_chw)
    own = {key.split(".", 1)[1]: a for key, a in tensors.items() if key.split(".")[0] == name}
    return lookup(torch_type).to_keras(own, torch_config, keras_config)
