"""The programs on the test session's device (``pytest --device cpu|cuda``) against a
float64 CPU reference, and the entry points run there.

float32 on the device with TF32 off (``make_deterministic``'s policy, pinned by
conftest.py) against float64 on the CPU, from the same weights and batches
(``tools.device_parity``):

* forward pass: largest difference <= 1e-5 of the output's largest entry
  (measured 3e-7 on a 2-core CPU);
* gradients: <= 1e-4 of each gradient's largest entry (measured 1.1e-6);
* weights after 10 Adam steps (lr 1e-3): <= 5e-4 absolute, 5 % of the most a weight
  can move (measured 7.2e-5: Adam moves a weight about lr per step whatever the
  gradient's size, so float32 noise in tiny gradients shows in full);
* on CUDA, two runs of the Adam steps under ``make_deterministic`` are bitwise equal.

torch's half imports no TensorFlow: it runs on the GPU check machines, which have none.
"""
import importlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from common import layout
from common.frameworks import tf32_in_use
from parity_tests.conftest import call, metrics
from torch_impl import train as torch_train
from tools.device_parity import TASK, difference, forward, gradients, make_batches, make_weights, measure

FORWARD, GRADIENTS, ADAM = 1e-5, 1e-4, 5e-4


@pytest.mark.parametrize("task", TASK)
def test_torch_device_parity_against_float64_cpu(task, device):
    figures = measure(task, device)
    assert figures["forward"] <= FORWARD, figures
    assert figures["gradients"] <= GRADIENTS, figures
    assert figures["adam"] <= ADAM, figures
    assert figures.get("adam_bitwise", True), figures


@pytest.mark.parametrize("task", TASK)
def test_tf2_device_parity_against_float64_torch_cpu(task, tf_device):
    """The Keras model on the device against torch in float64 on the CPU, same tolerances."""
    from parity_tests import test_parity  # imports TensorFlow: only where it is installed
    weights, (x, y) = make_weights(task), make_batches(task)[0]
    inputs = layout.nchw_to_nhwc(x) if task == "cnn" else x
    with test_parity.tf.device(test_parity.TF_DEVICE[tf_device]):
        out = test_parity.tf2_forward(task, weights, inputs, "subclassing")
        grads = test_parity.tf2_gradients(task, weights, inputs, y, "subclassing")
    assert difference(out, forward(task, weights, x, "cpu", torch.float64)) <= FORWARD
    assert difference(grads, gradients(task, weights, x, y, "cpu", torch.float64)) <= GRADIENTS


def _train(module, device, out, *flags):
    dataset = "digits" if "cnn" in module else "friedman"
    argv = ["--dataset", dataset, "--epochs", "3", "--device", device, "--out", str(out), *flags]
    assert call(module, argv) == 0
    m = metrics(out)
    assert (m["device"], m["tf32"]) == (device, False), m
    return m


@pytest.mark.parametrize("module", ["torch_impl.run_cnn", "torch_impl.run_nn"])
def test_torch_entry_point_on_device_is_bitwise_deterministic(module, device, tmp_path):
    """Twice with --deterministic: bitwise identical weights."""
    for run in "ab":
        _train(module, device, tmp_path / run, "--deterministic", "--epochs", "2")
    a, b = (load_file(tmp_path / run / "weights.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("module", ["torch_impl.run_cnn", "torch_impl.run_nn"])
def test_torch_entry_point_fast_on_device_matches_plain(module, device, tmp_path):
    """The plain run converges on the device; --fast ends within the cross-framework band."""
    metric, floor = ("accuracy", 0.85) if module.endswith("cnn") else ("r2", 0.3)
    plain = _train(module, device, tmp_path / "plain")
    assert plain["test"][metric] > floor, plain["test"]
    fast = _train(module, device, tmp_path / "fast", "--fast")
    assert fast["variant"] == "fast"
    assert np.isclose(fast["test"][metric], plain["test"][metric], atol=0.05), (plain, fast)


@pytest.mark.parametrize("module", ["tf2_impl.run_cnn", "tf2_impl.run_cnn_keras", "tf1_compat.run_cnn"])
def test_tf_entry_point_on_device(module, tf_device, tmp_path):
    """The TensorFlow entry points train on the device and say so in metrics.json."""
    m = _train(module, tf_device, tmp_path)
    assert m["test"]["accuracy"] > 0.8, m["test"]


# -- the TF32 policy: off under --deterministic in every framework, recorded in metrics.json --
def test_torch_tf32_policy_and_record(monkeypatch):
    """tf32_in_use reads torch's switches (CUDA only); make_deterministic turns them off."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's own default
    assert tf32_in_use("torch", "cuda") and not tf32_in_use("torch", "cpu")
    torch_train.make_deterministic()
    assert not tf32_in_use("torch", "cuda")


@pytest.mark.parametrize("framework", ["tf2", "tf1_compat"])
def test_tensorflow_tf32_policy_and_record(framework, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    train = importlib.import_module({"tf2": "tf2_impl", "tf1_compat": "tf1_compat"}[framework] + ".train")
    # Op determinism (and TF_DETERMINISTIC_OPS, read once) cannot be turned off again:
    # keep them out of the rest of this test process.
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)
    monkeypatch.setattr(train, "set_deterministic_environment", lambda: None)
    tf.config.experimental.enable_tensor_float_32_execution(True)  # TensorFlow's default
    try:
        assert tf32_in_use(framework, "cuda") and not tf32_in_use(framework, "cpu")
        train.make_deterministic()
        assert not tf32_in_use(framework, "cuda")
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(False)  # conftest's setting
