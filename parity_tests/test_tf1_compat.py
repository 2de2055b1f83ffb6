"""Tests of tf1_compat: graph variables and shapes, batch norm's UPDATE_OPS, stateless
dropout, Saver and shared-weights round trips, session_basics against eager TF2 and
PyTorch, the entry points' convergence, bad inputs and exit codes, and a real
SIGINT + --resume.

The entry points run in-process through ``common.runner.run_main`` -- in this pytest
process, which also runs TF2 eager code, so each of those tests checks that eager
mode survived -- and as subprocesses for the interrupt/resume test (only there does
``python -m`` call ``disable_v2_behavior``).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tensorflow as tf

from common.config import CNNShape, cnn_parameter_shapes, mlp_parameter_shapes
from common.datasets import batch_indices
from common.errors import UserError, WeightsError
from common.layout import BN_TORCH_TO_TF, nhwc_to_nchw
from common.runner import run_main
from common.weights import load_weights, read_weights, save_weights
from tf1_compat import run_cnn, run_nn, session_basics
from tf1_compat.models import (build_cnn_classifier, build_mlp_regressor, export_weights,
                               import_weights)
from tf1_compat.train import (adam_train_op, check_batch, evaluate, feed, load_checkpoint,
                              predict, save_checkpoint, train_one_epoch)

ROOT = Path(__file__).resolve().parents[1]
v1 = tf.compat.v1
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


@pytest.fixture(autouse=True)
def restore_process_state():
    """main() installs signal handlers: give the rest of the pytest process its own back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def call(main, argv):
    """Exit code of an entry point run in-process, as the command line would give it."""
    try:
        run_main(main, argv)
    except SystemExit as exc:
        return exc.code
    return 0


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def assert_eager_still_works():
    """TF1 graphs must not leak into the process: TF2 code keeps running eagerly."""
    assert tf.executing_eagerly()
    w = tf.Variable(2.0)
    with tf.GradientTape() as tape:
        loss = w * w
    assert float(tape.gradient(loss, w)) == 4.0


def build(builder, *args, train=False, seed=0, **train_kwargs):
    """(graph, model, train_op or None, initializer) in a fresh graph."""
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        model = builder(*args)
        train_op = adam_train_op(model, 1e-3, **train_kwargs) if train else None
        initialize = v1.global_variables_initializer()
    return graph, model, train_op, initialize


def images(n=6, shape=(8, 8, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """One short CNN run on digits, shared by the tests that need trained weights."""
    out = tmp_path_factory.mktemp("tf1_cnn")
    assert call(run_cnn.main, ["--epochs", "6", "--out", str(out)]) == 0
    return out


# -- graphs: variables and shapes ----------------------------------------------------------
def tf_shape(shared_name, shape):
    """The TF1 variable shape of a shared (torch) tensor: kernels transposed."""
    if shared_name.endswith(".weight") and len(shape) == 4:
        out, cin, kh, kw = shape
        return (kh, kw, cin, out)
    if shared_name.endswith(".weight") and shared_name.startswith("fc"):
        return tuple(reversed(shape))
    return tuple(shape)


def tf_name(shared_name):
    """"conv1.weight" -> "conv1/kernel", "bn1.running_var" -> "bn1/moving_variance"."""
    layer, param = shared_name.split(".")
    if layer.startswith("bn"):
        return f"{layer}/{BN_TORCH_TO_TF[param]}"
    return f"{layer}/{'kernel' if param == 'weight' else param}"


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (32, 32, 3)])
def test_cnn_variables_map_one_to_one_onto_the_shared_names(input_shape):
    _, model, _, _ = build(build_cnn_classifier, input_shape, 10)
    expected = {tf_name(k): tf_shape(k, v) for k, v in cnn_parameter_shapes(input_shape, 10).items()}
    got = {name: tuple(v.shape.as_list()) for name, v in model.variables.items()}
    assert got == expected
    assert list(got) == list(expected)  # the shared format's order
    assert got["conv1/kernel"] == (3, 3, input_shape[2], 32)
    trainable = {v.op.name for v in model.variables.values() if v.trainable}
    assert {n for n in got if "moving" in n} == set(got) - trainable


def test_mlp_variables_map_one_to_one_onto_the_shared_names():
    _, model, _, _ = build(build_mlp_regressor, 10)
    expected = {tf_name(k): tf_shape(k, v) for k, v in mlp_parameter_shapes(10).items()}
    assert {n: tuple(v.shape.as_list()) for n, v in model.variables.items()} == expected


@pytest.mark.parametrize("input_shape, classes", [((8, 8, 1), 10), ((32, 32, 3), 4)])
def test_output_shapes_and_layer_shapes(input_shape, classes):
    graph, model, _, initialize = build(build_cnn_classifier, input_shape, classes)
    x, _ = images(5, input_shape, classes)
    h, w = input_shape[:2]
    pool3 = graph.get_tensor_by_name("pool3/MaxPool2d:0")
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        logits, pooled = sess.run([model.outputs, pool3], feed(model, x))
    assert logits.shape == (5, classes)
    assert pooled.shape == (5, h // 8, w // 8, 32)
    assert CNNShape(input_shape, classes).flatten_chw == (32, h // 8, w // 8) == model.flatten_chw
    graph, model, _, initialize = build(build_mlp_regressor, 7)
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        assert sess.run(model.outputs, feed(model, np.zeros((4, 7), np.float32))).shape == (4, 1)


# -- batch norm: UPDATE_OPS and torch's running statistics ---------------------------------
@pytest.mark.parametrize("with_update_ops", [True, False])
def test_moving_averages_move_only_through_update_ops(with_update_ops):
    graph, model, train_op, initialize = build(build_cnn_classifier, (8, 8, 1), 10, train=True,
                                               with_update_ops=with_update_ops)
    x, y = images(4)
    conv1 = graph.get_tensor_by_name("conv1/BiasAdd:0")
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        before = sess.run([model.variables["bn1/moving_mean"], model.variables["bn1/moving_variance"]])
        # conv1's output is computed with the weights before this step: what batch norm saw.
        _, features = sess.run([train_op, conv1], feed(model, x, y, training=True))
        mean, variance = sess.run([model.variables["bn1/moving_mean"],
                                   model.variables["bn1/moving_variance"]])
        # Evaluation (training defaults to False) never moves them.
        sess.run(model.outputs, feed(model, x))
        assert np.array_equal(sess.run(model.variables["bn1/moving_mean"]), mean)
    if not with_update_ops:
        assert np.array_equal(mean, before[0]) and np.array_equal(variance, before[1])
        return
    assert not np.allclose(mean, before[0]) and not np.allclose(variance, before[1])
    # torch's BatchNorm2d update, unbiased batch variance included.
    running_mean, running_var = torch.zeros(32), torch.ones(32)
    F.batch_norm(torch.from_numpy(nhwc_to_nchw(features)), running_mean, running_var,
                 training=True, momentum=0.1, eps=1e-5)
    np.testing.assert_allclose(mean, running_mean.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(variance, running_var.numpy(), rtol=1e-4, atol=1e-6)
    # torch folds the unbiased batch variance (n/(n-1), n = N*H*W = 256) into running_var.
    unbiased = 0.9 + 0.1 * features.astype(np.float64).var(axis=(0, 1, 2), ddof=1)
    biased = 0.9 + 0.1 * features.astype(np.float64).var(axis=(0, 1, 2))
    assert np.all(np.abs(variance - unbiased) < 0.1 * np.abs(biased - unbiased))


# -- dropout: a function of the fed seed ---------------------------------------------------
def test_dropout_masks_depend_on_the_fed_seed_only():
    graph, model, _, initialize = build(build_cnn_classifier, (8, 8, 1), 10)
    x, _ = images(8)
    runs = []
    for _ in range(2):  # two Sessions, as an interrupted and a resumed run
        with v1.Session(graph=graph) as sess:
            sess.run(initialize)
            runs.append([sess.run(model.outputs, feed(model, x, training=True, dropout_seed=s))
                         for s in ([7, 0], [7, 0], [7, 1])] + [sess.run(model.outputs, feed(model, x))])
    for a, b in zip(*runs):  # tolerance, not equality: GPU kernels may pick other algorithms
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    first = runs[0]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(first[0], first[2])  # another step, another mask
    assert not np.allclose(first[0], first[3])  # inference: no dropout


# -- checkpoints and shared weights --------------------------------------------------------
def test_saver_round_trip_restores_weights_and_adam_state(tmp_path):
    x, y = images(20)
    graph, model, train_op, initialize = build(build_cnn_classifier, (8, 8, 1), 10, train=True)
    with graph.as_default():
        saver = v1.train.Saver()
        variables = v1.global_variables()
    names = [v.op.name for v in variables]
    assert any(n.endswith("/Adam") for n in names) and "beta1_power" in names
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        train_one_epoch(sess, model, train_op, x, y, batch_indices(20, 10, 0, 1), "classification")
        prefix = save_checkpoint(tmp_path / "last-epoch0001", sess, saver)
        saved = dict(zip(names, sess.run(variables)))
    assert {p.name for p in tmp_path.iterdir()} == {"last-epoch0001.index",
                                                    "last-epoch0001.data-00000-of-00001"}
    graph, model, train_op, initialize = build(build_cnn_classifier, (8, 8, 1), 10, train=True, seed=1)
    with graph.as_default():
        saver = v1.train.Saver()
        variables = v1.global_variables()
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        before = sess.run(model.variables["conv1/kernel"])
        load_checkpoint(prefix, sess, saver)
        restored = dict(zip([v.op.name for v in variables], sess.run(variables)))
        with pytest.raises(WeightsError, match="cannot be restored"):
            load_checkpoint(tmp_path / "missing-epoch0002", sess, saver)
    assert saved.keys() == restored.keys()
    assert not np.allclose(before, restored["conv1/kernel"])
    for name in saved:
        np.testing.assert_array_equal(saved[name], restored[name], err_msg=name)


@pytest.mark.parametrize("task", ["cnn", "mlp"])
def test_export_import_round_trip(task, tmp_path):
    if task == "cnn":
        builder, args, kind, input_shape = build_cnn_classifier, ((8, 8, 1), 10), "classification", (8, 8, 1)
        expected, x = cnn_parameter_shapes((8, 8, 1), 10), images(6)[0]
    else:
        builder, args, kind, input_shape = build_mlp_regressor, (5,), "regression", (5,)
        expected, x = mlp_parameter_shapes(5), np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    graph, model, _, initialize = build(builder, *args, seed=0)
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        tensors = export_weights(sess, model)
        outputs = predict(sess, model, x, 4)
    assert {k: v.shape for k, v in tensors.items()} == expected
    save_weights(tmp_path / "w.safetensors", tensors, {"task": kind})
    loaded, _ = load_weights(tmp_path / "w.safetensors", kind, input_shape, 10 if task == "cnn" else 0)
    graph, model, _, initialize = build(builder, *args, seed=1)  # other initial weights
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        assert not np.allclose(predict(sess, model, x, 4), outputs)
        import_weights(sess, model, loaded)
        np.testing.assert_allclose(predict(sess, model, x, 4), outputs, rtol=1e-6, atol=1e-6)
        for name, value in export_weights(sess, model).items():
            np.testing.assert_array_equal(value, tensors[name], err_msg=name)


# -- session_basics ------------------------------------------------------------------------
def test_session_basics_equals_eager_tf2_and_torch():
    graph_results = session_basics.define_and_run()
    assert_eager_still_works()
    by_hand = {"y": [1.5, 2.0, 2.5], "loss": 10.5, "grad_w": -14.0, "w_after_step": 1.9}
    for name, results in (("tf2", session_basics.eager_tf2()), ("torch", session_basics.eager_torch())):
        assert results.keys() == graph_results.keys() == by_hand.keys()
        for key in by_hand:
            np.testing.assert_allclose(results[key], graph_results[key], rtol=1e-6, err_msg=f"{name} {key}")
    for key, value in by_hand.items():
        np.testing.assert_allclose(graph_results[key], value, rtol=1e-6, err_msg=key)


# -- feeding the wrong shape -----------------------------------------------------------------
def test_wrong_batch_shape_is_a_user_error_naming_both_shapes():
    graph, model, train_op, initialize = build(build_cnn_classifier, (8, 8, 1), 10, train=True)
    x, y = images(4, (28, 28, 1))
    with pytest.raises(UserError, match=r"\(4, 28, 28, 1\).*'inputs'.*\(N, 8, 8, 1\)"):
        check_batch(model.inputs, x)
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        with pytest.raises(UserError, match="does not fit this model"):
            train_one_epoch(sess, model, train_op, x, y, [np.arange(4)], "classification")
        with pytest.raises(UserError, match=r"'targets', which expects \(N\)"):
            evaluate(sess, model, images(4)[0], y.reshape(4, 1), "classification", 4)


# -- entry points, in this (TF2 eager) process ---------------------------------------------
def test_run_cnn_converges_and_keeps_eager_mode(cnn_run):
    m = metrics(cnn_run)
    assert m["implementation"] == "tf1_compat" and m["dataset"] == "digits"
    assert m["test"]["accuracy"] >= 0.9
    assert {p.name for p in cnn_run.iterdir()} >= {"metrics.json", "predictions.csv", "curves.png",
                                                   "run.log", "weights.safetensors", "run_config.json"}
    files = {p.name for p in (cnn_run / "checkpoint").iterdir()}
    state = json.loads((cnn_run / "checkpoint" / "state.json").read_text())
    assert state["last_checkpoint"] == "last-epoch0006"
    assert f"{state['last_checkpoint']}.index" in files and f"{state['best_checkpoint']}.index" in files
    tensors, _ = read_weights(cnn_run / "weights.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == cnn_parameter_shapes((8, 8, 1), 10)
    assert_eager_still_works()


def test_run_nn_converges_and_keeps_eager_mode(tmp_path):
    assert call(run_nn.main, ["--epochs", "30", "--out", str(tmp_path)]) == 0
    m = metrics(tmp_path)
    assert m["dataset"] == "friedman" and m["test"]["r2"] >= 0.8
    assert_eager_still_works()


def test_eval_only_reproduces_the_test_metrics(cnn_run, tmp_path):
    argv = ["--eval-only", "--weights", str(cnn_run / "weights.safetensors"), "--out", str(tmp_path)]
    assert call(run_cnn.main, argv) == 0
    assert metrics(tmp_path)["test"]["accuracy"] == pytest.approx(metrics(cnn_run)["test"]["accuracy"])
    assert metrics(tmp_path)["test"]["loss"] == pytest.approx(metrics(cnn_run)["test"]["loss"], rel=1e-4)
    assert metrics(tmp_path)["best_epoch"] == 0 and metrics(tmp_path)["epochs"] == []


def test_bad_weights_files_exit_2(cnn_run, tmp_path, capsys):
    tensors, meta = read_weights(cnn_run / "weights.safetensors")
    tensors["conv1.weight"] = np.zeros((32, 3, 3, 3), np.float32)  # made for RGB images
    save_weights(tmp_path / "rgb.safetensors", tensors, meta)
    cases = [
        (run_cnn, tmp_path / "rgb.safetensors", "'conv1.weight' has shape (32, 3, 3, 3), expected (32, 1, 3, 3)"),
        (run_nn, cnn_run / "weights.safetensors", "has unexpected tensor"),  # a CNN file for the MLP
        (run_cnn, tmp_path / "missing.safetensors", "does not exist"),
    ]
    for module, path, message in cases:
        code = call(module.main, ["--weights", str(path), "--epochs", "1", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_eval_only_without_weights_and_missing_gpu_exit_2(tmp_path, capsys):
    assert call(run_cnn.main, ["--eval-only", "--out", str(tmp_path)]) == 2
    assert "--eval-only needs --weights" in capsys.readouterr().err
    if not HAS_GPU:
        assert call(run_nn.main, ["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "--device cuda was asked for but no GPU is visible" in capsys.readouterr().err


def test_huge_learning_rate_exits_3(tmp_path, capsys):
    assert call(run_nn.main, ["--lr", "1e9", "--epochs", "2", "--out", str(tmp_path)]) == 3
    assert "loss became" in capsys.readouterr().err


# -- interrupt and resume, as a user does it -------------------------------------------------
def _command(*args):
    return [sys.executable, "-m", "tf1_compat.run_cnn", "--deterministic", "--epochs", "5", *args]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the bar shows "epoch 2"
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight_log = open(tmp_path / "straight.log", "wb")  # a file: a full pipe would block it
    straight = subprocess.Popen(_command("--out", str(tmp_path / "straight")), cwd=ROOT, env=_env(),
                                stdout=straight_log, stderr=subprocess.STDOUT)
    interrupted = subprocess.Popen(_command("--out", str(tmp_path / "cut")), cwd=ROOT, env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = b"", time.monotonic() + 240
    while b"epoch 2" not in seen and time.monotonic() < deadline:
        chunk = os.read(interrupted.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"epoch 2" in seen, seen.decode(errors="replace")[-2000:]
    interrupted.send_signal(signal.SIGINT)
    rest = interrupted.communicate(timeout=120)[0]
    log = (seen + rest).decode(errors="replace")
    assert interrupted.returncode == 130, log[-2000:]
    assert "Traceback" not in log
    stopped = int(re.search(r"SIGINT received during epoch (\d+)", log).group(1))
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert 2 <= stopped <= 5 and len(state["history"]) == stopped - 1  # mid-epoch, usually 2
    resumed = subprocess.run([sys.executable, "-m", "tf1_compat.run_cnn", "--resume",
                              str(tmp_path / "cut")], cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'cut'} after epoch {len(state['history'])}" in resumed.stdout
    code = straight.wait(timeout=240)
    straight_log.close()
    assert code == 0, (tmp_path / "straight.log").read_text(errors="replace")[-2000:]
    assert (tmp_path / "cut" / "predictions.csv").read_text() == \
        (tmp_path / "straight" / "predictions.csv").read_text()
    assert metrics(tmp_path / "cut")["test"] == metrics(tmp_path / "straight")["test"]
