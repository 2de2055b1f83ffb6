"""tf2_impl's training recipes, function by function: the shared rules of ``common/recipes.py``
and the torch twin (``torch_impl.train``) as the reference. The whole runs are in
``test_recipes_tf2_runs.py``.

* schedules: the Keras schedules, ``PlateauCallback`` (``fit``) and ``apply_plateau`` (the
  GradientTape loop) give torch's rates and ``epoch_lr``'s over many epochs;
* weights after a few steps from the same initial weights and batches equal the torch
  twin's with --clip-grad-norm, --weight-decay and --label-smoothing (float32 tolerance),
  and with --mixed-precision bf16 within bf16's (stated in the test); fp16's loss scaling;
* --augment: every TF2 feed gives ``common.recipes.augment_batch``'s batches, as torch's does.
"""
import argparse

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from common import config, layout, recipes
from common.datasets import batch_indices
from tf2_impl import fast, models, train
from tf2_impl.recipes import PlateauCallback, apply_plateau, learning_rate, precision_policy
from torch_impl import models as torch_models
from torch_impl import train as torch_train

DIGITS, CLASSES = (8, 8, 1), 10


def _args(**flags):
    """The recipe arguments as the command line gives them, with its defaults."""
    defaults = dict(lr=1e-3, epochs=10, lr_schedule="constant", lr_step=10, lr_gamma=0.5,
                    plateau_patience=recipes.PLATEAU_PATIENCE,
                    plateau_factor=recipes.PLATEAU_FACTOR,
                    plateau_threshold=recipes.PLATEAU_THRESHOLD)
    return argparse.Namespace(**{**defaults, **flags})


# -- schedules ------------------------------------------------------------------------------------
def _plateau_losses(n=30, seed=0):
    """Validation losses that improve, stall, and improve by less than the threshold."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([-0.05, -0.0005, 0.0, 0.002], size=n, p=[0.4, 0.2, 0.2, 0.2])
    return list(1.0 + np.cumsum(steps))


@pytest.mark.parametrize("schedule", ["step", "cosine", "plateau"])
def test_the_keras_schedules_give_torchs_rates_and_the_shared_rule(schedule):
    """30 epochs of 7 steps: the rate at each epoch's first step, from the Keras schedule
    (step, cosine), from ``PlateauCallback`` fed the losses as ``fit`` would and from
    ``apply_plateau`` (plateau), equals torch's scheduler's and ``epoch_lr``'s. Keras
    computes the rates in float32: within 1e-6 of the initial rate of the float64 rule
    (``recorded_lr``'s 7 digits cannot absorb that for the cosine's values; its 1 + cos
    near the end loses digits)."""
    epochs, spe, losses = 30, 7, _plateau_losses()
    args = _args(epochs=epochs, lr_schedule=schedule, lr_step=3, lr_gamma=0.7,
                 plateau_patience=2, plateau_threshold=1e-3)
    model = models.build_mlp(3, "sequential")
    optimizer = train.make_optimizer(model, learning_rate(args, spe))  # fit's
    tape_optimizer = train.make_optimizer(model, learning_rate(args, spe))
    model.compile(optimizer=optimizer, loss="mse")
    fit_plateau = PlateauCallback(args, [])
    fit_plateau.set_model(model)
    if schedule == "plateau":  # as fit_callbacks: a schedule's rate cannot be set
        fit_plateau.on_train_begin()
    torch_param = torch.nn.Parameter(torch.zeros(1))
    torch_optimizer = torch.optim.Adam([torch_param], lr=args.lr)
    scheduler = torch_train.make_scheduler(torch_optimizer, args, spe)
    keras_lrs, tape_lrs, torch_lrs, rule = [], [], [], []
    for epoch in range(1, epochs + 1):
        keras_lrs.append(float(optimizer.learning_rate))
        tape_lrs.append(float(tape_optimizer.learning_rate))
        torch_lrs.append(torch_optimizer.param_groups[0]["lr"])
        rule.append(recipes.epoch_lr(args, epoch, spe, losses[:epoch - 1]))
        for keras_optimizer in (optimizer, tape_optimizer):
            keras_optimizer.iterations.assign_add(spe)  # an epoch of optimizer steps
        for _ in range(spe):
            torch_optimizer.step()
            if schedule == "cosine":  # as torch_impl.train.train_one_epoch
                scheduler.step()
        if schedule == "plateau":
            fit_plateau.on_epoch_end(epoch - 1, {"val_loss": losses[epoch - 1]})
            apply_plateau(tape_optimizer, args, losses[:epoch])
        torch_train.step_epoch_scheduler(scheduler, losses[epoch - 1])
    assert len(set(rule)) >= 4, rule  # the rate really changes
    np.testing.assert_allclose(torch_lrs, rule, rtol=1e-12)
    for lrs in (keras_lrs, tape_lrs):
        np.testing.assert_allclose(lrs, rule, rtol=0, atol=1e-6 * args.lr)


# -- weights after a few steps, against torch ------------------------------------------------------
def _batches(steps=3, n=20):
    rngs = [np.random.default_rng(s) for s in range(steps)]
    return [(r.normal(size=(n, *DIGITS)).astype(np.float32), r.integers(0, CLASSES, n)) for r in rngs]


def _initial_weights():
    torch.manual_seed(0)
    return torch_models.export_weights(torch_models.build_cnn(DIGITS, CLASSES))


def _torch_steps(weights, batches, lr=1e-3, weight_decay=None, clip=None, smoothing=None,
                 precision="off"):
    """torch_impl.train's loss, optimizer and training epoch, one batch an epoch."""
    model = torch_models.build_cnn(DIGITS, CLASSES)
    torch_models.import_weights(model, weights)
    loss_fn = torch_train.make_loss("classification", smoothing)
    optimizer = torch_train.make_optimizer(model, lr, weight_decay)
    for t, (x, y) in enumerate(batches, start=1):
        # Keras adds eps to sqrt(v) before the bias correction, torch after it
        # (test_pitfall_adam_eps_default_1e8_vs_1e7): this eps makes torch's update Keras's.
        optimizer.param_groups[0]["eps"] = config.ADAM_EPS / np.sqrt(1 - config.ADAM_BETA2 ** t)
        batch = [(torch.from_numpy(layout.nhwc_to_nchw(x)), torch.from_numpy(y))]
        torch_train.train_one_epoch(model, batch, loss_fn, optimizer, "classification",
                                    clip_grad_norm=clip, precision=precision)
    return torch_models.export_weights(model)


def _tf2_steps(weights, batches, lr=1e-3, weight_decay=None, clip=None, smoothing=None,
               precision="off"):
    with precision_policy(precision):
        model = models.build_cnn(DIGITS, CLASSES)
    models.import_weights(model, weights)
    optimizer = train.make_optimizer(model, lr, weight_decay, clip)
    step = train.make_train_step(model, train.make_loss("classification", smoothing), optimizer)
    for x, y in batches:
        step(tf.constant(x), tf.constant(y))
    return models.export_weights(model)


def _max_difference(a, b):
    """The largest difference over the parameters (moving variances apart: Keras folds the
    biased batch variance into them, torch the unbiased one; test_parity says more)."""
    return max(float(np.abs(a[k] - b[k]).max()) for k in a if not k.endswith("running_var"))


RECIPES = {"clip": {"clip": 0.05}, "weight_decay": {"weight_decay": 0.5},
           "label_smoothing": {"smoothing": 0.2}}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_three_steps_with_a_recipe_give_the_torch_twins_weights(recipe, monkeypatch):
    """From the same weights and batches (dropout off: each framework draws its own masks),
    three steps with global-norm clipping below the gradients' norm, decoupled weight
    decay, or label smoothing give torch's weights within 1e-5; and the recipe moved them
    by far more than that from the run without it."""
    monkeypatch.setattr(config, "DROPOUT", 0.0)
    weights, batches = _initial_weights(), _batches()
    expected = _torch_steps(weights, batches, **RECIPES[recipe])
    got = _tf2_steps(weights, batches, **RECIPES[recipe])
    assert _max_difference(got, expected) <= 1e-5
    assert _max_difference(got, _tf2_steps(weights, batches)) >= 1e-3


def test_bf16_computes_like_torch_autocast_within_bf16_rounding(monkeypatch):
    """--mixed-precision bf16: the layers compute in bfloat16, the variables and the logits
    (fc3) stay float32, and the global policy is float32 again after the build. bf16 keeps
    8 significant bits: outputs agree with torch's autocast to 3% of the logits' scale (the
    two frameworks round at different places; float32 from float32 agree to 1e-6), and
    after three Adam steps the weights differ by under a fifth of how far they moved on
    average (Adam's first steps are lr * sign(gradient): a gradient near 0 may flip sign
    under bf16 in either framework, so the largest difference is 2 * lr a step)."""
    monkeypatch.setattr(config, "DROPOUT", 0.0)
    weights, batches = _initial_weights(), _batches()
    with precision_policy("bf16"):
        model = models.build_cnn(DIGITS, CLASSES)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("fc3").compute_dtype == "float32"
    assert {v.dtype for v in model.weights} == {"float32"}
    models.import_weights(model, weights)
    x = batches[0][0]
    logits = model(x, training=True).numpy()
    assert logits.dtype == np.float32
    torch_model = torch_models.build_cnn(DIGITS, CLASSES).train()
    torch_models.import_weights(torch_model, weights)
    with torch.no_grad(), torch_train.autocast(torch.device("cpu"), "bf16"):
        torch_logits = torch_model(torch.from_numpy(layout.nhwc_to_nchw(x))).float().numpy()
    float32 = models.build_cnn(DIGITS, CLASSES)
    models.import_weights(float32, weights)
    scale = np.abs(torch_logits).max()
    assert np.abs(logits - torch_logits).max() <= 0.03 * scale
    assert np.abs(logits - float32(x, training=True).numpy()).max() >= 1e-4 * scale  # bf16 is on

    expected = _torch_steps(weights, batches, precision="bf16")
    got = _tf2_steps(weights, batches, precision="bf16")
    trained = [k for k in expected if not k.startswith("bn") or k.endswith(("weight", "bias"))]

    def mean_difference(a, b):
        return np.mean(np.concatenate([np.abs(a[k] - b[k]).ravel() for k in trained]))
    assert mean_difference(got, expected) <= 0.2 * mean_difference(expected, weights)


def test_the_policy_is_restored_when_the_build_fails():
    with pytest.raises(KeyError):
        with precision_policy("bf16"):
            models.build_cnn(DIGITS, CLASSES, api="no such api")
    assert keras.mixed_precision.global_policy().name == "float32"


# -- augmentation --------------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_every_feed_gives_the_shared_augmented_batches(flip):
    """The tape loop's feeds (plain and --fast) and fit's (plain and --fast) give, for two
    epochs, common.recipes.augment_batch of the shared batches, as torch's DataLoader does;
    and the images really moved."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(45, 8, 8, 2)).astype(np.float32)
    y = np.arange(45, dtype=np.int64)
    seed, size = 3, 20
    expected = [(augment, y[index]) for epoch in (2, 3)
                for b, index in enumerate(batch_indices(45, size, seed, epoch))
                for augment in [recipes.augment_batch(x[index], seed, epoch, b, flip)]]
    assert not np.allclose(expected[0][0], x[expected[0][1]])
    tape = {"plain": train.make_batches, "fast": fast.make_batches}
    fit = {"plain": train.make_fit_batches, "fast": fast.make_fit_batches}
    for name, make in tape.items():
        got = [(np.asarray(a), np.asarray(b)) for epoch in (2, 3)
               for a, b in make(x, y, size, seed, epoch, augment=True, flip=flip)]
        _assert_batches_equal(got, expected, name)
    torch_got = [(layout.nchw_to_nhwc(a.numpy()), b.numpy()) for epoch in (2, 3)
                 for a, b in torch_train.make_batches(layout.nhwc_to_nchw(x), y, size, seed,
                                                      epoch, augment=True, flip=flip)]
    _assert_batches_equal(torch_got, expected, "torch")
    plain_feed = fit["plain"](x, y, size, seed, 1, True, flip)
    _assert_batches_equal([plain_feed[i] for i in range(len(expected))], expected, "fit")
    fast_feed = iter(fit["fast"](x, y, size, seed, 1, True, flip))
    _assert_batches_equal([tuple(np.asarray(t) for t in next(fast_feed)) for _ in expected],
                          expected, "fast fit")


def _assert_batches_equal(got, expected, name):
    assert len(got) == len(expected), name
    for (gx, gy), (ex, ey) in zip(got, expected):
        np.testing.assert_array_equal(gy, ey, err_msg=name)
        np.testing.assert_array_equal(gx, ex, err_msg=name)


def test_the_fp16_optimizer_scales_the_loss_and_its_checkpoint_keeps_the_scale(tmp_path):
    """fp16's optimizer (its arithmetic runs anywhere; fp16 layers need a GPU): the tape
    step scales the loss by the dynamic loss scale (2 ** 15 at first) and the optimizer
    unscales the gradients, so a step equals the unscaled one (scales are powers of 2); a
    step with non-finite gradients is skipped and halves the scale, which the checkpoint
    saves and restores."""
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)
    weights = {}
    for loss_scale in (False, True):
        model = models.build_mlp(3)
        model.set_weights([np.full(w.shape, 0.1, np.float32) for w in model.get_weights()])
        optimizer = train.make_optimizer(model, 1e-3, loss_scale=loss_scale)
        train.make_train_step(model, train.make_loss("regression"), optimizer)(x, y)
        weights[loss_scale] = model.get_weights()
    assert isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert float(optimizer.scale_loss(tf.constant(1.0))) == 2.0 ** 15
    for scaled, plain in zip(weights[True], weights[False]):
        np.testing.assert_array_equal(scaled, plain)
    before = model.get_weights()
    optimizer.apply_gradients([(tf.fill(v.shape, np.inf), v) for v in model.trainable_variables])
    for after, then in zip(model.get_weights(), before):
        np.testing.assert_array_equal(after, then)
    train.save_checkpoint(tmp_path / "ckpt", model, optimizer)
    restored = models.build_mlp(3)
    restored_optimizer = train.make_optimizer(restored, 1e-3, loss_scale=True)
    train.load_checkpoint(tmp_path / "ckpt", restored, restored_optimizer)
    assert float(restored_optimizer.scale_loss(tf.constant(1.0))) == 2.0 ** 14
