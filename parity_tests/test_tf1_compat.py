"""Tests of tf1_compat's graphs: variables and shapes (like slim's ``alexnet_test``), batch
norm's UPDATE_OPS against torch's running statistics, stateless dropout keyed on the global
step, Saver and shared-weights round trips, feeding the wrong shape, and session_basics
against eager TF2 and PyTorch.

Each graph is built in its own ``tf.Graph()`` in this pytest process, where TF2 behaviour is
on; ``test_tf1_runs.py`` runs this file again under ``disable_v2_behavior``, the setting of
the ``python -m`` entry points. The entry points themselves are tested there too.
"""
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F

from common.config import CNNShape, cnn_parameter_shapes, mlp_parameter_shapes
from common.errors import UserError, WeightsError
from common.converters.core import BN_TORCH_TO_KERAS
from common.layout import nhwc_to_nchw
from common.weights import load_weights, save_weights
from parity_tests.conftest import random_shared_weights
from tf1_compat import session_basics
from tf1_compat.models import build_cnn, build_mlp, export_weights, import_weights
from tf1_compat.train import (check_batch, evaluate, feed, load_checkpoint, make_batches,
                              make_loss, make_optimizer, make_train_step, predict,
                              save_checkpoint, train_one_epoch)

v1 = tf.compat.v1


def build(builder, *args, seed=0, **train_kwargs):
    """(graph, model, loss, train_step, initializer) in a fresh graph."""
    task = "classification" if builder is build_cnn else "regression"
    with tf.Graph().as_default() as graph:
        v1.set_random_seed(seed)
        model = builder(*args)
        loss = make_loss(task, model)
        train_step = make_train_step(make_optimizer(1e-3), loss, **train_kwargs)
        initialize = v1.global_variables_initializer()
    return graph, model, loss, train_step, initialize


def images(n=6, shape=(8, 8, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n)


# -- graphs: variables and shapes ----------------------------------------------------------
def tf_variable(shared_name, shape):
    """("conv1/kernel", (3, 3, in, out)) for ("conv1.weight", (out, in, 3, 3)): TF names, TF shapes."""
    layer, param = shared_name.split(".")
    if layer.startswith("bn"):
        return f"{layer}/{BN_TORCH_TO_KERAS[param]}", tuple(shape)
    if param == "bias":
        return f"{layer}/bias", tuple(shape)
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return f"{layer}/kernel", (kh, kw, cin, out)
    return f"{layer}/kernel", tuple(reversed(shape))


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (32, 32, 3)])
def test_cnn_variables_map_one_to_one_onto_the_shared_names(input_shape):
    graph, model, _, _, _ = build(build_cnn, input_shape, 10)
    expected = [tf_variable(k, v) for k, v in cnn_parameter_shapes(input_shape, 10).items()]
    got = [(name, tuple(v.shape.as_list())) for name, v in model.variables.items()]
    assert got == expected  # the shared format's order, no conv bias
    assert ("conv1/kernel", (3, 3, input_shape[2], 32)) in got
    trainable = {v.op.name for v in model.variables.values() if v.trainable}
    assert {n for n, _ in got if "moving" in n} == {n for n, _ in got} - trainable
    with graph.as_default():  # the global step exists but is not a model weight
        assert v1.train.get_global_step().op.name == "global_step"
        assert v1.global_variables()[0].op.name == "global_step"


def test_mlp_variables_map_one_to_one_onto_the_shared_names():
    _, model, _, _, _ = build(build_mlp, 10)
    expected = [tf_variable(k, v) for k, v in mlp_parameter_shapes(10).items()]
    assert [(n, tuple(v.shape.as_list())) for n, v in model.variables.items()] == expected


@pytest.mark.parametrize("input_shape, classes", [((8, 8, 1), 10), ((32, 32, 3), 4)])
def test_output_shapes_and_layer_shapes(input_shape, classes):
    graph, model, _, _, initialize = build(build_cnn, input_shape, classes)
    x, _ = images(5, input_shape, classes)
    h, w = input_shape[:2]
    pool3 = graph.get_tensor_by_name("pool3/MaxPool2d:0")
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        logits, pooled = sess.run([model.outputs, pool3], feed(model, x))
    assert logits.shape == (5, classes)
    assert pooled.shape == (5, h // 8, w // 8, 32)
    assert CNNShape(input_shape, classes).flatten_chw == (32, h // 8, w // 8) == model.flatten_chw
    graph, model, _, _, initialize = build(build_mlp, 7)
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        assert predict(sess, model, np.zeros((4, 7), np.float32)).shape == (4, 1)


# -- batch norm: UPDATE_OPS and torch's running statistics ---------------------------------
@pytest.mark.parametrize("with_update_ops", [True, False])
def test_moving_averages_move_only_through_update_ops(with_update_ops):
    graph, model, _, train_step, initialize = build(build_cnn, (8, 8, 1), 10,
                                                    with_update_ops=with_update_ops)
    x, y = images(4)
    conv1 = graph.get_tensor_by_name("conv1/Conv2D:0")
    moving = [model.variables["bn1/moving_mean"], model.variables["bn1/moving_variance"]]
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        before = sess.run(moving)
        # conv1's output is computed with the weights before this step: what batch norm saw.
        _, features = sess.run([train_step, conv1], feed(model, x, y, training=True))
        mean, variance = sess.run(moving)
        sess.run(model.outputs, feed(model, x))  # inference (the default) never moves them
        assert np.array_equal(sess.run(moving[0]), mean)
    if not with_update_ops:  # the classic TF1 bug: the averages never move
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


# -- dropout: a function of (graph seed, global step) --------------------------------------
def test_dropout_masks_depend_on_the_global_step_only():
    graph, model, _, _, initialize = build(build_cnn, (8, 8, 1), 10)
    with graph.as_default():
        step = v1.train.get_global_step()
    x, _ = images(8)
    runs = []
    for _ in range(2):  # two Sessions, as an interrupted and a resumed run
        with v1.Session(graph=graph) as sess:
            sess.run(initialize)
            outputs = []
            for value in (7, 7, 8):
                sess.run(step.initializer, {step.initial_value: value})
                outputs.append(sess.run(model.outputs, feed(model, x, training=True)))
            runs.append(outputs + [sess.run(model.outputs, feed(model, x))])
    for a, b in zip(*runs):  # tolerance, not equality: GPU kernels may pick other algorithms
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    first = runs[0]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(first[0], first[2])  # another step, another mask
    assert not np.allclose(first[0], first[3])  # inference: no dropout


# -- checkpoints and shared weights --------------------------------------------------------
def test_saver_round_trip_restores_weights_adam_state_and_global_step(tmp_path):
    x, y = images(20)

    def session_with_saver(seed):
        graph, model, loss, train_step, initialize = build(build_cnn, (8, 8, 1), 10, seed=seed)
        with graph.as_default():
            saver, variables = v1.train.Saver(), v1.global_variables()
        sess = v1.Session(graph=graph)
        sess.run(initialize)
        return sess, model, loss, train_step, saver, variables

    sess, model, loss, train_step, saver, variables = session_with_saver(0)
    names = [v.op.name for v in variables]
    assert {"global_step", "beta1_power", "conv1/kernel/Adam"} <= set(names)
    with sess:
        train_one_epoch(sess, model, train_step, loss, make_batches(x, y, 10, 0, 1),
                        "classification")
        save_checkpoint(tmp_path / "epoch0001", sess, saver)
        saved = dict(zip(names, sess.run(variables)))
    assert saved["global_step"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {"epoch0001.index",
                                                    "epoch0001.data-00000-of-00001"}
    sess, model, _, _, saver, variables = session_with_saver(1)
    with sess:
        before = sess.run(model.variables["conv1/kernel"])
        load_checkpoint(tmp_path / "epoch0001", sess, saver)
        restored = dict(zip([v.op.name for v in variables], sess.run(variables)))
        with pytest.raises(WeightsError, match="cannot be restored"):
            load_checkpoint(tmp_path / "epoch0002", sess, saver)
    assert saved.keys() == restored.keys()
    assert not np.allclose(before, restored["conv1/kernel"])
    for name in saved:
        np.testing.assert_array_equal(saved[name], restored[name], err_msg=name)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_export_import_round_trip(task, tmp_path):
    if task == "classification":
        builder, args, input_shape, classes = build_cnn, ((8, 8, 1), 10), (8, 8, 1), 10
        x = images(6)[0]
    else:
        builder, args, input_shape, classes = build_mlp, (5,), (5,), 0
        x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    weights = random_shared_weights(task, input_shape, classes or 10)
    save_weights(tmp_path / "w.safetensors", weights, {"task": task})
    loaded, _ = load_weights(tmp_path / "w.safetensors", task, input_shape, classes)
    outputs = []
    for seed in (0, 1):  # other initial weights, the same imported ones
        graph, model, _, _, initialize = build(builder, *args, seed=seed)
        with v1.Session(graph=graph) as sess:
            sess.run(initialize)
            fresh = predict(sess, model, x)
            import_weights(sess, model, loaded)
            outputs.append(predict(sess, model, x))
            assert not np.allclose(fresh, outputs[-1])
            for name, value in export_weights(sess, model).items():
                np.testing.assert_array_equal(value, weights[name], err_msg=name)
    np.testing.assert_array_equal(outputs[0], outputs[1])


# -- session_basics ------------------------------------------------------------------------
def test_session_basics_equals_eager_tf2_and_torch():
    graph_results = session_basics.define_and_run()
    assert tf.executing_eagerly()  # the TF1 graph did not leak into this process
    by_hand = {"y": [1.5, 2.0, 2.5], "loss": 10.5, "grad_w": -14.0, "w_after_step": 1.9}
    for name, results in (("tf2", session_basics.eager_tf2()), ("torch", session_basics.eager_torch())):
        assert results.keys() == graph_results.keys() == by_hand.keys()
        for key in by_hand:
            np.testing.assert_allclose(results[key], graph_results[key], rtol=1e-6, err_msg=f"{name} {key}")
    for key, value in by_hand.items():
        np.testing.assert_allclose(graph_results[key], value, rtol=1e-6, err_msg=key)


# -- feeding -------------------------------------------------------------------------------
def test_batches_follow_the_shared_order_and_the_wrong_shape_is_a_user_error():
    x, y = images(25)
    batches = list(make_batches(x, y, 10, seed=3, epoch=2))
    assert [len(b[1]) for b in batches] == [10, 10, 5]
    assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == sorted(y.tolist())
    assert np.array_equal(np.concatenate([b[0] for b in make_batches(x, y, 10)]), x)
    graph, model, loss, train_step, initialize = build(build_cnn, (8, 8, 1), 10)
    x, y = images(4, (28, 28, 1))
    with pytest.raises(UserError, match=r"\(4, 28, 28, 1\).*'inputs'.*\(N, 8, 8, 1\)"):
        check_batch(model.inputs, x)
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        with pytest.raises(UserError, match="does not fit this model"):
            train_one_epoch(sess, model, train_step, loss, [(x, y)], "classification")
        with pytest.raises(UserError, match=r"'targets', which expects \(N\)"):
            evaluate(sess, model, loss, [(images(4)[0], y.reshape(4, 1))], "classification")
