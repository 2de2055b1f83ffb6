"""The training-recipe rules of ``common/recipes.py``, the checks ``common.cli`` makes of the
flags, and what ``common.runner.TrainingRun`` does with them (the per-epoch lr, early
stopping, --resume). ``epoch_lr``, ``plateau_lr`` and ``early_stop_due`` are the reference the
framework tests (test_recipes_torch.py, test_recipes_tf2.py, test_recipes_tf1.py) hold every
entry point to; here they are held to the library callbacks they stand for, configured as
docs/PORTING.md says (the pitfalls are test_recipes_pitfalls.py).
"""
import json
import math

import numpy as np
import pytest
import torch
import keras

from common import cifar10, cli, datasets, recipes
from common.recipes import augment_batch, early_stop_due, epoch_lr, plateau_lr, recorded_lr
from common.runner import TrainingRun
from parity_tests.conftest import expect_exit
from parity_tests.test_foundation import make_cifar_archive
from parity_tests.test_recipes_pitfalls import keras_plateau_lrs, torch_plateau_lrs

MODULES = {"image": "torch_impl.run_cnn", "tabular": "torch_impl.run_nn", "sequence": "torch_impl.run_rnn"}


def parse(argv=(), kind="image"):
    return cli.parse_args(cli.build_parser(MODULES[kind], kind, "test"), list(argv))


# -- the flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODULES)
def test_recipe_flags_are_off_by_default(kind):
    args = parse(kind=kind)
    assert (args.lr_schedule, args.early_stop, args.weight_decay, args.clip_grad_norm,
            args.augment, args.label_smoothing, args.mixed_precision) == (
        "constant", None, None, None, False, None, "off")
    assert (args.plateau_patience, args.plateau_factor) == (5, 0.5)  # the manual's rule
    assert {epoch_lr(args, e, 7, [1.0] * (e - 1)) for e in range(1, 51)} == {args.lr}
    assert not any(early_stop_due(args, e, 1) for e in range(1, 51))


@pytest.mark.parametrize("kind, argv, words", [
    ("tabular", ["--augment"], ("--augment", "tabular", "leave --augment out")),
    ("sequence", ["--augment"], ("--augment", "sequence", "leave --augment out")),
    ("tabular", ["--label-smoothing", "0.1"], ("--label-smoothing", "regression")),
    ("image", ["--label-smoothing", "1"], ("--label-smoothing must be below 1",)),
])
def test_meaningless_recipe_flags_exit_2_with_one_sentence(capsys, kind, argv, words):
    expect_exit(capsys, lambda a: parse(a, kind), argv, 2, *words)


@pytest.mark.parametrize("argv", [["--lr-schedule", "linear"], ["--mixed-precision", "fp32"],
                                  ["--plateau-factor", "0"], ["--early-stop", "0"],
                                  ["--weight-decay", "-1"], ["--clip-grad-norm", "inf"]])
def test_recipe_flags_reject_nonsense_values(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_recipe_flags_accepted_where_they_mean_something():
    assert parse(["--augment", "--label-smoothing", "0.1"]).augment
    assert parse(["--label-smoothing", "0.1"], "sequence").label_smoothing == 0.1


def test_fp16_without_a_gpu_exits_2_with_one_sentence(capsys):
    for device in ("cpu", "mps"):
        line = expect_exit(capsys, lambda a: recipes.check_precision(a[0], device), ["fp16"], 2,
                           "--mixed-precision fp16 needs a CUDA GPU", device, "bf16")
        assert line.count(". ") == 0
    for precision, device in (("bf16", "cpu"), ("off", "cpu"), ("fp16", "cuda"), ("fp16", "cuda:0")):
        recipes.check_precision(precision, device)


# -- schedules -----------------------------------------------------------------------------------
def test_step_schedule_gives_the_target_rates_exactly():
    """The issue's target, at any number of steps per epoch; recorded to float32 precision, as
    TensorFlow holds 5e-4 (0.0005000000237)."""
    args = parse(["--epochs", "6", "--lr-schedule", "step", "--lr-step", "2", "--lr-gamma", "0.5"])
    want = [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
    for steps_per_epoch in (1, 15, 1000):
        assert [recorded_lr(epoch_lr(args, e, steps_per_epoch)) for e in range(1, 7)] == want
    assert recorded_lr(np.float32(5e-4)) == recorded_lr(float(np.float32(5e-4))) == 5e-4
    assert float(np.float32(5e-4)) != 5e-4  # why the record rounds


def test_cosine_schedule_is_per_step_like_torch_and_keras():
    """epoch_lr's cosine is CosineAnnealingLR(T_max=total steps) stepped every batch and
    Keras's CosineDecay(lr, total steps), read at each epoch's first step."""
    args = parse(["--epochs", "4", "--lr-schedule", "cosine"])
    steps_per_epoch = 10
    total = args.epochs * steps_per_epoch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    keras_schedule = keras.optimizers.schedules.CosineDecay(args.lr, total)
    for epoch in range(1, args.epochs + 1):
        want = epoch_lr(args, epoch, steps_per_epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
        assert float(keras_schedule((epoch - 1) * steps_per_epoch)) == pytest.approx(want, rel=1e-6)
        for _ in range(steps_per_epoch):
            optimizer.step()
            scheduler.step()
    assert epoch_lr(args, 3, steps_per_epoch) == pytest.approx(args.lr / 2, rel=1e-12)


def test_plateau_rule_counts_absolute_improvements_and_restarts_after_a_cut():
    lr, thr = 1.0, 0.1
    assert plateau_lr(lr, [1.0, 0.95, 0.92], 2, 0.5, thr) == 0.5       # 0.05 < thr: not better
    assert plateau_lr(lr, [1.0, 0.85, 0.8], 2, 0.5, thr) == 1.0        # 0.15 counts, reset
    assert plateau_lr(lr, [1.0] + [1.0] * 3, 2, 0.5, thr) == 0.5       # 3 bad: one cut, count 1
    assert plateau_lr(lr, [1.0] + [1.0] * 4, 2, 0.5, thr) == 0.25
    assert plateau_lr(lr, [10.0, 1.0] + [1.0] * 2, 3, 0.1, thr) == 1.0


def test_plateau_rule_is_torch_abs_with_patience_minus_one_and_keras():
    """Random validation curves: plateau_lr after every epoch equals torch's
    ReduceLROnPlateau(patience=P-1, threshold_mode="abs") and Keras's (patience=P, min_delta)."""
    rng = np.random.default_rng(0)
    for patience in (1, 2, 3):
        for _ in range(4):
            # steps whose sums stay clear of the threshold 1e-4 (Keras compares in float32)
            losses = list(1.0 + np.cumsum(rng.choice([-3.1e-4, -3.7e-5, 2.3e-4], size=16)))
            want = [plateau_lr(1.0, losses[:i + 1], patience, 0.5, 1e-4) for i in range(16)]
            assert want[-1] < 1.0 or patience == 3  # the rule cut at least once
            torch_lrs = torch_plateau_lrs(losses, patience=patience - 1, threshold=1e-4,
                                          threshold_mode="abs")
            assert torch_lrs == want
            keras_lrs = keras_plateau_lrs(losses, patience=patience, min_delta=1e-4)
            np.testing.assert_allclose(keras_lrs, want, rtol=1e-7)


# -- early stopping ------------------------------------------------------------------------------
def test_early_stop_rule_matches_keras_early_stopping():
    """early_stop_due stops where Keras's EarlyStopping(patience=P) does (min_delta 0: an
    equal loss is not better in either)."""
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    for patience in (1, 2, 4):
        args = parse(["--early-stop", str(patience)])
        for _ in range(5):
            losses = list(rng.choice([1.0, 0.9, 0.8, 0.7], size=20))
            best, ours = 0, None
            for epoch, loss in enumerate(losses, start=1):
                best = epoch if loss < min(losses[:epoch - 1], default=math.inf) else best
                if early_stop_due(args, epoch, best):
                    ours = epoch
                    break
            callback = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience)
            callback.set_model(model)
            model.stop_training = False
            callback.on_train_begin()
            theirs = None
            for epoch, loss in enumerate(losses, start=1):
                callback.on_epoch_end(epoch - 1, {"val_loss": float(loss)})
                if model.stop_training:
                    theirs = epoch
                    break
            assert ours == theirs


def test_early_stop_ends_the_run_and_resume_keeps_the_count(tmp_path):
    """TrainingRun with --early-stop 3 and a plateau schedule (patience 2): validation losses
    best at epoch 2, the run interrupted after epoch 3 and resumed: it records each epoch's
    rate, stops after epoch 5 (3 epochs without a better loss) though --epochs is 10, and
    load_best() gives epoch 2's weights."""
    dataset = datasets.load_dataset("digits", "image")
    losses = {1: 1.0, 2: 0.8, 3: 0.9, 4: 0.85, 5: 0.95, 6: 0.1}
    weights = {}

    def save(path):
        path.with_suffix(".json").write_text(json.dumps(weights))

    def load(path):
        weights.update(json.loads(path.with_suffix(".json").read_text()))

    def train(argv, last):
        args = parse(argv)
        run = TrainingRun(args, "test", dataset, "cpu", save, load, lr=lambda: epoch_lr(
            args, run.epoch, 3, run.val_losses()))
        try:
            for epoch in run.epochs():
                weights["epoch"] = epoch
                run.end_epoch(epoch, {"loss": 0.5, "accuracy": 0.5},
                              {"loss": losses[epoch], "accuracy": 0.5})
                if epoch == last:
                    break
            run.load_best()
        finally:
            run.stop.uninstall()
        return run
    out = str(tmp_path / "run")
    first = train(["--epochs", "10", "--early-stop", "3", "--lr-schedule", "plateau",
                   "--plateau-patience", "2", "--out", out], last=3)
    assert first.val_losses() == [1.0, 0.8, 0.9] and not first.should_stop
    run = train(["--resume", out], last=None)
    assert [e["epoch"] for e in run.history] == [1, 2, 3, 4, 5] and run.should_stop
    assert [e["lr"] for e in run.history] == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4]
    assert weights["epoch"] == run.best_epoch == 2
    assert "early stop after epoch 5" in (tmp_path / "run" / "run.log").read_text()


# -- augmentation --------------------------------------------------------------------------------
def windows(x, out, pad):
    """(top, left, mirrored) of the padded image each output is, or None."""
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    found = []
    for p, o in zip(padded, out):
        found.append(next(((i, j, m) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                           for m in (False, True)
                           if np.array_equal(p[i:i + h, j:j + w][:, ::-1] if m else p[i:i + h, j:j + w], o)),
                          None))
    return found


def test_augment_padding_is_an_eighth_of_the_height():
    assert recipes.augment_padding((32, 32, 3)) == 4 and recipes.augment_padding((8, 8, 1)) == 1


def test_augment_batch_crops_each_sample_on_its_own():
    """Each sample is its own window of the zero-padded image (Keras's RandomCrop takes one
    per batch); the draws depend on (seed, epoch, batch) only; the input is left as it was."""
    x = np.random.default_rng(2).normal(size=(64, 8, 8, 1)).astype(np.float32)
    kept = x.copy()
    out = augment_batch(x, 0, 1, 0, flip=False)
    np.testing.assert_array_equal(x, kept)
    found = windows(x, out, 1)
    assert None not in found and not any(m for _, _, m in found)
    assert len({(i, j) for i, j, _ in found}) == 9  # all 3x3 shifts occur
    np.testing.assert_array_equal(out, augment_batch(x, 0, 1, 0, flip=False))
    for other in ((1, 1, 0), (0, 2, 0), (0, 1, 1)):
        assert not np.array_equal(out, augment_batch(x, *other, flip=False))


def test_augment_batch_flips_left_right_only_when_allowed(tmp_path):
    """About half mirrored left-right with flip=True, never upside down; the dataset says
    whether it may flip: CIFAR-10 yes, digits and synthetic no."""
    x = np.random.default_rng(3).normal(size=(256, 32, 32, 3)).astype(np.float32)
    found = windows(x, augment_batch(x, 5, 2, 7, flip=True), 4)
    assert None not in found
    assert 0.4 < np.mean([m for _, _, m in found]) < 0.6
    assert not recipes.may_flip(datasets.load_dataset("digits", "image"))
    assert not recipes.may_flip(datasets.load_dataset("synthetic", "image"))
    served = tmp_path / "served.tar.gz"
    cifar10.download(tmp_path / "data", url=served.as_uri(), md5=make_cifar_archive(served))
    assert recipes.may_flip(datasets.load_dataset("cifar10", "image", data_dir=tmp_path / "data"))

