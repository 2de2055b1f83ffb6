"""Model FLOPs per training example, counted analytically from ``common.config``.

Only the multiply-accumulates of convolutions and dense layers are counted (one
MAC = 2 FLOPs); batch norm, ReLU, pooling, dropout, the loss and Adam's update
are element-wise and add a few percent at most. Training costs about three
forward passes: the forward itself, then the gradients with respect to the
activations and with respect to the weights, each about as expensive (the first
convolution's input gradient is not needed, which the factor 3 ignores).
"""
from common import config
from common.config import CNNShape

TRAINING_FACTOR = 3


def cnn_forward_macs(input_shape, num_classes):
    """MACs of one forward pass of the shared CNN for one (H, W, C) image."""
    shape = CNNShape(tuple(input_shape), num_classes)
    macs = 0
    in_ch = shape.in_channels
    k = config.CNN_KERNEL
    for block, out_ch in enumerate(config.CNN_FILTERS, start=1):
        h, w = shape.spatial_after_block(block - 1)  # 'same' conv keeps the size; pool follows
        macs += h * w * out_ch * in_ch * k * k
        in_ch = out_ch
    sizes = [shape.flatten_features, *config.CNN_FC, num_classes]
    macs += sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return macs


def mlp_forward_macs(num_features):
    sizes = [num_features, *config.MLP_HIDDEN, 1]
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def training_flops_per_item(task, input_shape, num_classes=0):
    """FLOPs to train on one image ("cnn") or one row ("mlp")."""
    macs = cnn_forward_macs(input_shape, num_classes) if task == "cnn" else mlp_forward_macs(input_shape[-1])
    return TRAINING_FACTOR * 2 * macs
