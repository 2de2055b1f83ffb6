"""Tests of torch_impl: shapes, convergence, the scratch MLP's gradients,
weights and checkpoints, the entry points' flags, outputs and exit codes.

Entry points run in-process through ``common.runner.run_main`` (one subprocess
checks the real command line), on the bundled digits and generated friedman data.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import cnn_parameter_shapes, mlp_parameter_shapes
from common.errors import WeightsError
from common.runner import TrainingRun, run_main
from common.weights import load_weights, save_weights
from torch_impl import run_cnn, run_nn, scratch
from torch_impl.models import CNNClassifier, MLPRegressor, export_weights, import_weights
from torch_impl.train import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CNN_FILES = ("metrics.json", "predictions.csv", "curves.png", "run.log", "weights.safetensors",
             "run_config.json")


@pytest.fixture(autouse=True)
def restore_process_state():
    """main() installs signal handlers, and --deterministic sets torch flags and
    environment variables: give the rest of the pytest process its own back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    environ = dict(os.environ)
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)  # imports torch._inductor: only if needed
    os.environ.clear()
    os.environ.update(environ)


def call(main, argv):
    """Exit code of an entry point run in-process, as the command line would give it."""
    try:
        run_main(main, argv)
    except SystemExit as exc:
        return exc.code
    return 0


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


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
    model = CNNClassifier(input_shape, 10)
    shapes, output = layer_shapes(model, torch.randn(4, c, h, w))
    assert shapes == expected
    assert output == (4, 10)
    assert {k: tuple(v.shape) for k, v in export_weights(model).items()} == \
        cnn_parameter_shapes(input_shape, 10)


def test_mlp_shapes():
    model = MLPRegressor(10)
    shapes, output = layer_shapes(model, torch.randn(7, 10))
    assert shapes == [("fc1", (7, 100)), ("fc2", (7, 100)), ("fc3", (7, 1))]
    assert output == (7, 1)
    assert {k: tuple(v.shape) for k, v in export_weights(model).items()} == mlp_parameter_shapes(10)


def test_course_exercise_shapes():
    # Meta tensors carry shapes and dtypes but no data: the shape rules without the compute.
    images = torch.empty(32, 3, 128, 128, device="meta")
    assert nn.Conv2d(3, 64, 3, device="meta")(images).shape == (32, 64, 126, 126)
    assert nn.Conv2d(3, 256, 3, stride=2, padding=1, device="meta")(images).shape == (32, 256, 64, 64)
    signals = torch.empty(10, 3, 50, device="meta")
    assert nn.Conv1d(3, 6, 5, device="meta")(signals).shape == (10, 6, 46)


def test_pool_before_relu_is_the_textbook_block():
    """The shipped CNN pools before its ReLU; the course manual's (the benchmark baseline's)
    ReLU comes first. Max pool and ReLU commute, so outputs and gradients are the same."""
    from benchmarks.baselines import _manual_cnn_class

    torch.manual_seed(0)
    shipped = CNNClassifier((16, 16, 3), 10).double()
    textbook = _manual_cnn_class()((16, 16, 3), 10).double()
    textbook.load_state_dict(shipped.state_dict())
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    outputs = []
    for model in (shipped, textbook):
        model.eval()  # dropout off; batch norm from the (shared) running statistics
        out = model(x)
        out.square().sum().backward()
        outputs.append((out.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = outputs
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-10, atol=1e-12, msg=name)


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
    model = CNNClassifier((8, 8, 1), 10)
    model(torch.randn(16, 1, 8, 8))  # a training-mode pass moves the batch-norm statistics
    path = tmp_path / "weights.safetensors"
    save_weights(path, export_weights(model), {"task": "classification"})
    tensors, _ = load_weights(path, "classification", (8, 8, 1), 10)
    fresh = import_weights(CNNClassifier((8, 8, 1), 10), tensors)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))
    assert not torch.equal(fresh.bn1.running_mean, torch.zeros(32))


def test_native_checkpoint_round_trip(tmp_path):
    model = MLPRegressor(4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "last.pt", model, optimizer, epoch=7)
    other = MLPRegressor(4)
    other_optimizer = torch.optim.Adam(other.parameters())
    assert load_checkpoint(path, other, other_optimizer) == 7
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    torch.testing.assert_close(other_optimizer.state_dict()["state"], optimizer.state_dict()["state"])


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return print, ("this must not be printed",)


def test_checkpoint_with_python_objects_is_refused(tmp_path, capsys):
    torch.save({"model": RunsCodeWhenUnpickled()}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="holds Python objects besides tensors"):
        load_checkpoint(tmp_path / "bad.pt", MLPRegressor(4), torch.optim.Adam(MLPRegressor(4).parameters()))
    assert "must not" not in capsys.readouterr().out


# -- entry points ------------------------------------------------------------------------
def test_run_cnn_converges_on_digits_and_writes_outputs(cnn_run):
    m = metrics(cnn_run)
    assert len(m["epochs"]) == 5
    assert m["test"]["accuracy"] > 0.85
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


def test_interrupted_run_resumes_to_the_same_predictions(tmp_path, monkeypatch):
    argv = ["--epochs", "3", "--deterministic"]
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "whole")]) == 0

    check_stop = TrainingRun.check_stop

    def sigint_in_epoch_2(run, epoch):
        if epoch == 2:
            run.stop.signum = signal.SIGINT  # what the SIGINT handler does
        check_stop(run, epoch)

    monkeypatch.setattr(TrainingRun, "check_stop", sigint_in_epoch_2)
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert call(run_cnn.main, ["--resume", str(tmp_path / "cut")]) == 0
    assert len(metrics(tmp_path / "cut")["epochs"]) == 3
    assert (tmp_path / "cut" / "predictions.csv").read_text() == \
        (tmp_path / "whole" / "predictions.csv").read_text()


# -- bad input: exit code 2 with one sentence; a non-finite loss: exit code 3 ------------------
def error_line(capsys):
    """The one error sentence on stderr (after any progress bars), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    assert call(run_cnn.main, ["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda was asked for but no GPU is visible" in error_line(capsys)


def test_weights_of_another_architecture(tmp_path, capsys):
    path = tmp_path / "mlp.safetensors"
    save_weights(path, export_weights(MLPRegressor(10)), {"task": "regression"})
    assert call(run_cnn.main, ["--weights", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "lacks tensor 'conv1.weight'" in error_line(capsys)


def test_weights_with_wrong_shapes(tmp_path, capsys):
    path = tmp_path / "cifar_shaped.safetensors"
    save_weights(path, export_weights(CNNClassifier((32, 32, 3), 10)), {"task": "classification"})
    assert call(run_cnn.main, ["--weights", str(path), "--eval-only", "--out", str(tmp_path / "out")]) == 2
    assert "'conv1.weight' has shape (32, 3, 3, 3), expected (32, 1, 3, 3)" in error_line(capsys)


def test_eval_only_without_weights_on_the_command_line():
    result = subprocess.run([sys.executable, "-m", "torch_impl.run_nn", "--eval-only"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "error: --eval-only needs --weights PATH (a weights.safetensors file to evaluate)"


@pytest.mark.parametrize("main", [run_cnn.main, run_nn.main], ids=["cnn", "nn"])
def test_exploding_loss_exits_3(main, tmp_path, capsys):
    assert call(main, ["--lr", "1e9", "--epochs", "2", "--out", str(tmp_path)]) == 3
    assert "loss became" in error_line(capsys)
