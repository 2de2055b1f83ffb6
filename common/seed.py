"""Seeding and determinism for whichever frameworks this process has loaded.

``seed_everything`` never imports a framework: it seeds torch and tensorflow only
when they are already imported, so a TF-only process never pays for torch.
"""
import os
import random
import sys

import numpy as np


def seed_everything(seed):
    """Seed Python's `random`, numpy's global RNG, and torch / tensorflow if loaded."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)  # also seeds every CUDA device
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].random.set_seed(seed)
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(seed)


def epoch_seed(seed, epoch):
    """The framework RNG seed for one epoch (dropout masks): resuming at an epoch
    boundary reproduces the uninterrupted run without saving RNG states."""
    return int(np.random.default_rng([seed, epoch, 1]).integers(0, 2 ** 31 - 1))


def set_deterministic_environment():
    """Environment settings that must precede the framework imports.

    * ``TF_ENABLE_ONEDNN_OPTS=0``: oneDNN's fused CPU kernels change summation
      order with the thread layout, so results vary from run to run;
    * ``TF_DETERMINISTIC_OPS=1`` and ``TF_CUDNN_DETERMINISTIC=1``: deterministic
      TF kernels (``tf.config.experimental.enable_op_determinism`` does the same
      once TF is imported);
    * ``TF_XLA_FLAGS=--tf_xla_auto_jit=0``: no XLA auto-clustering, whose fusion
      changes numerics;
    * ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: required by torch's deterministic cuBLAS.
    """
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    os.environ["TF_CUDNN_DETERMINISTIC"] = "1"
    os.environ["TF_XLA_FLAGS"] = "--tf_xla_auto_jit=0"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
