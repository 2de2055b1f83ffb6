"""The scratch CNN and MLP (``scratch/nn.py``) against ``torch_impl/models.py``, and the
``python -m scratch.train`` entry point with the shared outputs and weights format.
"""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as TF_TORCH

from common.errors import WeightsError
from common.layout import nhwc_to_nchw
from common.weights import load_weights, save_weights
from parity_tests.conftest import call, error_line, metrics, random_shared_weights
from scratch import Tensor
from scratch import functional as F
from scratch import nn
from torch_impl import models

DIGITS = (8, 8, 1)


def pair(task):
    """(scratch model, torch model in float64) sharing random weights; batch norm in use."""
    tensors = random_shared_weights(task, DIGITS if task == "classification" else (10,))
    if task == "classification":
        mine, theirs = nn.build_cnn(DIGITS, 10), models.build_cnn(DIGITS, 10)
    else:
        mine, theirs = nn.build_mlp(10), models.build_mlp(10)
    nn.import_weights(mine, tensors)
    models.import_weights(theirs, tensors)
    return mine, theirs, tensors


def inputs(task, n=16):
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, 1, 8, 8) if task == "classification" else (n, 10)).astype(np.float32)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_scratch_model_equals_torch_model_in_eval(task):
    """float32 input and weights: the float32 torch model within 1e-6, the float64 one within 1e-12."""
    mine, theirs, _ = pair(task)
    x = inputs(task)
    out = mine.eval()(Tensor(x)).data
    with torch.no_grad():
        np.testing.assert_allclose(out, theirs.eval()(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-6)
        double = theirs.double()(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(out, double, rtol=0, atol=1e-12)


def test_scratch_cnn_gradients_equal_torch_in_training_mode():
    """Batch statistics, running-stat updates and every parameter gradient (dropout off)."""
    mine, theirs, _ = pair("classification")
    theirs.double().train()
    mine.dropout.p = theirs.dropout.p = 0.0
    x, labels = inputs("classification").astype(np.float64), np.arange(16) % 10
    F.cross_entropy(mine.train()(Tensor(x, requires_grad=False)), labels).backward()
    TF_TORCH.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
    reference = dict(theirs.named_parameters())
    for name, p in mine.named_parameters():
        np.testing.assert_allclose(p.grad, reference[name].grad.numpy(), rtol=0, atol=1e-10,
                                   err_msg=name)
    state = theirs.state_dict()
    for name, value in mine.state_dict().items():
        np.testing.assert_allclose(value, state[name].numpy(), rtol=0, atol=1e-12, err_msg=name)


def test_weights_round_trip_through_the_shared_file(tmp_path):
    mine, _, tensors = pair("classification")
    assert set(nn.export_weights(mine)) == set(tensors)
    save_weights(tmp_path / "w.safetensors", nn.export_weights(mine), {"task": "classification"})
    loaded, _ = load_weights(tmp_path / "w.safetensors", "classification", DIGITS, 10)
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, tensors[name])


def test_import_weights_refuses_other_architectures():
    with pytest.raises(WeightsError, match="missing .*fc3.bias"):
        nn.import_weights(nn.build_mlp(10), {"fc1.weight": np.zeros((100, 10))})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("scratch") / "cnn"
    assert call("scratch.train", ["--task", "cnn", "--dataset", "digits", "--epochs", "2",
                                  "--out", str(out)]) == 0
    return out


def test_train_writes_the_shared_outputs(trained):
    m = metrics(trained)
    assert m["implementation"] == "scratch" and m["dataset"] == "digits"
    assert len(m["epochs"]) == 2 and m["test"]["accuracy"] > 0.5
    for name in ("predictions.csv", "weights.safetensors", "curves.png", "run.log"):
        assert (trained / name).is_file(), name


def test_torch_reads_scratch_weights_and_predicts_the_same(trained):
    """The scratch run's weights in torch_impl's CNN give its predictions.csv."""
    from common.datasets import load_dataset
    tensors, _ = load_weights(trained / "weights.safetensors", "classification", DIGITS, 10)
    model = models.import_weights(models.build_cnn(DIGITS, 10), tensors).eval()
    x = nhwc_to_nchw(load_dataset("digits", "image", seed=0).x_test)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    with open(trained / "predictions.csv") as f:
        written = np.array([int(row["prediction"]) for row in csv.DictReader(f)])
    np.testing.assert_array_equal(predicted, written)


def test_eval_only_and_resume_reuse_the_run(trained, tmp_path):
    out = tmp_path / "eval"
    assert call("scratch.train", ["--task", "cnn", "--dataset", "digits", "--eval-only",
                                  "--weights", str(trained / "weights.safetensors"),
                                  "--out", str(out)]) == 0
    assert metrics(out)["test"]["accuracy"] == pytest.approx(metrics(trained)["test"]["accuracy"])
    assert call("scratch.train", ["--resume", str(trained)]) == 0  # nothing left to train
    assert len(metrics(trained)["epochs"]) == 2


def test_bad_input_is_one_sentence_and_exit_2(capsys, tmp_path):
    assert call("scratch.train", ["--task", "mlp", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CPU" in error_line(capsys)
