"""The data every training benchmark trains on, the same for every pipeline.

CNN: ``make_synthetic_images``, CIFAR-shaped uint8 images in 10 classes, as NHWC float32 normalised
per channel (the manual torch pipeline normalises the uint8 images itself with the statistics
computed here: the same numbers); RNN: the same, one row per time step (32 x 96). MLP:
``make_friedman1`` rows of 10 features, standardised; targets float32 (n, 1).
"""
from dataclasses import dataclass

import numpy as np

from common.datasets import make_synthetic_images

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
FEATURES = 10


@dataclass
class Data:
    x: np.ndarray                # float32: NHWC images, (N, T, F) sequences or standardised rows
    y: np.ndarray                # int64 labels (n,) or float32 targets (n, 1)
    task: str                    # "classification" or "regression"
    images: np.ndarray = None    # the uint8 images a PIL pipeline starts from
    mean: np.ndarray = None      # per-channel mean and std of images / 255
    std: np.ndarray = None

    input_shape = property(lambda self: tuple(self.x.shape[1:]))
    num_classes = NUM_CLASSES


def benchmark_data(task, n):
    """`n` training items for task "cnn", "rnn" or "mlp"."""
    if task != "mlp":
        images, labels = make_synthetic_images(n, shape=IMAGE_SHAPE, num_classes=NUM_CLASSES)
        scaled = images.astype(np.float64) / 255.0
        mean = scaled.mean(axis=(0, 1, 2)).astype(np.float32)
        std = scaled.std(axis=(0, 1, 2)).astype(np.float32)
        x = ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        x = x.reshape(n, IMAGE_SHAPE[0], -1) if task == "rnn" else x  # as run_rnn reads them
        return Data(x, labels, "classification", images, mean, std)
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(n_samples=n, n_features=FEATURES, noise=1.0, random_state=0)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return Data(x.astype(np.float32), y.reshape(-1, 1).astype(np.float32), "regression")
