"""Training recipes with one meaning in every framework: the flags and the shared rules.

``add_recipe_arguments`` adds ``--lr-schedule``, ``--early-stop``, ``--weight-decay``,
``--clip-grad-norm``, ``--augment``, ``--label-smoothing`` and ``--mixed-precision`` to
every entry point, all off by default. Each framework implements them in its own idiom
(torch: ``lr_scheduler``, ``AdamW``, ``clip_grad_norm_``, ``autocast``; Keras: schedules,
callbacks, optimizer arguments, dtype policies; TF1: ops on the global step and a
learning-rate variable). This module holds what they share, framework-free: the checks of
the flags, the rule each schedule follows (``epoch_lr``, the reference the parity tests
hold every framework to), early stopping, and the augmentation, which is numpy so that
the three frameworks can see the same augmented batches.

The rules, where the frameworks' defaults differ (``docs/PORTING.md``, "Training recipes"):

* ``step``: lr * gamma ** ((epoch - 1) // lr_step), changing at epoch boundaries (torch's
  ``StepLR`` counts ``scheduler.step()`` calls, once per epoch; Keras schedules and TF1's
  decays count optimizer steps: ``decay_steps = lr_step * steps_per_epoch``, staircase).
* ``cosine``: 0.5 * lr * (1 + cos(pi * step / total_steps)), per optimizer step (Keras's
  ``CosineDecay``, TF1's ``cosine_decay``; torch steps ``CosineAnnealingLR`` every batch).
* ``plateau``: a validation loss improves when it is below the best so far by more than
  ``--plateau-threshold`` (absolute: torch ``threshold_mode="abs"``, Keras ``min_delta``);
  after ``--plateau-patience`` epochs without improvement the rate is multiplied by
  ``--plateau-factor`` and the count starts again. Keras's ``patience=P`` reduces after P
  such epochs, torch's after P + 1: torch gets ``patience=P - 1``.
* ``--early-stop P``: training stops after P epochs without a lower validation loss than
  the best epoch's; the test split is evaluated with the best epoch's weights. The count
  is read from the run's history, so ``--resume`` keeps it.
* ``--weight-decay``: decoupled, AdamW's ``w -= lr * wd * w`` (torch ``AdamW``, Keras
  ``AdamW``; torch's ``Adam(weight_decay=)`` is L2 on the gradient instead).
* ``--clip-grad-norm``: the global norm over all gradients (Keras ``global_clipnorm``, not
  ``clipnorm``, which clips each variable on its own).
"""
import math

import numpy as np

from common.errors import UserError

SCHEDULES = ("constant", "step", "cosine", "plateau")
PRECISIONS = ("off", "bf16", "fp16")
PLATEAU_PATIENCE, PLATEAU_FACTOR, PLATEAU_THRESHOLD = 5, 0.5, 1e-4  # the course manual's rule


def add_recipe_arguments(parser, positive_int, positive_float):
    """The recipe flags (``common.cli`` passes its argument types)."""
    group = parser.add_argument_group("training recipes (all off by default)")
    group.add_argument("--lr-schedule", default="constant", choices=SCHEDULES)
    group.add_argument("--lr-step", type=positive_int, default=10, metavar="EPOCHS",
                       help="step: epochs between two decays")
    group.add_argument("--lr-gamma", type=positive_float, default=0.5,
                       help="step: the factor of each decay")
    group.add_argument("--plateau-patience", type=positive_int, default=PLATEAU_PATIENCE,
                       help="plateau: epochs without improvement before the rate is cut")
    group.add_argument("--plateau-factor", type=positive_float, default=PLATEAU_FACTOR)
    group.add_argument("--plateau-threshold", type=positive_float, default=PLATEAU_THRESHOLD,
                       help="plateau: the least decrease of the validation loss that counts "
                            "as an improvement (absolute)")
    group.add_argument("--early-stop", type=positive_int, default=None, metavar="PATIENCE",
                       help="stop after PATIENCE epochs without a better validation loss")
    group.add_argument("--weight-decay", type=positive_float, default=None,
                       help="decoupled weight decay (AdamW)")
    group.add_argument("--clip-grad-norm", type=positive_float, default=None, metavar="MAX",
                       help="clip the global gradient norm to MAX")
    group.add_argument("--augment", action="store_true",
                       help="image programs: random crop with padding, per sample, and a "
                            "horizontal flip where the dataset allows it")
    group.add_argument("--label-smoothing", type=positive_float, default=None, metavar="EPS",
                       help="classification: smooth the one-hot targets by EPS")
    group.add_argument("--mixed-precision", default="off", choices=PRECISIONS,
                       help="bf16 runs anywhere; fp16 needs a GPU")


def check_recipe_arguments(args):
    """Flag combinations that mean nothing for this program: one sentence each."""
    if args.augment and args.kind != "image":
        raise UserError(f"--augment crops and flips images; {args.module} trains on "
                        f"{args.kind} data: leave --augment out")
    if args.label_smoothing is not None and args.kind == "tabular":
        raise UserError(f"--label-smoothing is for classification; {args.module} is a "
                        f"regression: leave it out")
    if not args.plateau_factor < 1:
        raise UserError(f"--plateau-factor multiplies the rate on a plateau and must be below 1, "
                        f"got {args.plateau_factor:g}")
    if args.label_smoothing is not None and not args.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be below 1, got {args.label_smoothing:g}")


def check_precision(precision, device):
    """fp16 needs a GPU (its range needs loss scaling and CPUs lack fast fp16 kernels)."""
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise UserError(f"--mixed-precision fp16 needs a CUDA GPU and this run is on {device}; "
                        f"use --mixed-precision bf16 on a CPU")


def recorded_lr(lr):
    """The rate as metrics.json records it: to float32 precision (7 significant digits),
    since TensorFlow keeps it in float32 (5e-4 is 0.0005000000237 there). Through numpy:
    ``float()`` of a Keras variable under a ``tf.distribute`` strategy raises TypeError."""
    return float(f"{float(np.asarray(lr)):.7g}")


def plateau_lr(lr, val_losses, patience, factor, threshold):
    """The rate after the epochs whose validation losses are `val_losses` (the rule above)."""
    best, bad = math.inf, 0
    for loss in val_losses:
        if loss < best - threshold:
            best, bad = loss, 0
        else:
            bad += 1
            if bad >= patience:
                lr, bad = lr * factor, 0
    return lr


def epoch_lr(args, epoch, steps_per_epoch, val_losses=()):
    """The reference rate at the first step of `epoch` (1-based), given the validation
    losses of the epochs before it."""
    if args.lr_schedule == "step":
        return args.lr * args.lr_gamma ** ((epoch - 1) // args.lr_step)
    if args.lr_schedule == "cosine":
        step, total = (epoch - 1) * steps_per_epoch, args.epochs * steps_per_epoch
        return 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
    if args.lr_schedule == "plateau":
        return plateau_lr(args.lr, val_losses, args.plateau_patience, args.plateau_factor,
                          args.plateau_threshold)
    return args.lr


def early_stop_due(args, epoch, best_epoch):
    """True when `epoch` ends the run: --early-stop epochs without a better validation loss."""
    return args.early_stop is not None and epoch - best_epoch >= args.early_stop


# -- augmentation ------------------------------------------------------------------------------
def may_flip(dataset):
    """Whether a mirrored image is still of its class: CIFAR-10's photographs are, a mirrored
    digit is another symbol (or none), the synthetic classes are fixed patterns."""
    return bool(dataset.extra.get("mirror", False))


def augment_padding(input_shape):
    """Pixels of zero padding around an image before the crop: an eighth of its height
    (CIFAR-10: 4, the usual; digits: 1)."""
    return max(1, input_shape[0] // 8)


def augment_batch(x, seed, epoch, batch, flip, positions=None, rows=None):
    """(N, H, W, C) float images -> each randomly shifted by up to ``augment_padding``
    pixels (a crop of the zero-padded image, zeros being the normalised mean) and, when
    `flip`, mirrored left-right with probability 1/2. The draws are a function of (seed,
    epoch, batch index), so every framework sees the same batches. A data-parallel
    replica's share of a batch of `rows` rows, at `positions` in it, gets those rows'
    draws."""
    n, h, w, _ = x.shape
    pad = augment_padding(x.shape[1:])
    rng = np.random.default_rng([seed, epoch, batch, 0xA06])
    everyone = n if rows is None else rows
    tops, lefts = rng.integers(0, 2 * pad + 1, size=(2, everyone))
    mirror = rng.random(everyone) < 0.5 if flip else np.zeros(everyone, bool)
    if positions is not None:
        tops, lefts, mirror = tops[positions], lefts[positions], mirror[positions]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, tops[i]:tops[i] + h, lefts[i]:lefts[i] + w]
        out[i] = crop[:, ::-1] if mirror[i] else crop
    return out
