"""Devices, data loading, the training and evaluation loops and checkpoints in PyTorch.

Twins: ``tf2_impl/train.py`` (a ``tf.data`` GradientTape loop, or ``model.fit``)
and ``tf1_compat/train.py`` (``session.run`` of a train op); same names, same
order. The idioms to learn here: a ``DataLoader`` over a ``TensorDataset`` feeds
the batches; ``model.train()`` / ``model.eval()`` switch dropout and batch norm;
gradients accumulate until ``optimizer.zero_grad()``; ``loss.backward()`` fills
them and ``optimizer.step()`` applies them; evaluation runs under
``torch.inference_mode()``. The faster feed of ``--fast`` is ``torch_impl/fast.py``.
"""
import os
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from common import config
from common.datasets import batch_indices
from common.errors import UserError, WeightsError
from common.outputs import atomic_path, classification_metrics, regression_metrics


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


def make_batches(x, y, batch_size, seed=None, epoch=1):
    """A DataLoader over (x, y) in the batch order every framework shares.

    The batch sampler yields ``common.datasets.batch_indices(seed, epoch)``, the
    order the TF twins use too (a ``shuffle=True`` DataLoader would draw its own);
    with ``seed=None`` the batches are in order (validation, test).
    """
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    order = batch_indices(len(dataset), batch_size, seed, epoch, shuffle=seed is not None)
    return DataLoader(dataset, batch_sampler=[index.tolist() for index in order])


def make_loss(task):
    """Cross-entropy on logits and int64 class indices, or mean squared error.

    For MSE, outputs and targets must both be (N, 1): an (N,) target would broadcast
    against (N, 1) to (N, N) and train on every pairwise difference, with only a warning.
    """
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def make_optimizer(model, lr):
    """Adam with the shared constants (torch's defaults already; Keras's eps differs)."""
    return torch.optim.Adam(model.parameters(), lr=lr,
                            betas=(config.ADAM_BETA1, config.ADAM_BETA2), eps=config.ADAM_EPS)


def train_one_epoch(model, batches, loss_fn, optimizer, task):
    """One pass over `batches`; returns {"loss", "accuracy" | "mse"}, means over the rows.

    Loss and correct counts add up on the device and are read once at the end:
    a ``.item()`` per batch would wait for the GPU after every step.
    """
    device = next(model.parameters()).device
    model.train()  # dropout on, batch norm normalises with the batch's statistics
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    rows = 0
    for inputs, targets in tqdm(batches, desc="train", leave=False):
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(targets)
        if task == "classification":
            correct += (outputs.argmax(dim=1) == targets).sum()
        rows += len(targets)
    loss = total_loss.item() / rows
    if task == "classification":
        return {"loss": loss, "accuracy": correct.item() / rows}
    return {"loss": loss, "mse": loss}


@torch.inference_mode()
def predict(model, batches):
    """Logits (N, classes) or predictions (N, 1) of every batch, in order, as numpy."""
    device = next(model.parameters()).device
    model.eval()  # dropout off, batch norm uses its running statistics
    return torch.cat([model(inputs.to(device)) for inputs, _ in batches]).cpu().numpy()


@torch.inference_mode()
def evaluate(model, batches, loss_fn, task):
    """(metrics, outputs) on one split: metrics as in metrics.json, outputs as numpy."""
    outputs = predict(model, batches)
    targets = torch.cat([targets for _, targets in batches]).cpu()
    loss = loss_fn(torch.from_numpy(outputs), targets).item()
    if task == "classification":
        return classification_metrics(outputs, targets.numpy(), loss), outputs
    return regression_metrics(outputs, targets.numpy(), loss), outputs


def save_checkpoint(path, model, optimizer):
    """Model and optimizer state_dicts in ``<path>.pt``, written atomically; returns that file."""
    file = Path(path).with_suffix(".pt")
    with atomic_path(file) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    return file


def load_checkpoint(path, model, optimizer=None):
    """Restore what ``save_checkpoint(path, ...)`` wrote (the optimizer too, when given)."""
    file = Path(path).with_suffix(".pt")
    try:
        # weights_only=True unpickles tensors and plain containers only: a checkpoint
        # cannot run code when it is loaded (the default since torch 2.6; explicit here).
        state = torch.load(file, map_location=next(model.parameters()).device, weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"checkpoint {file} holds Python objects besides tensors; refused to "
                           f"unpickle it") from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise WeightsError(f"checkpoint {file} cannot be read ({_first_line(exc)}); it is "
                           f"missing, truncated or not a torch.save file") from None
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"checkpoint {file} does not fit this model ({_first_line(exc)})") from None


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
