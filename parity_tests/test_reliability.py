"""Reliability of all eight entry points: interrupt and resume, determinism,
non-finite losses, half-written files, and weights files that do not fit.

The interrupt tests send a real signal to a real subprocess once its log shows a
completed epoch, then ``--resume`` it and compare with an uninterrupted run of
the same seed: ``predictions.csv`` and the test metrics must be identical.
"""
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common import outputs
from common.errors import Interrupted
from common.runner import CHECKPOINTS, STATE, StopSignal, TrainingRun
from common.weights import read_weights, save_weights
from parity_tests.conftest import REPO, call, expect_nan_stop, interrupt_then_resume

RUNNERS = ["torch_impl.run_cnn", "torch_impl.run_nn", "tf2_impl.run_cnn", "tf2_impl.run_cnn_keras",
           "tf2_impl.run_nn", "tf2_impl.run_nn_keras", "tf1_compat.run_cnn", "tf1_compat.run_nn"]
# Small data and small batches: epochs long enough for a signal to land inside one.
SMALL = {"cnn": ["--dataset", "digits", "--batch-size", "20"],
         "nn": ["--dataset", "diabetes", "--batch-size", "10"]}


def _small(module):
    return SMALL["cnn" if "cnn" in module else "nn"]


def _test_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["test"]


# -- interrupt, resume, determinism ----------------------------------------------------------------
@pytest.mark.parametrize("module", RUNNERS)
def test_interrupt_then_resume_equals_uninterrupted(module, tmp_path, spawn):
    """SIGINT (SIGTERM for the TF2 runners) after epoch 1 -> exit 130/143 with a resume
    hint; --resume finishes the run with the same predictions as an uninterrupted one."""
    argv = [*_small(module), "--seed", "3", "--deterministic", "--device", "cpu"]
    interrupt_then_resume(spawn, module, argv, tmp_path)


@pytest.mark.parametrize("module", ["torch_impl.run_cnn", "tf2_impl.run_cnn_keras", "tf1_compat.run_nn"])
def test_interrupt_in_epoch_1_then_resume_starts_over(module, tmp_path, monkeypatch, capsys,
                                                      signal_in_epoch):
    """A real SIGINT (raised in-process) during the first epoch, before anything is saved:
    exit 130 with the resume hint, and --resume, as the hint says, starts the run over
    from epoch 1 and ends where an uninterrupted run ends."""
    argv = [*_small(module), "--epochs", "2", "--seed", "4", "--deterministic", "--device", "cpu"]
    signal_in_epoch(1)
    assert call(module, [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    printed = capsys.readouterr()
    assert f"--resume {tmp_path / 'cut'}" in printed.out + printed.err
    assert not (tmp_path / "cut" / CHECKPOINTS / STATE).exists()
    assert call(module, ["--resume", str(tmp_path / "cut")]) == 0
    assert "starting it again from epoch 1" in (tmp_path / "cut" / "run.log").read_text()
    assert call(module, [*argv, "--out", str(tmp_path / "full")]) == 0
    assert (tmp_path / "cut" / "predictions.csv").read_bytes() == \
        (tmp_path / "full" / "predictions.csv").read_bytes()


@pytest.mark.parametrize("module", RUNNERS)
def test_deterministic_double_run_bit_identical(module, tmp_path):
    argv = [*_small(module), "--epochs", "2", "--seed", "5", "--deterministic", "--device", "cpu"]
    for name in ("a", "b"):
        assert call(module, [*argv, "--out", str(tmp_path / name)]) == 0
    assert _test_metrics(tmp_path / "a") == _test_metrics(tmp_path / "b")
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == \
        (tmp_path / "b" / "predictions.csv").read_bytes()
    a, _ = read_weights(tmp_path / "a" / "weights.safetensors")
    b, _ = read_weights(tmp_path / "b" / "weights.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_signal_while_saving_waits_for_the_write_to_end():
    """The runner's handler raises at once, except inside deferred(): there the
    write finishes first and the stop follows it."""
    stop = StopSignal(lambda signum: f"stopped by {signum}")
    stop.install()
    written = []
    try:
        with pytest.raises(Interrupted) as raised:
            with stop.deferred():
                signal.raise_signal(signal.SIGTERM)
                written.append("checkpoint")
        assert written == ["checkpoint"] and raised.value.exit_code == 128 + signal.SIGTERM
        with pytest.raises(Interrupted, match="stopped by"):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.uninstall()


# -- non-finite losses ---------------------------------------------------------------------------
@pytest.mark.parametrize("module", RUNNERS)
def test_nan_from_huge_learning_rate_exits_3(module, tmp_path, capsys):
    expect_nan_stop(capsys, module, [*_small(module), "--epochs", "2", "--lr", "1e9", "--device",
                                     "cpu"], tmp_path / "run")


@pytest.mark.parametrize("module", ["torch_impl.run_cnn", "tf2_impl.run_cnn_keras", "tf1_compat.run_nn"])
def test_nan_injected_in_epoch_2_keeps_the_best_checkpoint(module, tmp_path, monkeypatch):
    """A loss that turns NaN after a good epoch: exit 3, and the epoch-1 checkpoint
    (never overwritten) resumes to a normal finish."""
    real_end_epoch = TrainingRun.end_epoch

    def poisoned(self, epoch, train, val):
        if epoch == 2:
            train = {**train, "loss": float("nan")}
        return real_end_epoch(self, epoch, train, val)

    out = tmp_path / "run"
    monkeypatch.setattr(TrainingRun, "end_epoch", poisoned)
    assert call(module, [*_small(module), "--epochs", "3", "--device", "cpu", "--out", str(out)]) == 3
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["best_epoch"] == 1 and len(state["history"]) == 1
    assert any(p.name.startswith(state["best_checkpoint"]) for p in (out / "checkpoint").iterdir())
    monkeypatch.setattr(TrainingRun, "end_epoch", real_end_epoch)
    assert call(module, ["--resume", str(out)]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 3


# -- nothing half-written ------------------------------------------------------------------------
def test_crash_mid_write_leaves_the_previous_file(tmp_path):
    """A process killed halfway through writing (os._exit, no clean-up at all) leaves
    the previous file untouched."""
    target = tmp_path / "metrics.json"
    outputs.write_json(target, {"version": 1})
    code = textwrap.dedent(f"""
        import os
        from common.outputs import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write('{{"version": 2, "half')
                f.flush()
                os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 9
    assert json.loads(target.read_text()) == {"version": 1}


def test_failed_write_leaves_previous_weights_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_weights(path, {"fc1.weight": np.ones((2, 3))}, {"task": "regression"})
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, {"fc1.weight": np.zeros((2, 3))}, {"task": "regression"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


# -- weights that do not fit -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """A good CNN and MLP file (from torch), and broken variants of each."""
    root = tmp_path_factory.mktemp("weights")
    files = {}
    for task, module in (("cnn", "torch_impl.run_cnn"), ("nn", "torch_impl.run_nn")):
        out = root / task
        assert call(module, [*SMALL[task], "--epochs", "1", "--device", "cpu", "--out", str(out)]) == 0
        good = out / "weights.safetensors"
        tensors, meta = read_weights(good)
        files[f"{task}-good"] = good
        truncated = root / f"{task}-truncated.safetensors"
        truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
        files[f"{task}-truncated"] = truncated
        extra = root / f"{task}-extra.safetensors"
        save_weights(extra, {**tensors, "fc4.weight": np.zeros((2, 2))}, meta)
        files[f"{task}-extra"] = extra
        missing = root / f"{task}-missing.safetensors"
        save_weights(missing, {k: v for k, v in tensors.items() if k != "fc2.bias"}, meta)
        files[f"{task}-missing"] = missing
    conv_bias = root / "cnn-conv-bias.safetensors"
    save_weights(conv_bias, {**read_weights(files["cnn-good"])[0], "conv1.bias": np.zeros(32)}, meta)
    files["cnn-conv-bias"] = conv_bias
    return files


@pytest.mark.parametrize("module", RUNNERS)
@pytest.mark.parametrize("case, message", [
    ("truncated", "is not a readable safetensors file"),
    ("other-architecture", "it was written for another architecture"),
    ("extra", "has unexpected tensor 'fc4.weight'"),
    ("missing", "lacks tensor 'fc2.bias'"),
    ("conv-bias", "has tensor 'conv1.bias', a convolution bias before batch norm"),
])
def test_weights_that_do_not_fit_exit_2(module, case, message, weights_files, tmp_path, capsys):
    """Every runner refuses a weights file that does not fit, in one sentence; a file of
    the first round, with conv biases, is told how to fold them into batch norm."""
    task = "cnn" if "cnn" in module else "nn"
    if case == "conv-bias" and task == "nn":
        pytest.skip("the MLP has no convolutions")
    other = "nn" if task == "cnn" else "cnn"
    path = weights_files[f"{other}-good" if case == "other-architecture" else f"{task}-{case}"]
    code = call(module, [*_small(module), "--eval-only", "--weights", str(path), "--device", "cpu",
                          "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err and str(path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
