"""Every speed variant of the PyTorch implementation, used with ``--fast``.

Each function has the name of the plain one it replaces (``models.build_cnn``,
``train.make_batches``), so an entry point reads
``build = fast.build_cnn if args.fast else build_cnn``. Each computes the same
function as the plain code: ``parity_tests/test_fast_torch.py`` checks outputs,
gradients and an Adam step from the same weights, and the batches.
Twins: ``tf2_impl/fast.py`` and ``tf1_compat/fast.py``.

Gains below: measured 2026-11-27 on CPU (2-core Intel Xeon with AVX-512, shared
with other jobs, torch 2.15.0), batch 100, one thread (``torch.set_num_threads(1)``:
with two threads on busy cores every parallel region waits for a descheduled
thread and timings varied 2-5x), medians of interleaved runs. Together, on the
synthetic CIFAR-shaped images, ``--fast`` trained 2,416 images/s against the
plain code's 1,277 (1.9x).
"""
import ctypes
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common.datasets import batch_indices
from torch_impl.models import CNNClassifier
from torch_impl.train import augment_images

# mallopt() parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2**30


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds; True when glibc accepted both.

    What: freed memory stays in the process instead of going back to the kernel.
    Why faster: a CNN step on the CPU allocates and frees the same large buffers
    every batch (one 100 x 32 x 32 x 32 float32 activation of CIFAR-shaped images
    is 13 MB). glibc serves big blocks with ``mmap`` and unmaps them on ``free``,
    and trims the top of its heap when that holds more free memory than a
    threshold; the next step faults the pages in again and the kernel zeroes
    each one. On CIFAR-shaped images that made a third of the training time
    system time (``vmstat``: 35% ``sy`` before, 1-2% after) and training ran
    at half speed. The same as ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment, or preloading
    jemalloc or tcmalloc (PyTorch's CPU performance guide), without a wrapper
    script. Cost: the process keeps its peak heap until it exits. The MLP's
    activations are 40 KB, far below the thresholds: ``run_nn`` does not call it.
    Gain: the fast CNN on CIFAR-shaped images, 2,118 -> 2,416 images/s (1.14x;
    median of 3 processes each way, 5 epochs, the first left out).

    A no-op returning False elsewhere (macOS, Windows, musl's stub ``mallopt``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded in this process
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Fixing the mmap threshold also switches off glibc's own adjustment of it.
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


class PoolFirstCNN(CNNClassifier):
    """``models.CNNClassifier`` with each block's max pool before its ReLU.

    ReLU and max pool commute (relu(max(a, b)) = max(relu(a), relu(b))), so the
    function, its gradients and the state_dict are those of the textbook block.
    """

    def forward(self, x):  # x: (N, C, H, W), any memory format
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.pool(self.bn1(self.conv1(x))))
        x = F.relu(self.pool(self.bn2(self.conv2(x))))
        x = F.relu(self.pool(self.bn3(self.conv3(x))))
        x = self.flatten(x)  # (C, H, W) order, whatever the memory format
        x = self.dropout(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_cnn(input_shape, num_classes):
    """The CNN, pooling before ReLU, with its images and kernels stored channels-last.

    What: (1) each block's ReLU runs after the 2x2 max pool, on a quarter of the
    elements, forward and backward; (2) ``torch.channels_last`` keeps the NCHW
    shapes but stores pixels channel-innermost (NHWC in memory), the layout of
    oneDNN's (and cuDNN's) fastest convolution kernels; in the default layout
    they reorder every input, kernel and output of each convolution.
    Gain: a training step on 100 CIFAR-shaped images 96.7 -> 62.6 ms (1.54x:
    channels-last alone 1.36x, pool-first alone 1.05x); on 100 digits 8.5 -> 7.4 ms
    (1.15x). Medians of 7 interleaved rounds of 4 steps in one process.
    """
    return PoolFirstCNN(input_shape, num_classes).to(memory_format=torch.channels_last)


class DeviceBatches:
    """The batches of ``common.datasets.batch_indices``, cut from tensors where they live."""

    def __init__(self, x, y, batch_size, seed, epoch, augment=False, flip=False):
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)
        self.shuffled = seed is not None
        self.seed, self.epoch, self.augment, self.flip = seed, epoch, augment, flip
        order = batch_indices(len(self.x), batch_size, seed, epoch, shuffle=self.shuffled)
        self.sizes = [len(index) for index in order]
        # The epoch's order goes to the data's device once, not a batch at a time.
        self.order = torch.from_numpy(np.concatenate(order)).to(self.x.device)

    def __len__(self):
        return len(self.sizes)

    def __iter__(self):
        start = 0
        for b, index in enumerate(self.order.split(self.sizes)):
            if self.shuffled:
                # index_select copies whole rows; x[index] takes the general advanced-
                # indexing kernel: 17x slower for a batch of digits on one thread here.
                x, y = self.x.index_select(0, index), self.y.index_select(0, index)
            else:  # in order: slices, views of the split
                x, y = self.x[start:start + len(index)], self.y[start:start + len(index)]
            if self.augment:  # the plain collate_fn's augmentation, batch b of the epoch
                x = augment_images(x, self.seed, self.epoch, b, self.flip)
            yield x, y
            start += len(index)


def make_batches(x, y, batch_size, seed=None, epoch=1, augment=False, flip=False):
    """The same batches as ``train.make_batches``, without a DataLoader.

    What: each batch is one indexing of the whole split's tensors (a slice, a view,
    when in order), on whatever device they are; an entry point with ``--fast``
    moves every split to the model's device once, before training.
    Why faster: the DataLoader indexes the TensorDataset once per *row* and stacks
    the rows (``default_collate``), a hundred small tensors per batch of 100, and
    on a GPU each batch then crosses the bus on its own.
    Gain: feeding a batch of 100 digits, 0.39 ms -> 0.012 ms; a training epoch of
    the MLP on friedman, 80,900 -> 114,300 rows/s (1.41x), of the fast CNN on
    digits 1.09x; on CIFAR-shaped images the step dwarfs the feed (1.00x).
    With `augment`, each batch goes through the same ``train.augment_images`` (numpy,
    on the CPU: the draws and crops must be those of the TF twins).
    """
    return DeviceBatches(x, y, batch_size, seed, epoch, augment, flip)

