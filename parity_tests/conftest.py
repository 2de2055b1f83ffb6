"""Test-suite set-up shared by every test process.

* ``import common`` first: it installs the torch/tensorflow import-order guard
  (common/frameworks.py), and torch is imported before tensorflow anyway.
* Precision settings are pinned before any framework is used, because parity
  checks compare numbers across frameworks: oneDNN's fused CPU kernels off
  (``TF_ENABLE_ONEDNN_OPTS=0``), XLA auto-clustering off, TF32 off on both sides
  (it only matters on Ampere or newer GPUs, where it is torch's and TF's default
  for convolutions / TF's for matmuls).
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import common  # noqa: E402,F401  (installs the import-order guard)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


import tensorflow as tf  # noqa: E402  (after torch: see common/frameworks.py)

tf.config.experimental.enable_tensor_float_32_execution(False)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
