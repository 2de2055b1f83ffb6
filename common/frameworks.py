"""The one import-order guard for processes that may use torch and tensorflow.

On the PyPI wheels, tensorflow and triton each bundle LLVM. Importing tensorflow
first and triton afterwards aborts the whole process
(``LLVM ERROR: ... registered more than once``). torch imports triton lazily (the
first ``torch.optim`` constructor, ``torch.compile``, torchvision), so the crash
appears far from its cause.

``install_import_guard`` (run when ``common`` is imported) handles both orders:

* tensorflow not imported yet: a meta-path hook imports triton the moment
  something asks for tensorflow, so triton's LLVM is always registered first;
* tensorflow already imported (user code imported it before ``common``): triton
  is blocked in this process, so torch falls back to its triton-free paths
  (eager optimizers, the C++ inductor backend on CPU) instead of aborting.
"""
import importlib.abc
import importlib.util
import os
import sys
import warnings

_BLOCK_MESSAGE = (
    "tensorflow was imported before triton; triton is disabled in this process "
    "to avoid the LLVM double-registration abort (import torch or common first "
    "to keep triton kernels)."
)


class _TritonFirstFinder(importlib.abc.MetaPathFinder):
    """Imports triton just before the first import of tensorflow."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        _remove_finder()
        _import_triton_if_installed()
        return None  # let the normal finders import tensorflow


def _remove_finder():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TritonFirstFinder)]


def _import_triton_if_installed():
    if "triton" in sys.modules:
        return
    try:
        if importlib.util.find_spec("triton") is None:
            return
        importlib.import_module("triton")
    except Exception:  # a broken triton must not stop tensorflow from loading
        pass


def install_import_guard():
    """Make the torch/tensorflow import order safe for this process (idempotent).

    Also lets TensorFlow take GPU memory as it needs it: by default its first op maps
    nearly all of a GPU's memory, and torch, or another TensorFlow process, sharing the
    GPU then runs out. TensorFlow reads the variable when it first sets up its GPUs.
    """
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    if "tensorflow" in sys.modules:
        if "triton" not in sys.modules:
            sys.modules["triton"] = None  # makes `import triton` raise ImportError
            warnings.warn(_BLOCK_MESSAGE, RuntimeWarning, stacklevel=2)
        return
    if not any(isinstance(f, _TritonFirstFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonFirstFinder())


def tf32_in_use(implementation, device):
    """Whether a run's matrix products or convolutions may use TF32 (10-bit mantissas).

    TF32 exists only on CUDA GPUs (Ampere and newer). torch allows it for cuDNN
    convolutions by default and not for matrix products; TensorFlow allows it for
    both. ``make_deterministic`` turns it off in every framework.
    """
    if not str(device).startswith("cuda"):
        return False
    if implementation == "torch":
        backends = sys.modules["torch"].backends
        return bool(backends.cuda.matmul.allow_tf32 or backends.cudnn.allow_tf32)
    if implementation in ("tf2", "tf1_compat"):
        return bool(sys.modules["tensorflow"].config.experimental.tensor_float_32_execution_enabled())
    return False
