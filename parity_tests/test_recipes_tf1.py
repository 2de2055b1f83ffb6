"""Tests of the training recipes in tf1_compat, held to the shared rule (``common.recipes``)
and to the torch twin (``torch_impl.train``, itself tested in ``test_recipes_torch.py``):

* the learning rate of every epoch, for each schedule, is ``recorded_lr(epoch_lr)`` exactly,
  through ``recipes.LearningRate`` and real train steps (the global step moves), and
  through the entry points' metrics.json;
* from the same weights and batches, the weights after a few steps of each recipe (cosine
  schedule, AdamW decay, global-norm clip, label smoothing, all together) are torch's, and
  differ from torch's without that recipe; bf16 within a stated looser tolerance, fp16
  (loss scaling) on the CPU at graph level, since the entry points refuse it there;
* ``--augment`` batches are torch's, that is ``common.recipes.augment_batch``'s;
* every entry point trains with the recipes on (finite, falling loss), and an interrupted
  run resumes to the uninterrupted one's rates and predictions.

Dropout is off where torch is compared (each framework draws its own masks).
"""
import math

import numpy as np
import pytest
import tensorflow as tf
import torch

from common import config
from common.cli import build_parser
from common.datasets import load_dataset
from common.layout import nchw_to_nhwc, nhwc_to_nchw
from common.recipes import epoch_lr, recorded_lr
from parity_tests.conftest import call, expect_exit, metrics, random_shared_weights
from parity_tests.test_recipes_torch import ALL_IMAGE, VAL_LOSSES, expected_lrs, relative_difference
from tf1_compat import models, recipes
from tf1_compat.train import feed, make_batches, make_loss, make_optimizer, make_train_step
from torch_impl import models as torch_models
from torch_impl import train as torch_train

tf1 = tf.compat.v1
LR, STEPS, BATCH = 1e-3, 3, 50
TF1_MAINS = ["tf1_compat.run_cnn", "tf1_compat.run_nn", "tf1_compat.run_rnn"]


def recipe_args(*flags, epochs=1):
    """The parsed flags of the TF1 CNN entry point, recipe defaults for the rest."""
    return build_parser("tf1_compat.run_cnn", "image", "").parse_args(
        ["--epochs", str(epochs), "--lr", str(LR), *flags])


def build_training(args, task, model, steps_per_epoch):
    """(LearningRate, train step) of `args`, as the entry points build them."""
    loss = make_loss(task, model, args.label_smoothing)
    lr = recipes.LearningRate(args, steps_per_epoch)
    optimizer = make_optimizer(lr.tensor, args.weight_decay, args.mixed_precision)
    return lr, make_train_step(optimizer, loss, clip_grad_norm=args.clip_grad_norm)


# -- the learning rate of every epoch ------------------------------------------------------
@pytest.mark.parametrize("flags", [
    [],
    ["--lr-schedule", "step", "--lr-step", "2", "--lr-gamma", "0.5"],
    ["--lr-schedule", "step", "--lr-step", "3", "--lr-gamma", "0.1"],
    ["--lr-schedule", "cosine"],
    ["--lr-schedule", "plateau", "--plateau-patience", "2"],
    ["--lr-schedule", "plateau", "--plateau-patience", "1", "--plateau-factor", "0.3",
     "--plateau-threshold", "0.2"],
], ids=["constant", "step2", "step3", "cosine", "plateau2", "plateau1"])
def test_lr_of_every_epoch_is_the_shared_rule(flags):
    """An MLP trained 4 steps an epoch; the validation losses are VAL_LOSSES, which tell the
    plateau rules apart (test_recipes_torch.test_plateau_values_tell_the_rules_apart)."""
    args = recipe_args(*flags, epochs=len(VAL_LOSSES))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(20, 1)).astype(np.float32)
    steps = 4
    with tf.Graph().as_default(), tf1.Session() as sess:
        model = models.build_mlp(4)
        lr, train_step = build_training(args, "regression", model, steps)
        sess.run(tf1.global_variables_initializer())
        for epoch in range(1, args.epochs + 1):
            want = recorded_lr(epoch_lr(args, epoch, steps, VAL_LOSSES[:epoch - 1]))
            assert recorded_lr(lr.start_epoch(sess, VAL_LOSSES[:epoch - 1])) == want, epoch
            for inputs, targets in make_batches(x, y, len(x) // steps, seed=0, epoch=epoch):
                sess.run(train_step, feed(model, inputs, targets, training=True))
        assert sess.run(tf1.train.get_global_step()) == steps * args.epochs
        if args.lr_schedule == "cosine":  # after the last step the rate has reached 0
            assert sess.run(lr.tensor) == pytest.approx(0, abs=1e-12)


# -- the weights after a few steps, against torch ------------------------------------------
INPUT_SHAPE, CLASSES = (8, 8, 1), 10


def shared_start():
    """A fresh torch CNN's weights (digits-shaped), batch-norm statistics made random, and
    STEPS digits batches."""
    torch.manual_seed(0)
    weights = torch_models.export_weights(torch_models.build_cnn(INPUT_SHAPE, CLASSES))
    weights.update({k: v for k, v in random_shared_weights("classification", INPUT_SHAPE).items()
                    if k.startswith("bn")})
    data = load_dataset("digits", "image")
    return weights, [(data.x_train[i:i + BATCH], data.y_train[i:i + BATCH])
                     for i in range(0, STEPS * BATCH, BATCH)]


def torch_steps(args, weights, batches):
    """The torch twin's weights after one train_one_epoch per batch, with `args`' recipes."""
    model = torch_models.build_cnn(INPUT_SHAPE, CLASSES)
    torch_models.import_weights(model, weights)
    optimizer = torch_train.make_optimizer(model, args.lr, args.weight_decay)
    scheduler = torch_train.make_scheduler(optimizer, args, len(batches))
    loss_fn = torch_train.make_loss("classification", args.label_smoothing)
    for t, (x, y) in enumerate(batches, start=1):
        # TF1 adds eps to sqrt(v) before the bias correction, torch after it
        # (test_parity.test_adam_steps_agree_with_matched_defaults): this makes them agree.
        optimizer.param_groups[0]["eps"] = config.ADAM_EPS / np.sqrt(1 - config.ADAM_BETA2 ** t)
        batch = [(torch.from_numpy(nhwc_to_nchw(x)), torch.from_numpy(y))]
        torch_train.train_one_epoch(model, batch, loss_fn, optimizer, "classification",
                                    scheduler=scheduler, clip_grad_norm=args.clip_grad_norm,
                                    precision=args.mixed_precision)
    return torch_models.export_weights(model)


def tf1_steps(args, weights, batches):
    """This implementation's weights after the same steps (and its variables' dtypes)."""
    with tf.Graph().as_default(), tf1.Session() as sess:
        model = models.build_cnn(INPUT_SHAPE, CLASSES,
                                 dtype=recipes.COMPUTE_DTYPES[args.mixed_precision])
        _, train_step = build_training(args, "classification", model, len(batches))
        sess.run(tf1.global_variables_initializer())
        models.import_weights(sess, model, weights)
        for x, y in batches:
            sess.run(train_step, feed(model, x, y, training=True))
        dtypes = {v.dtype.base_dtype for v in model.variables.values()}
        return models.export_weights(sess, model), dtypes


def distance(got, want):
    """The largest excess over the comparison's tolerance (atol 2e-5 per step, rtol 1e-3,
    test_parity's for Adam steps): <= 0 is equal."""
    return max(float(np.max(np.abs(got[k] - want[k]) - 2e-5 * STEPS - 1e-3 * np.abs(want[k])))
               for k in want)


@pytest.mark.parametrize("flags", [
    ["--lr-schedule", "cosine"],
    ["--weight-decay", "5"],
    ["--clip-grad-norm", "0.05"],
    ["--label-smoothing", "0.3"],
    ["--lr-schedule", "step", "--lr-step", "1", "--weight-decay", "5", "--clip-grad-norm",
     "0.05", "--label-smoothing", "0.3"],
], ids=["cosine", "weight-decay", "clip", "smoothing", "all"])
def test_steps_match_torch(flags, monkeypatch):
    """3 steps of 50 digits from the same weights: every parameter is torch's (test_parity's
    tolerance), and is not torch's without the recipe (so each recipe really acts). The
    large decay and small clip make each visible in 3 steps of Adam, whose first step
    ignores a gradient's scale."""
    monkeypatch.setattr(config, "DROPOUT", 0.0)
    weights, batches = shared_start()
    args = recipe_args(*flags)
    got, dtypes = tf1_steps(args, weights, batches)
    assert dtypes == {tf.float32}
    assert distance(got, torch_steps(args, weights, batches)) <= 0
    assert distance(got, torch_steps(recipe_args(), weights, batches)) > 0


def update(after, before):
    return torch.from_numpy(np.concatenate([(after[k] - before[k]).ravel() for k in before]))


def precision_steps(precision):
    """(`precision`'s args, its update, the float32 update, weights, batches): 3 steps with
    the clip and the decay on; the variables stay float32 in both."""
    weights, batches = shared_start()
    recipe = ["--clip-grad-norm", "1", "--weight-decay", "0.1"]
    args = recipe_args("--mixed-precision", precision, *recipe)
    (half, half_dtypes), (full, full_dtypes) = (tf1_steps(a, weights, batches)
                                                for a in (args, recipe_args(*recipe)))
    assert half_dtypes == full_dtypes == {tf.float32}
    return args, update(half, weights), update(full, weights), weights, batches


def test_bf16_steps_stay_near_torch_bf16(monkeypatch):
    """bf16 keeps 8 significant bits, and Adam's first steps are nearly the gradient's sign,
    which bf16 flips where a gradient is near 0: after 3 steps (clip and decay on) TF1's
    bf16 update differs from torch's (autocast) by 2.9% of its norm (measured; 10% allowed),
    as far as each is from its own float32 update (TF1 3.2%, torch 3.4%), where float32
    TF1 and torch differ by 2e-6. bf16 did run: its update is not the float32 one."""
    monkeypatch.setattr(config, "DROPOUT", 0.0)
    args, half, full, weights, batches = precision_steps("bf16")
    torch_half = update(torch_steps(args, weights, batches), weights)
    assert relative_difference(half, torch_half) <= 0.1
    assert 0.005 < relative_difference(half, full) <= 0.1


def test_fp16_scales_the_loss_and_keeps_float32_variables(monkeypatch):
    """fp16 at graph level, on the CPU (the entry points refuse it without a GPU): the
    optimizer is wrapped for dynamic loss scaling (fp16 only), the variables stay float32,
    and the update stays near float32's: 1.5% of its norm apart (measured; 5% allowed;
    bf16's 3.2%: 11 significant bits against 8)."""
    monkeypatch.setattr(config, "DROPOUT", 0.0)
    _, half, full, _, _ = precision_steps("fp16")
    assert 0 < relative_difference(half, full) <= 0.05
    with tf.Graph().as_default():
        optimizer = make_optimizer(LR, precision="fp16")
        assert isinstance(optimizer, tf1.mixed_precision.MixedPrecisionLossScaleOptimizer)
        assert make_optimizer(LR, precision="bf16").__class__ is tf1.train.AdamOptimizer


@pytest.mark.parametrize("module", TF1_MAINS)
def test_fp16_without_a_gpu_is_one_sentence(module, tmp_path, capsys):
    if tf.config.get_visible_devices("GPU"):
        pytest.skip("needs a TensorFlow without a visible GPU")
    expect_exit(capsys, module, ["--mixed-precision", "fp16", "--out", str(tmp_path)], 2,
                "fp16 needs a CUDA GPU")


# -- augmentation ----------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_augmented_batches_are_torch_ones(flip):
    """Batch b of epoch e is torch's (both are augment_batch(rows, seed, e, b, flip)); the
    labels are untouched, and the images are not the plain ones."""
    data = load_dataset("synthetic", "image")
    x, y = data.x_train[:250], data.y_train[:250]
    for epoch in (1, 2):
        ours = list(make_batches(x, y, 100, 7, epoch, augment=True, flip=flip))
        plain = list(make_batches(x, y, 100, 7, epoch))
        theirs = list(torch_train.make_batches(nhwc_to_nchw(x), y, 100, 7, epoch, augment=True,
                                               flip=flip))
        assert len(ours) == len(theirs) == 3
        for (images, labels), (want, want_labels), (unchanged, _) in zip(ours, theirs, plain):
            np.testing.assert_array_equal(images, nchw_to_nhwc(want.numpy()))
            np.testing.assert_array_equal(labels, want_labels.numpy())
            assert not np.array_equal(images, unchanged)


# -- the entry points ----------------------------------------------------------------------
@pytest.mark.parametrize("module, argv", [
    ("tf1_compat.run_cnn", ["--epochs", "4", *ALL_IMAGE]),
    ("tf1_compat.run_cnn", ["--epochs", "4", "--fast", *ALL_IMAGE]),
    ("tf1_compat.run_nn", ["--epochs", "4", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
                           "--clip-grad-norm", "1.0", "--mixed-precision", "bf16"]),
    ("tf1_compat.run_rnn", ["--epochs", "3", "--lr-schedule", "step", "--lr-step", "1",
                            "--label-smoothing", "0.1", "--weight-decay", "1e-4",
                            "--clip-grad-norm", "1.0", "--mixed-precision", "bf16"]),
], ids=["cnn", "cnn-fast", "mlp", "rnn"])
def test_entry_point_trains_with_the_recipes(module, argv, tmp_path):
    """Finite, falling training loss; every epoch's lr in metrics.json is the shared rule's."""
    assert call(module, [*argv, "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    losses = [e["train_loss"] for e in m["epochs"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert [e["lr"] for e in m["epochs"]] == expected_lrs(m)
    assert len(set(e["lr"] for e in m["epochs"])) > 1 or "plateau" in argv


@pytest.mark.parametrize("argv", [
    ["--lr-schedule", "cosine", "--weight-decay", "1e-2", "--augment", "--label-smoothing", "0.1",
     "--mixed-precision", "bf16"],
    # Threshold 10: no epoch after the first improves, so the rate halves after epochs 2 and
    # 3; the plateau variable restored from epoch 2's checkpoint still holds epoch 2's rate.
    ["--fast", "--lr-schedule", "plateau", "--plateau-patience", "1", "--plateau-threshold", "10",
     "--clip-grad-norm", "0.5"],
], ids=["cosine", "plateau-fast"])
def test_resume_keeps_the_schedule(argv, tmp_path, monkeypatch, signal_in_epoch):
    """Stopped by SIGINT in epoch 3 and resumed: the global step (cosine) and the history
    (plateau) came back, so the rates and predictions are the uninterrupted run's."""
    argv = [*argv, "--epochs", "4", "--deterministic", "--device", "cpu"]
    assert call("tf1_compat.run_cnn", [*argv, "--out", str(tmp_path / "whole")]) == 0
    signal_in_epoch(3)
    assert call("tf1_compat.run_cnn", [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert call("tf1_compat.run_cnn", ["--resume", str(tmp_path / "cut")]) == 0
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    lrs = [e["lr"] for e in whole["epochs"]]
    assert [e["lr"] for e in cut["epochs"]] == lrs == expected_lrs(whole)
    assert len(set(lrs)) == (4 if "cosine" in argv else 3)
    assert (tmp_path / "cut" / "predictions.csv").read_bytes() == \
        (tmp_path / "whole" / "predictions.csv").read_bytes()
