"""torch_impl/fast.py computes what the plain code computes.

From the same shared-format weights, ``fast.build_cnn`` (pool before ReLU,
channels-last) gives the plain ``models.build_cnn``'s outputs, batch-norm
statistics, gradients of every parameter and parameters after one Adam step;
``fast.make_batches`` yields the plain DataLoader's batches; and ``--fast``
trains end to end and says so in metrics.json.

Tolerances: float64 (the checks that pin the function down) agree to 1e-10
relative, where the only differences are the summation orders of the two memory
formats' convolution kernels; float32 to 1e-4 relative, 1e-5 absolute.
"""

import pytest
import torch

from common.datasets import batch_indices
from parity_tests.conftest import call, metrics, random_shared_weights
from torch_impl import fast, run_cnn, run_nn
from torch_impl.models import build_cnn, export_weights, import_weights
from torch_impl.train import make_batches, make_loss, make_optimizer

INPUT_SHAPE = (16, 16, 3)  # (H, W, C): three pooling blocks down to 2 x 2
CLASSES = 10
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _twins(dtype):
    """The plain and the fast CNN holding the same random shared-format weights."""
    tensors = random_shared_weights("classification", INPUT_SHAPE, CLASSES, seed=1, scale=0.3)
    plain = import_weights(build_cnn(INPUT_SHAPE, CLASSES), tensors).to(dtype)
    quick = import_weights(fast.build_cnn(INPUT_SHAPE, CLASSES), tensors).to(dtype)
    return plain, quick


def _batch(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h, w, c = INPUT_SHAPE
    x = torch.randn(12, c, h, w, generator=generator, dtype=dtype)
    return x, torch.randint(0, CLASSES, (12,), generator=generator)


def _forward_backward(model, x, labels, train):
    """Logits and the gradient of every parameter; dropout's mask drawn from seed 0."""
    model.train(train)
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout mask in both models: same shapes, same draws
    logits = model(x)
    make_loss("classification")(logits, labels).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_fast_cnn_keeps_the_shared_weights_format():
    plain, quick = _twins(torch.float32)
    assert quick.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = export_weights(plain), export_weights(quick)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_cnn_outputs_and_gradients_equal_plain(dtype, train):
    plain, quick = _twins(dtype)
    x, labels = _batch(dtype)
    out_a, grads_a = _forward_backward(plain, x, labels, train)
    out_b, grads_b = _forward_backward(quick, x, labels, train)
    torch.testing.assert_close(out_b, out_a, **TOLERANCE[dtype])
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **TOLERANCE[dtype], msg=name)
    # Training mode also moves the batch-norm running statistics: by the same amounts.
    buffers_b = dict(quick.named_buffers())
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(buffers_b[name], buffer, **TOLERANCE[dtype], msg=name)


def test_fast_cnn_one_adam_step_equals_plain():
    """float64: Adam's first step is about lr * sign(gradient), so gradients that agree
    only to float32 rounding could flip the step of a near-zero one."""
    dtype = torch.float64
    plain, quick = _twins(dtype)
    x, labels = _batch(dtype, seed=1)
    for model in (plain, quick):
        optimizer = make_optimizer(model, 1e-3)
        _forward_backward(model, x, labels, train=True)
        optimizer.step()
    after = dict(quick.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(after[name], param, **TOLERANCE[dtype], msg=name)
    # ... and the stepped models still compute the same function.
    out_a, _ = _forward_backward(plain, *_batch(dtype, seed=2), train=False)
    out_b, _ = _forward_backward(quick, *_batch(dtype, seed=2), train=False)
    torch.testing.assert_close(out_b, out_a, **TOLERANCE[dtype])


@pytest.mark.parametrize("target_shape", [(23,), (23, 1)], ids=["labels", "regression"])
@pytest.mark.parametrize("seed", [None, 0])
def test_fast_batches_equal_the_dataloader_batches(seed, target_shape):
    x = torch.randn(23, 3, 4, 4)
    y = torch.arange(23).reshape(target_shape)
    plain = list(make_batches(x, y, 5, seed, epoch=2))
    quick = fast.make_batches(x, y, 5, seed, epoch=2)
    assert len(quick) == len(plain) == len(batch_indices(23, 5, seed, 2, shuffle=seed is not None))
    quick = list(quick)
    assert len(quick) == len(plain)
    for (xa, ya), (xb, yb) in zip(plain, quick):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.shape[1:] == x.shape[1:] and yb.shape[1:] == y.shape[1:]


def test_fast_batches_in_order_are_views():
    """Validation and test batches are slices of the split: no copy."""
    x, y = torch.randn(10, 2), torch.arange(10)
    first, _ = next(iter(fast.make_batches(x, y, 4)))
    assert first.data_ptr() == x.data_ptr()


def test_run_cnn_fast_trains_end_to_end(tmp_path):
    assert call(run_cnn.main, ["--fast", "--epochs", "4", "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    assert m["variant"] == "fast" and m["config"]["fast"] is True
    assert len(m["epochs"]) == 4
    assert m["test"]["accuracy"] > 0.85
    assert (tmp_path / "weights.safetensors").is_file()


def test_run_nn_fast_trains_end_to_end(tmp_path):
    assert call(run_nn.main, ["--fast", "--epochs", "10", "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    assert m["variant"] == "fast" and len(m["epochs"]) == 10
    assert m["test"]["r2"] > 0.6


def test_fast_resumes_to_the_same_predictions(tmp_path, monkeypatch, signal_in_epoch):
    """--fast with --deterministic: a run stopped by SIGINT in epoch 2 and resumed ends
    where the uninterrupted one does (its checkpoint holds a channels-last model)."""
    argv = ["--fast", "--deterministic", "--epochs", "2"]
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "whole")]) == 0
    signal_in_epoch(2)
    assert call(run_cnn.main, [*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert call(run_cnn.main, ["--resume", str(tmp_path / "cut")]) == 0
    assert (tmp_path / "cut" / "predictions.csv").read_text() == \
        (tmp_path / "whole" / "predictions.csv").read_text()
