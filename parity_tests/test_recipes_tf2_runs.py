"""tf2_impl's training recipes in whole runs of the six entry points: both loops record the
reference rate of every epoch (``recorded_lr(epoch_lr(...))``), all the recipe flags
together train (plain and --fast), --early-stop ends both loops, a resumed run keeps the
schedule, fp16 without a GPU is one sentence. Function by function, against torch:
``test_recipes_tf2.py``.

Runs are in-process (``conftest.call``) on digits with large batches (few steps an epoch).
"""
import argparse
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import recipes
from common.datasets import load_dataset
from parity_tests.conftest import call, expect_exit, metrics

CNN = {"tape": "tf2_impl.run_cnn", "fit": "tf2_impl.run_cnn_keras"}
SHORT = ["--dataset", "digits", "--batch-size", "300"]  # 5 steps an epoch
SCHEDULES = {"step": ["--lr-step", "2", "--lr-gamma", "0.5"], "cosine": [],
             # a threshold no loss beats after the first epoch: a cut every 2 bad epochs
             "plateau": ["--plateau-patience", "2", "--plateau-threshold", "10"]}


def _reference_lrs(out):
    """recorded_lr(epoch_lr(...)) for each epoch of a run, from its config and history."""
    run = metrics(out)
    args = argparse.Namespace(**run["config"])
    train_size = len(load_dataset(args.dataset, "image", args.data_dir, args.seed).x_train)
    steps_per_epoch = math.ceil(train_size / args.batch_size)
    losses = [e["val_loss"] for e in run["epochs"]]
    return [recipes.recorded_lr(recipes.epoch_lr(args, e["epoch"], steps_per_epoch, losses[:i]))
            for i, e in enumerate(run["epochs"])]


@pytest.mark.parametrize("loop", ["tape", "fit"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_loop_records_the_reference_rate_of_every_epoch(loop, schedule, tmp_path):
    """metrics.json's per-epoch "lr" is recorded_lr(epoch_lr(...)): exactly for step and
    plateau, within 1e-6 of the initial rate for cosine (Keras computes it in float32)."""
    out = tmp_path / "run"
    argv = [*SHORT, "--epochs", "5", "--lr-schedule", schedule, *SCHEDULES[schedule]]
    assert call(CNN[loop], [*argv, "--out", str(out)]) == 0
    lrs = [e["lr"] for e in metrics(out)["epochs"]]
    expected = _reference_lrs(out)
    assert len(set(expected)) > 1, expected
    if schedule == "cosine":
        np.testing.assert_allclose(lrs, expected, rtol=0, atol=1e-9)
    else:
        assert lrs == expected
    if schedule == "plateau":  # Keras's patience=P cuts after P bad epochs, as the rule
        assert lrs == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4]


# -- whole runs ------------------------------------------------------------------------------------
ALL = ["--lr-schedule", "plateau", "--early-stop", "8", "--weight-decay", "1e-4",
       "--clip-grad-norm", "1.0", "--mixed-precision", "bf16"]
ENTRY_POINTS = {  # module, the flags of its kind
    "run_cnn": (CNN["tape"], [*SHORT, "--augment", "--label-smoothing", "0.1"]),
    "run_cnn --fast": (CNN["tape"], [*SHORT, "--augment", "--label-smoothing", "0.1", "--fast"]),
    "run_cnn_keras": (CNN["fit"], [*SHORT, "--augment", "--label-smoothing", "0.1"]),
    "run_cnn_keras --fast": (CNN["fit"], [*SHORT, "--augment", "--label-smoothing", "0.1",
                                          "--fast"]),
    "run_rnn": ("tf2_impl.run_rnn", [*SHORT, "--label-smoothing", "0.1", "--fast"]),
    "run_rnn_keras": ("tf2_impl.run_rnn_keras", [*SHORT, "--label-smoothing", "0.1"]),
    "run_nn": ("tf2_impl.run_nn", ["--dataset", "friedman", "--lr", "0.01"]),
    "run_nn_keras": ("tf2_impl.run_nn_keras", ["--dataset", "friedman", "--lr", "0.01"]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_the_recipes_together_train_in_every_entry_point(entry, tmp_path):
    """All the recipe flags of the program's kind, bf16 included, for 3 epochs: finite,
    falling training losses, an "lr" each epoch, and Keras's global dtype policy float32
    again after the run (the tests share one process)."""
    module, flags = ENTRY_POINTS[entry]
    out = tmp_path / "run"
    assert call(module, [*flags, *ALL, "--epochs", "3", "--out", str(out)]) == 0
    assert keras.mixed_precision.global_policy().name == "float32"
    run = metrics(out)
    losses = [e["train_loss"] for e in run["epochs"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert [e["lr"] for e in run["epochs"]] == [run["config"]["lr"]] * 3  # no plateau yet


@pytest.mark.parametrize("loop", ["tape", "fit"])
def test_early_stop_ends_both_loops_after_the_patience(loop, tmp_path):
    """--early-stop 1: the run ends with the first epoch without a better validation loss,
    well before --epochs (fit: TrainingRunCallback sets model.stop_training)."""
    out = tmp_path / "run"
    assert call(CNN[loop], [*SHORT, "--epochs", "60", "--early-stop", "1", "--lr", "0.01",
                            "--out", str(out)]) == 0
    run = metrics(out)
    last = run["epochs"][-1]["epoch"]
    assert last < 60 and last - run["best_epoch"] == 1
    assert "early stop after epoch" in (out / "run.log").read_text()


@pytest.mark.parametrize("loop, schedule", [("fit", "plateau"), ("tape", "plateau"),
                                            ("fit", "step")])
def test_a_resumed_run_keeps_the_schedule(loop, schedule, tmp_path, signal_in_epoch,
                                          monkeypatch):
    """Stopped by SIGINT as epoch 3 starts and resumed: the rates of epochs 3 and 4 are the
    uninterrupted schedule's (plateau: PlateauCallback replays the history, apply_plateau
    reads it; step: the optimizer's step counter is in the checkpoint)."""
    flags = {"plateau": ["--plateau-patience", "1", "--plateau-threshold", "10"],
             "step": ["--lr-step", "1", "--lr-gamma", "0.5"]}[schedule]
    signal_in_epoch(3)
    out = tmp_path / "run"
    argv = [*SHORT, "--epochs", "4", "--lr-schedule", schedule, *flags, "--out", str(out)]
    assert call(CNN[loop], argv) == 130
    monkeypatch.undo()
    assert call(CNN[loop], ["--resume", str(out)]) == 0
    expected = {"step": [1e-3, 5e-4, 2.5e-4, 1.25e-4], "plateau": [1e-3, 1e-3, 5e-4, 2.5e-4]}
    assert [e["lr"] for e in metrics(out)["epochs"]] == expected[schedule]


@pytest.mark.parametrize("module", ["tf2_impl.run_cnn", "tf2_impl.run_nn_keras"])
def test_fp16_without_a_gpu_is_one_sentence(module, tmp_path, capsys):
    if tf.config.get_visible_devices("GPU"):
        pytest.skip("TensorFlow sees a GPU: fp16 runs there")
    expect_exit(capsys, module, ["--epochs", "1", "--mixed-precision", "fp16", "--out",
                                 str(tmp_path / "run")], 2, "fp16", "bf16")


def test_fp16_on_a_gpu_trains_in_both_loops(tf_device, tmp_path):
    """(``pytest --device cuda``) --mixed-precision fp16 trains: finite, falling losses."""
    if tf_device != "cuda":
        pytest.skip("fp16 needs a GPU: pytest --device cuda")
    for module in CNN.values():
        out = tmp_path / module
        assert call(module, [*SHORT, "--epochs", "3", "--mixed-precision", "fp16", "--device",
                             "cuda", "--out", str(out)]) == 0
        losses = [e["train_loss"] for e in metrics(out)["epochs"]]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
