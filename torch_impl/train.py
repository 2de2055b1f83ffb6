"""Training and evaluation loops, devices and checkpoints in PyTorch.

Twins: ``tf2_impl/train.py`` (``model.fit`` or a ``tf.GradientTape`` loop) and
``tf1_compat/train.py`` (``session.run`` of a train op). The idioms to learn here:
``model.train()`` / ``model.eval()`` switch dropout and batch norm; gradients
accumulate until ``optimizer.zero_grad()``; ``loss.backward()`` fills them and
``optimizer.step()`` applies them; evaluation runs under ``torch.inference_mode()``.

Data lives in memory: each split becomes one tensor, moved to the device once,
and batches are cut from it with the shared ``common.datasets.batch_indices``
(drawn on the host, so CPU and GPU runs see the same batches).
"""
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import UserError, WeightsError
from common.outputs import atomic_path, classification_metrics, regression_metrics


# -- devices ---------------------------------------------------------------------------
def resolve_device(name):
    """--device auto|cpu|cuda -> torch.device; asking for a missing GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_deterministic():
    """Bit-identical reruns: deterministic kernels, no autotuning, no TF32 on GPUs."""
    # cuBLAS reads this at its first call. Only torch's variable: common.seed's
    # set_deterministic_environment would also switch TensorFlow, in processes running both.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # on by default for convolutions


def to_device(array, device, memory_format=torch.contiguous_format):
    """A whole split as one tensor on `device` (float32 stays float32, int64 stays int64)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).contiguous(memory_format=memory_format)
    if device.type == "cuda" and tensor.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return tensor.pin_memory()  # too big for the GPU: batches travel as they are cut
    return tensor.to(device)


def _batch(x, y, index, device):
    """Rows `index` (numpy) of x and y, on the model's device."""
    index = torch.from_numpy(index).to(x.device, non_blocking=True)
    return x[index].to(device, non_blocking=True), y[index].to(device, non_blocking=True)


# -- loss --------------------------------------------------------------------------------
def compute_loss(task, outputs, targets):
    """Mean loss of a batch: cross-entropy on logits, or mean squared error."""
    if task == "classification":
        return F.cross_entropy(outputs, targets)  # logits and int64 class indices
    # Both (N, 1): an (N,) target would broadcast against (N, 1) to (N, N) and train
    # on every pairwise difference, with nothing but a warning.
    return F.mse_loss(outputs, targets)


# -- one epoch and evaluation -------------------------------------------------------------
def train_one_epoch(model, optimizer, x, y, batches, task, after_batch=None, desc="train"):
    """One pass over `batches` (index arrays); returns {"loss", "accuracy" | "mse"}.

    Loss and correct counts accumulate on the device and are read once at the end:
    a ``.item()`` per batch would wait for the GPU after every step.
    """
    device = next(model.parameters()).device
    model.train()
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), device=device)
    for index in tqdm(batches, desc=desc, leave=False):
        inputs, targets = _batch(x, y, index, device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = compute_loss(task, outputs, targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(index)
        if task == "classification":
            total_correct += (outputs.argmax(dim=1) == targets).sum()
        if after_batch is not None:
            after_batch()
    n = sum(len(index) for index in batches)
    loss = total_loss.item() / n
    if task == "classification":
        return {"loss": loss, "accuracy": total_correct.item() / n}
    return {"loss": loss, "mse": loss}


@torch.inference_mode()
def predict_tensor(model, x, batch_size):
    """Outputs for every row of x, in order, as one tensor on the model's device."""
    device = next(model.parameters()).device
    model.eval()  # dropout off, batch norm uses its running statistics
    return torch.cat([model(x[i:i + batch_size].to(device, non_blocking=True))
                      for i in range(0, len(x), batch_size)])


def predict(model, x, batch_size):
    """Logits (N, classes) or predictions (N, 1) as a float32 numpy array."""
    return predict_tensor(model, x, batch_size).cpu().numpy()


@torch.inference_mode()
def evaluate(model, x, y, task, batch_size):
    """(metrics, outputs) on one split: metrics as in metrics.json, outputs as numpy."""
    outputs = predict_tensor(model, x, batch_size)
    loss = compute_loss(task, outputs, y.to(outputs.device)).item()
    outputs, targets = outputs.cpu().numpy(), y.cpu().numpy()
    if task == "classification":
        return classification_metrics(outputs, targets, loss), outputs
    return regression_metrics(outputs, targets, loss), outputs


# -- checkpoints ------------------------------------------------------------------------
def save_checkpoint(path, model, optimizer=None, epoch=None):
    """torch.save, atomically: model only (best), or model, optimizer and epoch (last)."""
    state = model.state_dict()
    if optimizer is not None:
        state = {"model": state, "optimizer": optimizer.state_dict(), "epoch": epoch}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path, model, optimizer=None):
    """Restore a save_checkpoint file; returns the saved epoch (None for a model-only file)."""
    try:
        # weights_only=True unpickles tensors and plain containers only: a checkpoint
        # cannot run code when it is loaded (the default since torch 2.6; explicit here).
        state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"checkpoint {path} holds Python objects besides tensors; refused to "
                           f"unpickle it") from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise WeightsError(f"checkpoint {path} cannot be read ({_first_line(exc)}); it is "
                           f"missing, truncated or not a torch.save file") from None
    try:
        model.load_state_dict(state if optimizer is None else state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WeightsError(f"checkpoint {path} does not fit this model ({_first_line(exc)})") from None
    return state.get("epoch") if optimizer is not None else None


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
