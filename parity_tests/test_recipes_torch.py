"""Tests of the training recipes in torch_impl, the reference the TF2 and TF1 twins are
held to (``test_recipes_tf2.py``, ``test_recipes_tf1.py`` compare against these functions).

* the learning rate of every epoch, for each schedule, equals ``common.recipes.epoch_lr``
  (the shared rule), through ``make_scheduler``, ``train_one_epoch`` and
  ``step_epoch_scheduler``, and through the entry points' metrics.json;
* one step of each recipe from the same weights and batch against its formula: AdamW's
  decoupled decay, the global-norm clip, the smoothed cross-entropy; bf16 against float32
  within a stated looser tolerance (fp16 on a GPU only, ``--device cuda``);
* ``--augment`` batches (plain and ``--fast``) are ``common.recipes.augment_batch``'s;
* every entry point trains with the recipes on (finite, improving loss), and an
  interrupted run resumes to the uninterrupted one's schedule and predictions.
"""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.cli import build_parser
from common.datasets import batch_indices, load_dataset
from common.layout import nchw_to_nhwc, nhwc_to_nchw
from common.recipes import augment_batch, epoch_lr, recorded_lr
from parity_tests.conftest import call, expect_exit, metrics
from torch_impl import fast, run_cnn, run_nn, run_rnn
from torch_impl.models import build_cnn
from torch_impl.train import (make_batches, make_loss, make_optimizer, make_scaler,
                              make_scheduler, step_epoch_scheduler, train_one_epoch)

LR = 1e-3


def recipe_args(*flags, epochs=6):
    """The parsed flags of an entry point, with the recipe defaults for the rest."""
    return build_parser("torch_impl.run_cnn", "image", "").parse_args(
        ["--epochs", str(epochs), "--lr", str(LR), *flags])


def tiny_problem(rows=20, batch_size=5, seed=0):
    """A linear classifier and its data: 4 steps per epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = rng.integers(0, 3, rows)
    return nn.Linear(4, 3), x, y, batch_size


# -- the learning rate of every epoch ------------------------------------------------------
# Validation losses chosen to tell the rules apart: at 10, 9.9995 and 9.999 improve on the
# best by more than the absolute threshold 1e-4 and by less than torch's default relative
# one (10 * 1e-4 = 1e-3), which would count two bad epochs there; the plateaus of 2 bad
# epochs separate patience P from torch's P + 1.
VAL_LOSSES = [10.0, 9.9995, 9.999, 9.0, 9.5, 9.2, 9.1, 9.05, 9.1, 9.0]


@pytest.mark.parametrize("flags", [
    ["--lr-schedule", "constant"],
    ["--lr-schedule", "step", "--lr-step", "2", "--lr-gamma", "0.5"],
    ["--lr-schedule", "step", "--lr-step", "3", "--lr-gamma", "0.1"],
    ["--lr-schedule", "cosine"],
    ["--lr-schedule", "plateau", "--plateau-patience", "2", "--plateau-factor", "0.5"],
    ["--lr-schedule", "plateau", "--plateau-patience", "1", "--plateau-factor", "0.3",
     "--plateau-threshold", "0.2"],
], ids=["constant", "step2", "step3", "cosine", "plateau2", "plateau1"])
def test_lr_of_every_epoch_is_the_shared_rule(flags):
    args = recipe_args(*flags, epochs=len(VAL_LOSSES))
    model, x, y, batch_size = tiny_problem()
    optimizer = make_optimizer(model, LR)
    steps = math.ceil(len(x) / batch_size)
    scheduler = make_scheduler(optimizer, args, steps)
    assert (scheduler is None) == (args.lr_schedule == "constant")
    for epoch in range(1, args.epochs + 1):
        lr, want = optimizer.param_groups[0]["lr"], epoch_lr(args, epoch, steps, VAL_LOSSES[:epoch - 1])
        assert recorded_lr(lr) == recorded_lr(want), f"epoch {epoch}: {lr} != {want}"
        assert lr == pytest.approx(want, rel=1e-12)
        train_one_epoch(model, make_batches(x, y, batch_size, seed=0, epoch=epoch), make_loss(
            "classification"), optimizer, "classification", scheduler=scheduler)
        step_epoch_scheduler(scheduler, VAL_LOSSES[epoch - 1])
    if args.lr_schedule == "cosine":  # stepped every batch: the rate reaches 0 at the last step
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-15)


@pytest.mark.parametrize("wrong", [{"patience": 2, "threshold_mode": "abs"},
                                   {"patience": 1, "threshold_mode": "rel"}],
                         ids=["patience-P", "relative-threshold"])
def test_plateau_values_tell_the_rules_apart(wrong):
    """Library behaviour, pairing with the test above: ReduceLROnPlateau with patience=P,
    or with its default relative threshold, cuts the rate at other epochs on these losses
    than the shared rule (P = 2), so the test above can fail."""
    args = recipe_args("--lr-schedule", "plateau", "--plateau-patience", "2", epochs=len(VAL_LOSSES))
    optimizer = torch.optim.Adam(nn.Linear(1, 1).parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, threshold=1e-4,
                                                           **wrong)
    lrs = []
    for loss in VAL_LOSSES:
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(loss)
    want = [epoch_lr(args, epoch, 1, VAL_LOSSES[:epoch - 1]) for epoch in range(1, len(VAL_LOSSES) + 1)]
    assert lrs != want


# -- one step of each recipe against its formula ----------------------------------------
def one_step(model, optimizer, x, y, **recipe):
    """`model`'s parameters after one train_one_epoch step on the batch (x, y)."""
    batches = make_batches(x, y, len(x), seed=0, epoch=1)
    train_one_epoch(model, batches, make_loss("classification"), optimizer, "classification", **recipe)
    return [p.detach().clone() for p in model.parameters()]


def test_weight_decay_is_decoupled():
    """AdamW: w1 = w0 - lr * wd * w0 - (Adam's step), on every parameter (bias too);
    torch's Adam(weight_decay=) puts wd * w into the gradient instead and fails this."""
    model, x, y, _ = tiny_problem()
    w0 = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model)
    adam = one_step(model, make_optimizer(model, LR), x, y)
    adamw = one_step(twin, make_optimizer(twin, LR, weight_decay=0.1), x, y)
    for plain, decayed, start in zip(adam, adamw, w0):
        torch.testing.assert_close(decayed, plain - LR * 0.1 * start, rtol=0, atol=1e-7)


def test_clip_grad_norm_clips_the_global_norm():
    """With SGD at lr 1 the step is the clipped gradient: g * MAX / ||g|| over all
    parameters together (clipping each parameter on its own, Keras's clipnorm, fails)."""
    model, x, y, _ = tiny_problem()
    twin = copy.deepcopy(model)
    loss = F.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    limit = 0.5 * norm.item()
    w0 = [p.detach().clone() for p in model.parameters()]
    after = one_step(model, torch.optim.SGD(model.parameters(), lr=1.0), x, y, clip_grad_norm=limit)
    for start, end, g in zip(w0, after, grads):
        torch.testing.assert_close(start - end, g * limit / norm, rtol=1e-5, atol=1e-7)


def test_label_smoothing_is_the_smoothed_cross_entropy():
    """-sum(((1 - eps) * onehot + eps / K) * log_softmax) from integer targets, in numpy."""
    rng = np.random.default_rng(1)
    logits, y = rng.normal(size=(8, 10)), rng.integers(0, 10, 8)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    target = 0.9 * np.eye(10)[y] + 0.1 / 10
    want = -(target * log_p).sum(1).mean()
    got = make_loss("classification", 0.1)(torch.from_numpy(logits), torch.from_numpy(y))
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert make_loss("classification")(torch.from_numpy(logits), torch.from_numpy(y)).item() != \
        pytest.approx(want, rel=1e-3)


def cnn_steps(precision, device="cpu", steps=3, **recipe):
    """The digits CNN's weight update (flat) over `steps` batches from seed 0, and the
    dtypes fc3 computed in."""
    data = load_dataset("digits", "image")
    torch.manual_seed(0)
    model = build_cnn(data.input_shape, data.num_classes).to(device)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    dtypes = set()
    model.fc3.register_forward_hook(lambda m, inputs, out: dtypes.add(out.dtype))
    optimizer = make_optimizer(model, LR)
    x, y = nhwc_to_nchw(data.x_train[:100 * steps]), data.y_train[:100 * steps]
    torch.manual_seed(1)  # the same dropout masks in both precisions
    train = train_one_epoch(model, make_batches(x, y, 100), make_loss(data.task), optimizer,
                            data.task, precision=precision, **recipe)
    assert math.isfinite(train["loss"])
    return (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).cpu(), dtypes


def relative_difference(update, reference):
    return ((update - reference).norm() / reference.norm()).item()


def test_bf16_steps_stay_near_float32():
    """bf16 keeps 8 bits of mantissa, and Adam's first steps are nearly the gradient's
    sign, which bf16 flips where a gradient is near 0: after 3 steps the update differs
    from float32's by 25% of its norm (measured; 0.35 allowed), in the same direction. It
    is not equal: autocast did run (fc3 computed in bfloat16)."""
    full, full_dtypes = cnn_steps("off")
    half, half_dtypes = cnn_steps("bf16")
    assert full_dtypes == {torch.float32} and half_dtypes == {torch.bfloat16}
    assert 0 < relative_difference(half, full) <= 0.35


def test_fp16_with_loss_scaling_on_a_gpu(device):
    """fp16 needs a GradScaler (float16 gradients underflow), the clip applied to the
    unscaled gradients: after 3 steps the update is near float32's (10 bits of mantissa:
    closer than bf16's)."""
    if device != "cuda":
        pytest.skip("fp16 runs on a CUDA GPU only (run with --device cuda)")
    scaler = make_scaler("fp16", torch.device(device))
    full, _ = cnn_steps("off", device, clip_grad_norm=1.0)
    half, dtypes = cnn_steps("fp16", device, clip_grad_norm=1.0, scaler=scaler)
    assert dtypes == {torch.float16} and scaler.get_scale() > 1
    assert 0 < relative_difference(half, full) <= 0.35


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("module", [run_cnn, run_nn, run_rnn], ids=lambda m: m.MODULE)
def test_fp16_without_a_gpu_is_one_sentence(module, tmp_path, capsys):
    expect_exit(capsys, module.main, ["--mixed-precision", "fp16", "--out", str(tmp_path)], 2,
                "fp16 needs a CUDA GPU")


# -- augmentation ----------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("make", [make_batches, fast.make_batches], ids=["plain", "fast"])
def test_augmented_batches_are_the_shared_ones(make, flip):
    """Batch b of epoch e is augment_batch(the NHWC rows, seed, e, b, flip), in NCHW; the
    labels are untouched."""
    data = load_dataset("synthetic", "image")
    x, y = data.x_train[:250], data.y_train[:250]
    for epoch in (1, 2):
        order = batch_indices(len(x), 100, 7, epoch)
        got = list(make(torch.from_numpy(nhwc_to_nchw(x)), torch.from_numpy(y), 100, 7, epoch,
                        augment=True, flip=flip))
        assert len(got) == len(order)
        for b, (index, (images, labels)) in enumerate(zip(order, got)):
            want = augment_batch(x[index], 7, epoch, b, flip)
            np.testing.assert_array_equal(nchw_to_nhwc(images.numpy()), want)
            np.testing.assert_array_equal(labels.numpy(), y[index])
            assert not np.array_equal(want, x[index])


# -- the entry points ----------------------------------------------------------------------
ALL_IMAGE = ["--lr-schedule", "plateau", "--plateau-patience", "1", "--early-stop", "8",
             "--weight-decay", "1e-4", "--clip-grad-norm", "1.0", "--augment",
             "--label-smoothing", "0.1", "--mixed-precision", "bf16"]


def expected_lrs(m):
    """recorded_lr(epoch_lr) of every epoch of a finished run, from its config and history."""
    args = argparse.Namespace(**m["config"])
    data = load_dataset(m["dataset"], m["config"]["kind"], seed=args.seed)
    steps = math.ceil(len(data.x_train) / args.batch_size)
    losses = [e["val_loss"] for e in m["epochs"]]
    return [recorded_lr(epoch_lr(args, e, steps, losses[:e - 1])) for e in range(1, len(losses) + 1)]


@pytest.mark.parametrize("module, argv", [
    (run_cnn, ["--epochs", "3", *ALL_IMAGE]),
    (run_cnn, ["--epochs", "3", "--fast", *ALL_IMAGE]),
    (run_nn, ["--epochs", "3", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
              "--clip-grad-norm", "1.0", "--mixed-precision", "bf16"]),
    (run_rnn, ["--epochs", "2", "--lr-schedule", "step", "--lr-step", "1", "--label-smoothing",
               "0.1", "--weight-decay", "1e-4", "--clip-grad-norm", "1.0", "--mixed-precision",
               "bf16", "--fast"]),
], ids=["cnn", "cnn-fast", "mlp", "rnn-fast"])
def test_entry_point_trains_with_the_recipes(module, argv, tmp_path):
    """Finite, falling training loss; every epoch's lr in metrics.json is the shared rule's."""
    assert call(module.main, [*argv, "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    losses = [e["train_loss"] for e in m["epochs"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert [e["lr"] for e in m["epochs"]] == expected_lrs(m)
    assert all(math.isfinite(v) for v in m["test"].values() if isinstance(v, float))


@pytest.mark.parametrize("argv", [
    ["--lr-schedule", "cosine", "--weight-decay", "1e-2", "--augment", "--label-smoothing", "0.1"],
    # Threshold 10: every epoch after the first is without improvement, so the rate halves at
    # the end of epoch 2; a fresh ReduceLROnPlateau on resume (best loss inf) would not.
    ["--fast", "--lr-schedule", "plateau", "--plateau-patience", "1", "--plateau-threshold", "10",
     "--clip-grad-norm", "0.5"],
], ids=["cosine", "plateau-fast"])
def test_resume_keeps_the_schedule(argv, tmp_path, monkeypatch, signal_in_epoch):
    """Stopped by SIGINT in epoch 2 and resumed: the scheduler's state came back from the
    checkpoint, so the rates and predictions are the uninterrupted run's."""
    argv = [*argv, "--epochs", "3", "--deterministic"]
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "whole")]) == 0
    signal_in_epoch(2)
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert call(run_cnn.main, ["--resume", str(tmp_path / "cut")]) == 0
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [e["lr"] for e in cut["epochs"]] == [e["lr"] for e in whole["epochs"]] == expected_lrs(whole)
    assert len(set(e["lr"] for e in whole["epochs"])) == (3 if "cosine" in argv else 2)
    assert (tmp_path / "cut" / "predictions.csv").read_text() == \
        (tmp_path / "whole" / "predictions.csv").read_text()
