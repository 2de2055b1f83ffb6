"""The data every training benchmark trains on, identical for all implementations.

* CNN: ``common.datasets.make_synthetic_images(n)``, CIFAR-shaped (32, 32, 3)
  uint8 images in 10 classes. The implementations get them as NHWC float32,
  normalised per channel; the manual's pipeline gets the uint8 images and does
  the same normalisation itself, per sample, with ``ToTensor`` (divide by 255)
  and ``Normalize(mean, std)`` using the statistics computed here, so both see
  the same numbers.
* MLP: ``sklearn.datasets.make_friedman1`` with n rows, 10 features (5 of them
  informative), noise 1.0 -- the generator behind the ``friedman`` dataset, at
  benchmark size -- features standardised, targets float32 of shape (n,).
"""
from dataclasses import dataclass

import numpy as np

from common.datasets import make_synthetic_images

IMAGE_SHAPE = (32, 32, 3)  # CIFAR-10's
NUM_CLASSES = 10
FRIEDMAN_FEATURES = 10


@dataclass
class ImageData:
    images: np.ndarray   # (n, 32, 32, 3) uint8: what a PIL-based pipeline starts from
    labels: np.ndarray   # (n,) int64
    mean: np.ndarray     # (3,) per-channel mean of images / 255
    std: np.ndarray      # (3,) per-channel std of images / 255
    x: np.ndarray        # (n, 32, 32, 3) float32 NHWC, (images / 255 - mean) / std

    @property
    def input_shape(self):
        return tuple(self.images.shape[1:])

    num_classes = NUM_CLASSES


@dataclass
class TabularData:
    x: np.ndarray        # (n, features) float32, standardised
    y: np.ndarray        # (n,) float32

    @property
    def input_shape(self):
        return tuple(self.x.shape[1:])


def image_data(n):
    images, labels = make_synthetic_images(n, shape=IMAGE_SHAPE, num_classes=NUM_CLASSES)
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 1, 2)).astype(np.float32)
    std = scaled.std(axis=(0, 1, 2)).astype(np.float32)
    # ToTensor + Normalize in one go, for the implementations that take arrays.
    x = ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    return ImageData(images, labels, mean, std, x)


def tabular_data(n):
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(n_samples=n, n_features=FRIEDMAN_FEATURES, noise=1.0, random_state=0)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return TabularData(x.astype(np.float32), y.astype(np.float32))
