"""The scratch autograd ``Tensor`` (``scratch/tensor.py``) against the course's known answers,
PyTorch autograd and ``tf.GradientTape``, all in float64.

Every op is run in the three libraries on the same random inputs; forward values and the
gradients of every input (for a random upstream gradient) must agree within 1e-10.
"""
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import torch

from parity_tests.conftest import REPO
from parity_tests.test_known_answers import DW0, DW1, TARGET, W0, W1, X
from scratch import Tensor, no_grad

TOL = 1e-10

# -- the course's known answers -----------------------------------------------------------


def test_autograd_mean_gives_4_5():
    x = Tensor(np.ones((2, 2)))
    (3 * (x + 2) ** 2).mean().backward()
    np.testing.assert_allclose(x.grad, np.full((2, 2), 4.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("upstream, expected", [
    (np.ones((2, 2)), np.full((2, 2), 18.0)),
    (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[18.0, 36.0], [54.0, 72.0]]))],
    ids=["ones", "vector"])
def test_autograd_non_scalar_output_takes_the_gradient(upstream, expected):
    x = Tensor(np.ones((2, 2)))
    ((x + 2) * (x + 2) * 3).backward(upstream)
    np.testing.assert_allclose(x.grad, expected, rtol=0, atol=1e-12)


def test_non_scalar_backward_without_gradient_is_refused():
    with pytest.raises(RuntimeError, match="scalar outputs"):
        (Tensor(np.ones((2, 2))) * 2).backward()


def test_backprop_worked_example():
    w0, w1 = Tensor(W0), Tensor(W1)
    loss = (w1 @ (w0 @ Tensor(X, requires_grad=False)) - TARGET) ** 2
    loss.backward()
    np.testing.assert_allclose(w0.grad, DW0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w1.grad, DW1, rtol=0, atol=1e-12)


# -- every op against torch and TF -------------------------------------------------------
# Each library is a table of the ops that are not Python operators.
SCRATCH = dict(
    sum=lambda x, axis=None, keepdims=False: x.sum(axis=axis, keepdims=keepdims),
    mean=lambda x, axis=None, keepdims=False: x.mean(axis=axis, keepdims=keepdims),
    reshape=lambda x, shape: x.reshape(shape), transpose=lambda x, axes: x.transpose(axes),
    exp=lambda x: x.exp(), log=lambda x: x.log(), relu=lambda x: x.relu(),
    slice=lambda x: x[1:, ::2], take=lambda x, rows: x[np.array(rows)],
    pick=lambda x, cols: x[np.arange(len(cols)), np.array(cols)], matvec=lambda a, b: a @ b)
TORCH = dict(
    sum=lambda x, axis=None, keepdims=False: x.sum() if axis is None else x.sum(axis, keepdims),
    mean=lambda x, axis=None, keepdims=False: x.mean() if axis is None else x.mean(axis, keepdims),
    reshape=lambda x, shape: x.reshape(shape), transpose=lambda x, axes: x.permute(axes),
    exp=torch.exp, log=torch.log, relu=torch.relu,
    slice=lambda x: x[1:, ::2], take=lambda x, rows: x[torch.tensor(rows)],
    pick=lambda x, cols: x[torch.arange(len(cols)), torch.tensor(cols)], matvec=lambda a, b: a @ b)
TF = dict(
    sum=lambda x, axis=None, keepdims=False: tf.reduce_sum(x, axis, keepdims),
    mean=lambda x, axis=None, keepdims=False: tf.reduce_mean(x, axis, keepdims),
    reshape=tf.reshape, transpose=tf.transpose, exp=tf.exp, log=tf.math.log, relu=tf.nn.relu,
    slice=lambda x: x[1:, ::2], take=lambda x, rows: tf.gather(x, rows),
    pick=lambda x, cols: tf.gather(x, cols, axis=1, batch_dims=1), matvec=tf.linalg.matvec)

# name -> (input shapes, positive inputs?, f(ops, *inputs))
CASES = {
    "add_broadcast": ([(3, 4), (4,)], False, lambda o, a, b: a + b),
    "add_scalar_left": ([(3, 4)], False, lambda o, a: 2.5 + a),
    "sub_broadcast_keepdim": ([(3, 1), (3, 4)], False, lambda o, a, b: a - b),
    "rsub": ([(2, 3)], False, lambda o, a: 1.0 - a),
    "mul_broadcast_3d": ([(2, 1, 4), (3, 1)], False, lambda o, a, b: a * b),
    "div": ([(3, 4), (3, 4)], True, lambda o, a, b: a / b),
    "rdiv_broadcast": ([(1, 4)], True, lambda o, a: 2.0 / a),
    "pow_scalar": ([(3, 4)], True, lambda o, a: a ** 3),
    "pow_fraction": ([(3, 4)], True, lambda o, a: a ** 0.5),
    "pow_tensor": ([(3, 4), (4,)], True, lambda o, a, b: a ** b),
    "neg": ([(3, 4)], False, lambda o, a: -a),
    "matmul": ([(3, 4), (4, 5)], False, lambda o, a, b: a @ b),
    "matmul_vector": ([(3, 4), (4,)], False, lambda o, a, b: o["matvec"](a, b)),
    "matmul_batched_broadcast": ([(2, 3, 4), (4, 5)], False, lambda o, a, b: a @ b),
    "sum_all": ([(3, 4)], False, lambda o, a: o["sum"](a)),
    "sum_axis": ([(2, 3, 4)], False, lambda o, a: o["sum"](a, 1)),
    "sum_axes_keepdims": ([(2, 3, 4)], False, lambda o, a: o["sum"](a, (0, 2), True)),
    "mean_all": ([(3, 4)], False, lambda o, a: o["mean"](a)),
    "mean_axes_keepdims": ([(2, 3, 4)], False, lambda o, a: o["mean"](a, (0, 2), True)),
    "reshape": ([(2, 3, 4)], False, lambda o, a: o["reshape"](a, (4, 6))),
    "transpose": ([(2, 3, 4)], False, lambda o, a: o["transpose"](a, (2, 0, 1))),
    "slice": ([(3, 4)], False, lambda o, a: o["slice"](a)),
    "take_repeated_rows": ([(4, 3)], False, lambda o, a: o["take"](a, [0, 2, 0, 3])),
    "pick_per_row": ([(4, 5)], False, lambda o, a: o["pick"](a, [1, 0, 4, 1])),
    "exp": ([(3, 4)], False, lambda o, a: o["exp"](a)),
    "log": ([(3, 4)], True, lambda o, a: o["log"](a)),
    "relu": ([(3, 4)], False, lambda o, a: o["relu"](a)),
    "chain_shared_input": ([(3, 4), (4,)], False,
                           lambda o, a, b: o["exp"](a * b) / (1.0 + o["relu"](a) @ o["reshape"](b, (4, 1)))),
}


def random_inputs(shapes, positive, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 2.0, s) if positive else rng.normal(size=s) for s in shapes]


def run(library, f, arrays, upstream):
    """(output, input gradients) of f(*arrays) in 'scratch', 'torch' or 'tf'."""
    if library == "tf":
        xs = [tf.Variable(a) for a in arrays]
        with tf.GradientTape() as tape:
            out = f(*xs)
        grads = tape.gradient(out, xs, output_gradients=tf.constant(upstream))
        return out.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]  # IndexedSlices too
    make = Tensor if library == "scratch" else lambda a: torch.tensor(a, requires_grad=True)
    xs = [make(a) for a in arrays]
    out = f(*xs)
    out.backward(upstream if library == "scratch" else torch.tensor(upstream))
    if library == "scratch":
        return out.data, [x.grad for x in xs]
    return out.detach().numpy(), [x.grad.numpy() for x in xs]


def assert_same(mine, theirs, what):
    (out, grads), (ref_out, ref_grads) = mine, theirs
    assert np.shape(out) == np.shape(ref_out), what
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=TOL, err_msg=f"{what}: forward")
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert g.shape == ref.shape, f"{what}: gradient {i} shape"
        np.testing.assert_allclose(g, ref, rtol=0, atol=TOL, err_msg=f"{what}: gradient {i}")


def check_three(f_scratch, f_torch, f_tf, arrays, what):
    """Forward and gradients (random upstream gradient) of scratch == torch == TF."""
    upstream = np.random.default_rng(1).normal(size=f_scratch(*[Tensor(a) for a in arrays]).shape)
    mine = run("scratch", f_scratch, arrays, upstream)
    assert_same(mine, run("torch", f_torch, arrays, upstream), f"{what} vs torch")
    assert_same(mine, run("tf", f_tf, arrays, upstream), f"{what} vs tf")


@pytest.mark.parametrize("name", CASES)
def test_op_matches_torch_and_tf(name):
    shapes, positive, f = CASES[name]
    check_three(lambda *xs: f(SCRATCH, *xs), lambda *xs: f(TORCH, *xs), lambda *xs: f(TF, *xs),
                random_inputs(shapes, positive), name)


# -- the Tensor's own behaviour ----------------------------------------------------------


def test_float64_by_default_and_grad_accumulates_until_zero_grad():
    x = Tensor([1, 2, 3])
    assert x.data.dtype == np.float64
    for _ in range(2):
        (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * 2 * x.data)
    x.zero_grad()
    assert x.grad is None


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3))
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y._parents == ()
    assert (x * 2).requires_grad


def test_draw_graph_returns_dot_and_writes_it(tmp_path, capsys, monkeypatch):
    x = Tensor(np.ones((2, 2)), name="x")
    out = (3 * (x + 2) ** 2).mean()
    text = out.draw_graph()
    assert text.startswith("digraph") and "x | shape (2, 2)" in text and "->" in text
    monkeypatch.setenv("PATH", "")  # no graphviz: the text is written, and one line says so
    assert out.draw_graph(tmp_path / "graph.dot") == text
    assert (tmp_path / "graph.dot").read_text() == text
    assert "not installed" in capsys.readouterr().out


def test_scratch_imports_no_framework():
    """Importing every scratch module loads neither torch nor tensorflow."""
    code = ("import sys, scratch, scratch.nn, scratch.functional, scratch.train; "
            "bad = {'torch', 'tensorflow', 'keras', 'jax'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scratch_files_are_short():
    for path in (REPO / "scratch").glob("*.py"):
        assert len(path.read_text().splitlines()) < 300, path
