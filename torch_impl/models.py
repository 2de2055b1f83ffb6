"""The shared models as PyTorch modules, and the shared weights format.

Twins: ``tf2_impl/models.py`` (Keras layers) and ``tf1_compat/models.py``
(``tf.compat.v1`` variables and ``tf.nn`` ops). Sizes come from
``common.config``; layer names (``conv1``, ``bn1``, ..., ``fc3``) are the tensor
names of the shared weights file, which is this module's ``state_dict``.

PyTorch works in NCHW: images enter the CNN as (N, C, H, W), so the feature
map before ``fc1`` flattens in (C, H, W) order, the order of the shared format
(the TF twins flatten NHWC maps in (H, W, C) order and convert in
``common.layout``). The faster CNN of ``--fast`` is ``torch_impl/fast.py``.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import config
from common.config import CNNShape
from common.errors import WeightsError


class MLPRegressor(nn.Module):
    """features -> fc1 100 -> ReLU -> fc2 100 -> ReLU -> fc3 1 (one prediction per row)."""

    def __init__(self, num_features):
        super().__init__()
        hidden1, hidden2 = config.MLP_HIDDEN
        self.fc1 = nn.Linear(num_features, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 1)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (N, 1)


def build_mlp(num_features):
    """The MLP regressor for rows of `num_features` features."""
    return MLPRegressor(num_features)


class CNNClassifier(nn.Module):
    """Three blocks of conv 3x3 'same' -> batch norm -> ReLU -> 2x2 max pool, then
    fc1 100 -> ReLU -> dropout -> fc2 100 -> ReLU -> fc3 classes. Outputs logits."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        shape = CNNShape(tuple(input_shape), num_classes)  # input_shape is the dataset's (H, W, C)
        filters1, filters2, filters3 = config.CNN_FILTERS
        # TF's padding='same'; for stride 1 and an odd kernel it pads (k-1)/2 on every
        # side, which is torch's symmetric padding=k//2, so both compute the same map.
        k, pad = config.CNN_KERNEL, config.CNN_KERNEL // 2
        # torch's BatchNorm momentum weights the new batch statistic (Keras: 1 - 0.1).
        bn = dict(eps=config.BN_EPS, momentum=config.BN_MOMENTUM)
        # No conv bias: batch norm subtracts the channel mean right after, and its own
        # shift (bn.bias) takes the bias's place.
        self.conv1 = nn.Conv2d(shape.in_channels, filters1, k, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(filters1, **bn)
        self.conv2 = nn.Conv2d(filters1, filters2, k, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm2d(filters2, **bn)
        self.conv3 = nn.Conv2d(filters2, filters3, k, padding=pad, bias=False)
        self.bn3 = nn.BatchNorm2d(filters3, **bn)
        self.pool = nn.MaxPool2d(config.CNN_POOL)
        self.flatten = nn.Flatten()
        fc1, fc2 = config.CNN_FC
        self.fc1 = nn.Linear(shape.flatten_features, fc1)
        self.dropout = nn.Dropout(config.DROPOUT)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, num_classes)

    def forward(self, x):  # x: (N, C, H, W)
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.pool(F.relu(self.bn3(self.conv3(x))))
        x = self.flatten(x)  # (C, H, W) order
        x = self.dropout(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # logits: nn.CrossEntropyLoss applies log-softmax itself


def build_cnn(input_shape, num_classes):
    """The CNN classifier for (H, W, C) images and `num_classes` classes."""
    return CNNClassifier(input_shape, num_classes)


def export_weights(model):
    """The shared weights format: the state_dict as float32 numpy arrays.

    ``num_batches_tracked`` is left out: it only matters for BatchNorm(momentum=None),
    and the TF twins have no such variable. ``.contiguous()`` gives a channels_last
    model's conv kernels (``torch_impl/fast.py``) their logical (out, in, kh, kw) order.
    """
    return {name: tensor.detach().cpu().contiguous().numpy().astype(np.float32)
            for name, tensor in model.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def import_weights(model, tensors):
    """Load shared-format tensors (as validated by ``common.weights.load_weights``)."""
    state = {name: torch.from_numpy(np.asarray(array, dtype=np.float32))
             for name, array in tensors.items()}
    result = model.load_state_dict(state, strict=False)  # copies onto the model's device
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise WeightsError(f"the weights do not fit {type(model).__name__}: missing "
                           f"{missing}, unexpected {result.unexpected_keys}")
    return model
