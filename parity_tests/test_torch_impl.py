"""Tests of torch_impl: shapes, the data feed, convergence, the scratch MLP's gradients,
weights and checkpoints, the entry points' flags, outputs and exit codes.

Entry points run in-process through ``common.runner.run_main`` (one subprocess
checks the real command line), on the bundled digits and generated friedman data.
The ``--fast`` variants are tested in ``test_fast_torch.py``.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import cnn_parameter_shapes, mlp_parameter_shapes
from common.datasets import batch_indices
from common.errors import WeightsError
from common.weights import load_weights, save_weights
from parity_tests.conftest import REPO, call, error_line, expect_exit, metrics, random_shared_weights
from torch_impl import run_cnn, run_nn, scratch
from torch_impl.models import build_cnn, build_mlp, export_weights, import_weights
from torch_impl.train import (load_checkpoint, make_batches, make_loss, make_optimizer,
                              save_checkpoint)

CNN_FILES = ("metrics.json", "predictions.csv", "curves.png", "run.log", "weights.safetensors",
             "run_config.json")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """One short CNN run on digits, shared by the tests that need trained weights."""
    out = tmp_path_factory.mktemp("cnn")
    assert call(run_cnn.main, ["--epochs", "5", "--out", str(out)]) == 0
    return out


# -- shapes ------------------------------------------------------------------------------
def layer_shapes(model, x):
    """(layer name, output shape) in call order, from forward hooks."""
    shapes = []
    for name, module in model.named_children():
        module.register_forward_hook(
            lambda m, inputs, output, name=name: shapes.append((name, tuple(output.shape))))
    return shapes, tuple(model(x).shape)


@pytest.mark.parametrize("input_shape, expected", [
    ((32, 32, 3), [("conv1", (4, 32, 32, 32)), ("bn1", (4, 32, 32, 32)), ("pool", (4, 32, 16, 16)),
                   ("conv2", (4, 32, 16, 16)), ("bn2", (4, 32, 16, 16)), ("pool", (4, 32, 8, 8)),
                   ("conv3", (4, 32, 8, 8)), ("bn3", (4, 32, 8, 8)), ("pool", (4, 32, 4, 4)),
                   ("flatten", (4, 512)), ("fc1", (4, 100)), ("dropout", (4, 100)),
                   ("fc2", (4, 100)), ("fc3", (4, 10))]),
    ((8, 8, 1), [("conv1", (4, 32, 8, 8)), ("bn1", (4, 32, 8, 8)), ("pool", (4, 32, 4, 4)),
                 ("conv2", (4, 32, 4, 4)), ("bn2", (4, 32, 4, 4)), ("pool", (4, 32, 2, 2)),
                 ("conv3", (4, 32, 2, 2)), ("bn3", (4, 32, 2, 2)), ("pool", (4, 32, 1, 1)),
                 ("flatten", (4, 32)), ("fc1", (4, 100)), ("dropout", (4, 100)),
                 ("fc2", (4, 100)), ("fc3", (4, 10))]),
])
def test_cnn_layer_shapes(input_shape, expected):
    h, w, c = input_shape
    model = build_cnn(input_shape, 10)
    shapes, output = layer_shapes(model, torch.randn(4, c, h, w))
    assert shapes == expected
    assert output == (4, 10)
    assert {k: tuple(v.shape) for k, v in export_weights(model).items()} == \
        cnn_parameter_shapes(input_shape, 10)
    assert all(conv.bias is None for conv in (model.conv1, model.conv2, model.conv3))


def test_mlp_shapes():
    model = build_mlp(10)
    shapes, output = layer_shapes(model, torch.randn(7, 10))
    assert shapes == [("fc1", (7, 100)), ("fc2", (7, 100)), ("fc3", (7, 1))]
    assert output == (7, 1)
    assert {k: tuple(v.shape) for k, v in export_weights(model).items()} == mlp_parameter_shapes(10)


def test_course_exercise_shapes():
    """Documentation of torch's shape rules (library behaviour only)."""
    # Meta tensors carry shapes and dtypes but no data: the shape rules without the compute.
    images = torch.empty(32, 3, 128, 128, device="meta")
    assert nn.Conv2d(3, 64, 3, device="meta")(images).shape == (32, 64, 126, 126)
    assert nn.Conv2d(3, 256, 3, stride=2, padding=1, device="meta")(images).shape == (32, 256, 64, 64)
    signals = torch.empty(10, 3, 50, device="meta")
    assert nn.Conv1d(3, 6, 5, device="meta")(signals).shape == (10, 6, 46)


# -- data, loss and optimizer ------------------------------------------------------------
@pytest.mark.parametrize("seed", [None, 0])
def test_make_batches_yields_the_shared_batch_order(seed):
    x = torch.arange(23, dtype=torch.float32).reshape(23, 1)
    y = torch.arange(23)
    got = [(inputs, targets) for inputs, targets in make_batches(x, y, 5, seed, epoch=3)]
    order = batch_indices(23, 5, seed, 3, shuffle=seed is not None)
    assert [t.tolist() for _, t in got] == [index.tolist() for index in order]
    assert all(torch.equal(inputs[:, 0].long(), targets) for inputs, targets in got)


def test_loss_and_optimizer():
    assert isinstance(make_loss("classification"), nn.CrossEntropyLoss)
    assert isinstance(make_loss("regression"), nn.MSELoss)
    optimizer = make_optimizer(build_mlp(3), 0.01)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["eps"] == 1e-8


# -- the scratch MLP ---------------------------------------------------------------------
def test_scratch_gradients_equal_autograd():
    model = scratch.TwoLayerMLP(64, 100, 10, seed=3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    loss, grads = model.loss_and_gradients(x, labels)

    params = {"fc1.weight": model.fc1.weight, "fc1.bias": model.fc1.bias,
              "fc2.weight": model.fc2.weight, "fc2.bias": model.fc2.bias}
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    hidden = F.relu(F.linear(x, params["fc1.weight"], params["fc1.bias"]))
    reference = F.cross_entropy(F.linear(hidden, params["fc2.weight"], params["fc2.bias"]), labels)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    for name, param in params.items():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-10, atol=1e-12)


def test_scratch_trains_on_digits(capsys):
    scratch.main(["--epochs", "5", "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test accuracy")
    assert float(last.split()[2]) > 0.85


# -- weights and checkpoints -------------------------------------------------------------
def test_shared_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_cnn((8, 8, 1), 10)
    model(torch.randn(16, 1, 8, 8))  # a training-mode pass moves the batch-norm statistics
    path = tmp_path / "weights.safetensors"
    save_weights(path, export_weights(model), {"task": "classification"})
    tensors, _ = load_weights(path, "classification", (8, 8, 1), 10)
    fresh = import_weights(build_cnn((8, 8, 1), 10), tensors)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))
    assert not torch.equal(fresh.bn1.running_mean, torch.zeros(32))


def test_native_checkpoint_round_trip(tmp_path):
    model = build_mlp(4)
    optimizer = make_optimizer(model, 1e-3)
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    path = tmp_path / "epoch0007"  # the runner's name; torch adds ".pt"
    assert save_checkpoint(path, model, optimizer) == tmp_path / "epoch0007.pt"
    other = build_mlp(4)
    other_optimizer = make_optimizer(other, 1e-3)
    load_checkpoint(path, other, other_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    torch.testing.assert_close(other_optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    with pytest.raises(WeightsError, match="does not fit this model"):
        load_checkpoint(path, build_mlp(5))


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return print, ("this must not be printed",)


def test_checkpoint_with_python_objects_is_refused(tmp_path, capsys):
    torch.save({"model": RunsCodeWhenUnpickled()}, tmp_path / "bad.pt")
    model = build_mlp(4)
    with pytest.raises(WeightsError, match="holds Python objects besides tensors"):
        load_checkpoint(tmp_path / "bad", model, make_optimizer(model, 1e-3))
    assert "must not" not in capsys.readouterr().out


def test_truncated_checkpoint_is_one_sentence(tmp_path):
    (tmp_path / "epoch0001.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_checkpoint(tmp_path / "epoch0001", build_mlp(4))


# -- entry points ------------------------------------------------------------------------
def test_run_cnn_converges_on_digits_and_writes_outputs(cnn_run):
    m = metrics(cnn_run)
    assert len(m["epochs"]) == 5
    assert m["test"]["accuracy"] > 0.85
    assert m["variant"] == "plain"
    assert all((cnn_run / name).is_file() for name in CNN_FILES)
    assert len((cnn_run / "predictions.csv").read_text().splitlines()) == 1 + 359
    load_weights(cnn_run / "weights.safetensors", "classification", (8, 8, 1), 10)


def test_run_nn_converges_on_friedman(tmp_path):
    assert call(run_nn.main, ["--epochs", "10", "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    assert [e["epoch"] for e in m["epochs"]] == list(range(1, 11))
    assert m["test"]["r2"] > 0.6
    assert m["dataset"] == "friedman" and m["config"]["batch_size"] == 100


def test_flags_take_effect(tmp_path):
    argv = ["--epochs", "2", "--batch-size", "50", "--lr", "0.003", "--dataset", "diabetes"]
    assert call(run_nn.main, [*argv, "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    assert len(m["epochs"]) == 2 and m["dataset"] == "diabetes"
    assert m["config"]["batch_size"] == 50 and m["config"]["lr"] == 0.003


def test_eval_only_reproduces_the_test_metrics(cnn_run, tmp_path):
    argv = ["--eval-only", "--weights", str(cnn_run / "weights.safetensors"), "--out", str(tmp_path)]
    assert call(run_cnn.main, argv) == 0
    assert metrics(tmp_path)["epochs"] == []
    assert metrics(tmp_path)["test"]["accuracy"] == pytest.approx(metrics(cnn_run)["test"]["accuracy"])
    assert (tmp_path / "predictions.csv").read_text() == (cnn_run / "predictions.csv").read_text()


def test_interrupted_run_resumes_to_the_same_predictions(tmp_path, monkeypatch, signal_in_epoch):
    argv = ["--epochs", "3", "--deterministic"]
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "whole")]) == 0
    signal_in_epoch(2)
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert call(run_cnn.main, ["--resume", str(tmp_path / "cut")]) == 0
    assert len(metrics(tmp_path / "cut")["epochs"]) == 3
    assert (tmp_path / "cut" / "predictions.csv").read_text() == \
        (tmp_path / "whole" / "predictions.csv").read_text()


# -- bad input: exit code 2 with one sentence; a non-finite loss: exit code 3 ------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    expect_exit(capsys, run_cnn.main, ["--device", "cuda", "--out", str(tmp_path)], 2,
                "--device cuda was asked for but no GPU is visible")


def test_weights_of_another_architecture(tmp_path, capsys):
    path = tmp_path / "mlp.safetensors"
    save_weights(path, export_weights(build_mlp(10)), {"task": "regression"})
    expect_exit(capsys, run_cnn.main, ["--weights", str(path), "--out", str(tmp_path / "out")], 2,
                "lacks tensor 'conv1.weight'")


def test_weights_with_wrong_shapes(tmp_path, capsys):
    path = tmp_path / "cifar_shaped.safetensors"
    save_weights(path, export_weights(build_cnn((32, 32, 3), 10)), {"task": "classification"})
    argv = ["--weights", str(path), "--eval-only", "--out", str(tmp_path / "out")]
    expect_exit(capsys, run_cnn.main, argv, 2,
                "'conv1.weight' has shape (32, 3, 3, 3), expected (32, 1, 3, 3)")


def test_weights_with_a_conv_bias_are_refused(tmp_path, capsys):
    """The format before batch norm's shift replaced the conv bias."""
    tensors = random_shared_weights("classification", (8, 8, 1))
    tensors["conv1.bias"] = np.zeros(32, np.float32)
    path = tmp_path / "old.safetensors"
    save_weights(path, tensors, {"task": "classification"})
    argv = ["--weights", str(path), "--eval-only", "--out", str(tmp_path / "out")]
    expect_exit(capsys, run_cnn.main, argv, 2, "'conv1.bias'")


def test_eval_only_without_weights_on_the_command_line():
    result = subprocess.run([sys.executable, "-m", "torch_impl.run_nn", "--eval-only"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "error: --eval-only needs --weights PATH (a weights.safetensors file to evaluate)"


@pytest.mark.parametrize("main", [run_cnn.main, run_nn.main], ids=["cnn", "nn"])
def test_exploding_loss_exits_3(main, tmp_path, capsys):
    assert call(main, ["--lr", "1e9", "--epochs", "2", "--out", str(tmp_path)]) == 3
    assert "loss became" in error_line(capsys)
