"""Devices, data loading, the training and evaluation loops and checkpoints in PyTorch.

Twins: ``tf2_impl/train.py`` (a ``tf.data`` GradientTape loop, or ``model.fit``)
and ``tf1_compat/train.py`` (``session.run`` of a train op); same names, same
order. The idioms to learn here: a ``DataLoader`` over a ``TensorDataset`` feeds
the batches; ``model.train()`` / ``model.eval()`` switch dropout and batch norm;
gradients accumulate until ``optimizer.zero_grad()``; ``loss.backward()`` fills
them and ``optimizer.step()`` applies them; evaluation runs under
``torch.inference_mode()``. The faster feed of ``--fast`` is ``torch_impl/fast.py``.

The training recipes (``common/recipes.py`` states each rule) in torch's idiom: an
``lr_scheduler`` (``StepLR`` and ``ReduceLROnPlateau`` stepped at each epoch's end,
``CosineAnnealingLR`` after every optimizer step), ``AdamW``, ``clip_grad_norm_``,
``CrossEntropyLoss(label_smoothing=)``, ``torch.autocast`` (with a ``GradScaler`` for
fp16), and the augmentation in the DataLoader's ``collate_fn``.
"""
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader, TensorDataset, default_collate
from tqdm import tqdm

from common import config
from common.datasets import batch_indices
from common.distributed import SINGLE
from common.layout import nchw_to_nhwc, nhwc_to_nchw
from common.recipes import augment_batch
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


def make_batches(x, y, batch_size, seed=None, epoch=1, augment=False, flip=False):
    """A DataLoader over (x, y) in the batch order every framework shares.

    The batch sampler yields ``common.datasets.batch_indices(seed, epoch)``, the
    order the TF twins use too (a ``shuffle=True`` DataLoader would draw its own);
    with ``seed=None`` the batches are in order (validation, test). With `augment`
    (NCHW images) the ``collate_fn`` crops, and mirrors when `flip`, each batch.
    """
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    order = batch_indices(len(dataset), batch_size, seed, epoch, shuffle=seed is not None)
    sampler = [index.tolist() for index in order]
    if not augment:
        return DataLoader(dataset, batch_sampler=sampler)
    # The draws are a function of the batch's number, which a collate_fn is not told:
    # each row carries its batch's number (torchvision puts MixUp and CutMix here too),
    # its place in the batch and the batch's size (a DDP rank collates a share of it).
    place = torch.empty(len(dataset), 3, dtype=torch.int64)
    for b, index in enumerate(order):
        place[index] = torch.stack([torch.full((len(index),), b), torch.arange(len(index)),
                                    torch.full((len(index),), len(index))], dim=1)

    def collate(rows):
        images, labels, places = default_collate(rows)
        batch, positions, size = int(places[0, 0]), places[:, 1].numpy(), int(places[0, 2])
        return augment_images(images, seed, epoch, batch, flip, positions, size), labels

    return DataLoader(TensorDataset(*dataset.tensors, place), batch_sampler=sampler,
                      collate_fn=collate)


def augment_images(images, seed, epoch, batch, flip, positions=None, rows=None):
    """An (N, C, H, W) batch through ``common.recipes.augment_batch``, which takes the
    TF twins' NHWC layout, back on the batch's device (`positions`, `rows`: a share of a
    batch, as there)."""
    nhwc = augment_batch(nchw_to_nhwc(images.cpu().numpy()), seed, epoch, batch, flip,
                         positions, rows)
    return torch.from_numpy(nhwc_to_nchw(nhwc)).to(images.device)


def make_loss(task, label_smoothing=None):
    """Cross-entropy on logits and int64 class indices (smoothed by `label_smoothing`), or
    mean squared error.

    For MSE, outputs and targets must both be (N, 1): an (N,) target would broadcast
    against (N, 1) to (N, N) and train on every pairwise difference, with only a warning.
    """
    if task == "classification":
        # torch smooths integer targets itself; Keras's SparseCategoricalCrossentropy cannot.
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing or 0.0)
    return nn.MSELoss()


def make_optimizer(model, lr, weight_decay=None):
    """Adam with the shared constants (torch's defaults already; Keras's eps differs), or
    AdamW for a decoupled `weight_decay` on every parameter.

    ``Adam(weight_decay=)`` would add L2 to the gradient instead, which Adam's scaling
    then weakens: not what Keras's or TF1's decay does.
    """
    if weight_decay is None:
        return torch.optim.Adam(model.parameters(), lr=lr,
                                betas=(config.ADAM_BETA1, config.ADAM_BETA2), eps=config.ADAM_EPS)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             betas=(config.ADAM_BETA1, config.ADAM_BETA2), eps=config.ADAM_EPS)


def make_scheduler(optimizer, args, steps_per_epoch):
    """The --lr-schedule of `args` as a torch scheduler, or None for a constant rate."""
    if args.lr_schedule == "step":
        return StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    if args.lr_schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    if args.lr_schedule == "plateau":
        # torch reduces after patience + 1 bad epochs and its threshold is relative by
        # default; the shared rule (and Keras's min_delta) counts P and is absolute.
        return ReduceLROnPlateau(optimizer, mode="min", factor=args.plateau_factor,
                                 patience=args.plateau_patience - 1,
                                 threshold=args.plateau_threshold, threshold_mode="abs")
    return None


def step_epoch_scheduler(scheduler, val_loss):
    """At an epoch's end: StepLR counts epochs, ReduceLROnPlateau reads the validation
    loss. CosineAnnealingLR counts optimizer steps: ``train_one_epoch`` steps it."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif isinstance(scheduler, StepLR):
        scheduler.step()


def make_scaler(precision, device):
    """A GradScaler for fp16 (its gradients underflow without loss scaling); None for
    bf16, which has float32's range, and for float32."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def autocast(device, precision):
    """``torch.autocast`` for --mixed-precision bf16|fp16; off for "off"."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(model, batches, loss_fn, optimizer, task, *, scheduler=None,
                    clip_grad_norm=None, precision="off", scaler=None, world=SINGLE):
    """One pass over `batches`; returns {"loss", "accuracy" | "mse"}, means over the rows.

    Loss and correct counts add up on the device and are read once at the end:
    a ``.item()`` per batch would wait for the GPU after every step. A
    ``CosineAnnealingLR`` `scheduler` is stepped after every optimizer step (the
    others at the epoch's end: ``step_epoch_scheduler``); `clip_grad_norm` clips the
    global gradient norm; `precision` runs the forward pass under autocast, and
    `scaler` (fp16) scales the loss. In a data-parallel `world` (`model` in DDP,
    `batches` this rank's rows) the means are over all ranks' rows.
    """
    device = next(model.parameters()).device
    # A disabled GradScaler passes everything through: one code path with and without fp16.
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    model.train()  # dropout on, batch norm normalises with the batch's statistics
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    rows = 0
    for inputs, targets in tqdm(batches, desc="train", leave=False):
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        with autocast(device, precision):
            # The loss on float32 logits, as the TF twins' float32 output layers give.
            outputs = model(inputs).float()
            loss = loss_fn(outputs, targets)
        scaler.scale(replica_loss(loss, len(targets), world)).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if isinstance(scheduler, CosineAnnealingLR):
            scheduler.step()
        total_loss += loss.detach() * len(targets)
        if task == "classification":
            correct += (outputs.argmax(dim=1) == targets).sum()
        rows += len(targets)
    if world.size > 1:  # every rank's sums: the loss and accuracy of one process's epoch
        totals = torch.stack([total_loss.double(), correct.double(),
                              torch.tensor(rows, dtype=torch.float64, device=device)])
        dist.all_reduce(totals)
        total_loss, correct, rows = totals[0], totals[1], totals[2].item()
    loss = total_loss.item() / rows
    if task == "classification":
        return {"loss": loss, "accuracy": correct.item() / rows}
    return {"loss": loss, "mse": loss}


def replica_loss(loss, rows, world):
    """The loss whose gradient DDP averages: this rank's sum * world size / the global row
    count of the step (one process: the mean `loss` itself).

    DDP averages the ranks' gradients. Averaging each rank's mean would weight a 13-row
    shard like a 14-row one (27 rows over 2 ranks): not the batch's mean. The global count
    is all-reduced, one scalar next to DDP's gradient buckets, so any loader works.
    """
    if world.size == 1:
        return loss
    global_rows = torch.tensor(rows, dtype=loss.dtype, device=loss.device)
    dist.all_reduce(global_rows)
    return loss * rows * world.size / global_rows


@torch.inference_mode()
def predict(model, batches, precision="off"):
    """Logits (N, classes) or predictions (N, 1) of every batch, in order, as numpy;
    computed in `precision`, as the TF twins' dtype policies do, returned as float32."""
    device = next(model.parameters()).device
    model.eval()  # dropout off, batch norm uses its running statistics
    with autocast(device, precision):
        outputs = [model(inputs.to(device)).float() for inputs, _ in batches]
    return torch.cat(outputs).cpu().numpy()


@torch.inference_mode()
def evaluate(model, batches, loss_fn, task, precision="off"):
    """(metrics, outputs) on one split: metrics as in metrics.json, outputs as numpy."""
    outputs = predict(model, batches, precision)
    targets = torch.cat([targets for _, targets in batches]).cpu()
    loss = loss_fn(torch.from_numpy(outputs), targets).item()
    if task == "classification":
        return classification_metrics(outputs, targets.numpy(), loss), outputs
    return regression_metrics(outputs, targets.numpy(), loss), outputs


def save_checkpoint(path, model, optimizer, scheduler=None, scaler=None):
    """Model, optimizer (and scheduler, scaler) state_dicts in ``<path>.pt``, written
    atomically; returns that file. The scheduler's state is its position in the
    schedule, the scaler's its current loss scale: --resume goes on from both."""
    file = Path(path).with_suffix(".pt")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state.update({name: part.state_dict() for name, part in
                  (("scheduler", scheduler), ("scaler", scaler)) if part is not None})
    with atomic_path(file) as tmp:
        torch.save(state, tmp)
    return file


def load_checkpoint(path, model, optimizer=None, scheduler=None, scaler=None):
    """Restore what ``save_checkpoint(path, ...)`` wrote (the optimizer, scheduler and
    scaler too, when given)."""
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
        for name, part in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if part is not None:
                part.load_state_dict(state[name])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"checkpoint {file} does not fit this model ({_first_line(exc)})") from None


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
