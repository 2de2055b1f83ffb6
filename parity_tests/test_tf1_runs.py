"""Tests of tf1_compat's entry points: convergence, outputs and checkpoints, --eval-only,
bad input with exit code 2, resume restoring the global step (and so the dropout masks), and
the graph tests once more under ``disable_v2_behavior``.

The entry points run in-process through ``conftest.call`` -- in this pytest process, which
also runs TF2 eager code, so the tests check that eager mode survived. ``python -m`` calls
``disable_v2_behavior`` first; the last test runs ``test_tf1_compat.py`` and
``test_fast_tf1.py`` in a subprocess that does the same. Real signals sent to real
subprocesses, NaN losses and every kind of unfit weights file are in ``test_reliability.py``.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from common.config import BATCH_SIZE, SEED, cnn_parameter_shapes
from common.datasets import load_dataset
from common.runner import CHECKPOINTS, STATE
from common.weights import read_weights, save_weights
from parity_tests.conftest import REPO, call, expect_exit, metrics

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


def assert_eager_still_works():
    """TF1 graphs must not leak into the process: TF2 code keeps running eagerly."""
    assert tf.executing_eagerly()
    w = tf.Variable(2.0)
    with tf.GradientTape() as tape:
        loss = w * w
    assert float(tape.gradient(loss, w)) == 4.0


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """One short CNN run on digits, shared by the tests that need trained weights."""
    out = tmp_path_factory.mktemp("tf1_cnn")
    assert call("tf1_compat.run_cnn", ["--epochs", "6", "--out", str(out)]) == 0
    return out


def test_run_cnn_converges_and_keeps_eager_mode(cnn_run):
    m = metrics(cnn_run)
    assert m["implementation"] == "tf1_compat" and m["dataset"] == "digits"
    assert m["variant"] == "plain" and m["test"]["accuracy"] >= 0.9
    assert {p.name for p in cnn_run.iterdir()} >= {"metrics.json", "predictions.csv", "curves.png",
                                                   "run.log", "weights.safetensors", "run_config.json"}
    state = json.loads((cnn_run / CHECKPOINTS / STATE).read_text())
    assert state["last_checkpoint"] == "epoch0006"
    files = {p.name for p in (cnn_run / CHECKPOINTS).iterdir()}
    assert {f"{state['last_checkpoint']}.index", f"{state['best_checkpoint']}.index"} <= files
    tensors, _ = read_weights(cnn_run / "weights.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == cnn_parameter_shapes((8, 8, 1), 10)
    assert_eager_still_works()


def test_run_nn_converges_and_keeps_eager_mode(tmp_path):
    assert call("tf1_compat.run_nn", ["--epochs", "30", "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    assert m["dataset"] == "friedman" and m["test"]["r2"] >= 0.8
    assert_eager_still_works()


def test_eval_only_reproduces_the_test_metrics(cnn_run, tmp_path):
    argv = ["--eval-only", "--weights", str(cnn_run / "weights.safetensors"), "--out", str(tmp_path)]
    assert call("tf1_compat.run_cnn", argv) == 0
    assert metrics(tmp_path)["test"]["accuracy"] == pytest.approx(metrics(cnn_run)["test"]["accuracy"])
    assert metrics(tmp_path)["test"]["loss"] == pytest.approx(metrics(cnn_run)["test"]["loss"], rel=1e-4)
    assert metrics(tmp_path)["best_epoch"] == 0 and metrics(tmp_path)["epochs"] == []


def test_bad_input_is_one_sentence_and_exit_2(cnn_run, tmp_path, capsys):
    tensors, meta = read_weights(cnn_run / "weights.safetensors")
    save_weights(tmp_path / "rgb.safetensors",  # made for RGB images
                 {**tensors, "conv1.weight": np.zeros((32, 3, 3, 3), np.float32)}, meta)
    save_weights(tmp_path / "old.safetensors",  # the format before conv biases were dropped
                 {**tensors, "conv1.bias": np.zeros(32, np.float32)}, meta)
    out = ["--epochs", "1", "--out", str(tmp_path / "o")]
    cases = [
        ("tf1_compat.run_cnn", ["--weights", str(tmp_path / "rgb.safetensors")],
         "'conv1.weight' has shape (32, 3, 3, 3), expected (32, 1, 3, 3)"),
        ("tf1_compat.run_cnn", ["--weights", str(tmp_path / "old.safetensors")], "'conv1.bias'"),
        ("tf1_compat.run_nn", ["--weights", str(cnn_run / "weights.safetensors")], "unexpected tensor"),
        ("tf1_compat.run_cnn", ["--weights", str(tmp_path / "missing.safetensors")], "does not exist"),
        ("tf1_compat.run_cnn", ["--eval-only"], "--eval-only needs --weights"),
    ]
    if not HAS_GPU:
        cases.append(("tf1_compat.run_nn", ["--device", "cuda"], "no GPU is visible"))
    for module, argv, message in cases:
        expect_exit(capsys, module, [*argv, *out], 2, message)


def test_resume_restores_the_global_step_and_so_the_dropout_masks(tmp_path, monkeypatch, capsys,
                                                                  signal_in_epoch):
    """SIGINT as epoch 2 starts (in-process, into the runner's own handler), then --resume:
    the checkpoint of epoch 1 holds the global step the dropout masks are keyed on, and the
    resumed run ends with the uninterrupted run's predictions."""
    argv = ["--dataset", "digits", "--epochs", "2", "--deterministic", "--device", "cpu"]
    signal_in_epoch(2)
    assert call("tf1_compat.run_cnn", [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert "--resume" in capsys.readouterr().err + (tmp_path / "cut" / "run.log").read_text()
    steps_per_epoch = math.ceil(len(load_dataset("digits", "image", "data", SEED, False).x_train)
                                / BATCH_SIZE)
    checkpoint = str(tmp_path / "cut" / CHECKPOINTS / "epoch0001")
    assert tf.train.load_variable(checkpoint, "global_step") == steps_per_epoch
    assert call("tf1_compat.run_cnn", ["--resume", str(tmp_path / "cut")]) == 0
    assert call("tf1_compat.run_cnn", [*argv, "--out", str(tmp_path / "full")]) == 0
    assert (tmp_path / "cut" / "predictions.csv").read_bytes() == \
        (tmp_path / "full" / "predictions.csv").read_bytes()
    assert metrics(tmp_path / "cut")["test"] == metrics(tmp_path / "full")["test"]


def test_graph_tests_pass_under_tf1_behavior():
    """test_tf1_compat.py and test_fast_tf1.py in a process that called disable_v2_behavior,
    as the entry points do: reference variables, v1 Switch/Merge conds in the plain graph.
    (session_basics compares with eager TF2, which that process no longer has.)"""
    script = ("import sys, common, tensorflow as tf, pytest; "
              "tf.compat.v1.disable_v2_behavior(); "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not session_basics', "
              "'parity_tests/test_tf1_compat.py', 'parity_tests/test_fast_tf1.py']))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
