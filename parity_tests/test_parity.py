"""Cross-framework parity of the shipped models: shapes, forward passes, gradients and
Adam steps, given the same weights (a fresh torch model's, random batch-norm statistics)
and batches. Inputs are 32x32x3, so the flattened map before fc1 is 32x4x4: a wrong
flatten order fails. Tolerances are for float32 (stated per test); the MLP is also
checked against a float64 numpy reference. With ``pytest --device cuda`` the forward,
gradient and Adam checks run on the GPU in each framework that sees one (TF32 off).
"""
import numpy as np
import pytest
import torch
import tensorflow as tf

from common import config, layout
from parity_tests.conftest import random_shared_weights
from tf1_compat import models as tf1_models
from tf1_compat import train as tf1_train
from tf2_impl import models as tf2_models
from tf2_impl import train as tf2_train
from torch_impl import models as torch_models
from torch_impl import train as torch_train

tf1 = tf.compat.v1
INPUT_SHAPE, CLASSES, FEATURES, APIS = (32, 32, 3), 10, 10, tf2_models.APIS
TASK = {"cnn": "classification", "mlp": "regression"}
TF_DEVICE = {"cpu": "/CPU:0", "cuda": "/GPU:0"}


def _images(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *INPUT_SHAPE)).astype(np.float32), rng.integers(0, CLASSES, n)


def _rows(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, FEATURES)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32)


def _shared_weights(task, seed=0):
    """A fresh torch model's weights, batch-norm statistics made random (not 0/1)."""
    torch.manual_seed(seed)
    weights = torch_models.export_weights(_torch_model(task))
    random = random_shared_weights("classification", INPUT_SHAPE, CLASSES, seed)
    return {k: random[k] if k.startswith("bn") else v for k, v in weights.items()}


def _torch_model(task):
    return torch_models.build_cnn(INPUT_SHAPE, CLASSES) if task == "cnn" else torch_models.build_mlp(FEATURES)


def _tf2_model(task, api="subclassing"):
    return (tf2_models.build_cnn(INPUT_SHAPE, CLASSES, api) if task == "cnn"
            else tf2_models.build_mlp(FEATURES, api))


def _tf1_model(task):
    return tf1_models.build_cnn(INPUT_SHAPE, CLASSES) if task == "cnn" else tf1_models.build_mlp(FEATURES)


# -- each implementation's forward pass from shared weights ------------------------------------
def torch_forward(task, weights, x, device="cpu"):
    model = _torch_model(task)
    torch_models.import_weights(model, weights)
    model.to(device).eval()
    inputs = torch.from_numpy(layout.nhwc_to_nchw(x) if task == "cnn" else x).to(device)
    with torch.inference_mode():
        return model(inputs).cpu().numpy()


def tf2_forward(task, weights, x, api):
    model = _tf2_model(task, api)
    tf2_models.import_weights(model, weights)
    return model(x, training=False).numpy()


def tf1_forward(task, weights, x, device="cpu"):
    with tf.Graph().as_default():
        model = _tf1_model(task)
        with tf1.Session(config=tf1_train.session_config(device)) as sess:
            tf1_models.import_weights(sess, model, weights)
            return sess.run(model.outputs, tf1_train.feed(model, x))


# -- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_shape", [(32, 32, 3), (8, 8, 1)])
def test_shapes_layer_by_layer_torch_vs_keras(input_shape):
    """Every named layer's output shape, torch (NCHW, moved to NHWC) vs Keras functional."""
    torch_model = torch_models.build_cnn(input_shape, CLASSES).eval()
    shapes = {}
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc1", "fc2", "fc3"):
        getattr(torch_model, name).register_forward_hook(
            lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    torch_model(torch.zeros(2, input_shape[2], *input_shape[:2]))
    keras_model = tf2_models.build_cnn(input_shape, CLASSES, "functional")
    for name, shape in shapes.items():
        keras_shape = tuple(keras_model.get_layer(name).output.shape)[1:]
        expected = (shape[2], shape[3], shape[1]) if len(shape) == 4 else shape[1:]
        assert keras_shape == expected, name


@pytest.mark.parametrize("input_shape", [(32, 32, 3), (8, 8, 1)])
def test_shapes_whole_model_every_implementation(input_shape):
    x = np.zeros((3, *input_shape), np.float32)
    torch_model = torch_models.build_cnn(input_shape, CLASSES).eval()
    assert tuple(torch_model(torch.from_numpy(layout.nhwc_to_nchw(x))).shape) == (3, CLASSES)
    for api in APIS:
        assert tuple(tf2_models.build_cnn(input_shape, CLASSES, api)(x).shape) == (3, CLASSES)
    with tf.Graph().as_default():
        model = tf1_models.build_cnn(input_shape, CLASSES)
        assert model.outputs.shape.as_list() == [None, CLASSES]


# -- forward parity (layout conversions) ------------------------------------------------------------
def test_forward_parity_cnn_flatten_layout_all_implementations(device, tf_device):
    """Same shared weights -> same logits in torch, the three Keras APIs and the TF1 graph."""
    weights = _shared_weights("cnn")
    x, _ = _images()
    expected = torch_forward("cnn", weights, x, device)
    with tf.device(TF_DEVICE[tf_device]):
        outputs = {f"tf2-{api}": tf2_forward("cnn", weights, x, api) for api in APIS}
    outputs["tf1"] = tf1_forward("cnn", weights, x, tf_device)
    for name, out in outputs.items():
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4, err_msg=name)


def test_forward_parity_fails_with_a_plain_transpose_of_fc1():
    """The same check with fc1 only transposed (no flatten permutation) must fail."""
    weights = _shared_weights("cnn")
    x, _ = _images()
    expected = torch_forward("cnn", weights, x)
    model = tf2_models.build_cnn(INPUT_SHAPE, CLASSES, "functional")
    tf2_models.import_weights(model, weights)
    model.get_layer("fc1").kernel.assign(weights["fc1.weight"].T)
    assert np.abs(model(x, training=False).numpy() - expected).max() > 1e-2


def test_forward_parity_mlp_all_implementations():
    weights = _shared_weights("mlp")
    x, _ = _rows()
    expected = torch_forward("mlp", weights, x)
    assert expected.shape == (16, 1)
    for api in APIS:
        np.testing.assert_allclose(tf2_forward("mlp", weights, x, api), expected, atol=1e-5)
    np.testing.assert_allclose(tf1_forward("mlp", weights, x), expected, atol=1e-5)


# -- gradients ---------------------------------------------------------------------------------
def torch_gradients(task, weights, x, y, device="cpu"):
    model = _torch_model(task)
    torch_models.import_weights(model, weights)
    model.to(device).eval()  # inference-mode batch norm and no dropout: a deterministic loss
    inputs = torch.from_numpy(layout.nhwc_to_nchw(x) if task == "cnn" else x).to(device)
    targets = torch.from_numpy(y).to(device)
    loss = torch_train.make_loss(TASK[task])(model(inputs), targets)
    loss.backward()
    return {name: p.grad.cpu().numpy() for name, p in model.named_parameters()}


def tf2_gradients(task, weights, x, y, api):
    def build():
        model = _tf2_model(task, api)
        tf2_models.import_weights(model, weights)
        return model
    model = build()
    loss_fn = tf2_train.make_loss(TASK[task])
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=False))
    grads = tape.gradient(loss, model.trainable_variables)
    twin = build()
    for variable, grad in zip(twin.trainable_variables, grads):
        variable.assign(grad)
    return tf2_models.export_weights(twin)


def tf1_gradients(task, weights, x, y, device="cpu"):
    with tf.Graph().as_default():
        model = _tf1_model(task)
        trainable = tf1.trainable_variables()
        grads = tf1.gradients(tf1_train.make_loss(TASK[task], model), trainable)
        with tf1.Session(config=tf1_train.session_config(device)) as sess:
            tf1_models.import_weights(sess, model, weights)
            values = sess.run(grads, tf1_train.feed(model, x, y))
            for variable, value in zip(trainable, values):  # gradients in the variables' place
                sess.run(variable.initializer, {variable.initial_value: value})
            return tf1_models.export_weights(sess, model)


def _compare_gradients(expected, got, name, atol):
    for param, grad in expected.items():
        np.testing.assert_allclose(got[param], grad, atol=atol, rtol=1e-3, err_msg=f"{name} {param}")


def test_gradients_cnn_torch_tape_tf1(device, tf_device):
    """dL/dparam on one batch: autograd, GradientTape (three APIs) and tf.gradients."""
    weights = _shared_weights("cnn")
    x, labels = _images()
    expected = torch_gradients("cnn", weights, x, labels, device)
    assert set(expected) == {k for k in weights if "running" not in k}
    with tf.device(TF_DEVICE[tf_device]):
        for api in APIS:
            _compare_gradients(expected, tf2_gradients("cnn", weights, x, labels, api), api, 1e-5)
    _compare_gradients(expected, tf1_gradients("cnn", weights, x, labels, tf_device), "tf1", 1e-5)


def _numpy_mlp_gradients(weights, x, y):
    """Hand-written backward of fc1-ReLU-fc2-ReLU-fc3 with MSE, in float64."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x, y = x.astype(np.float64), y.astype(np.float64)
    a1 = x @ w["fc1.weight"].T + w["fc1.bias"]
    h1 = np.maximum(a1, 0)
    a2 = h1 @ w["fc2.weight"].T + w["fc2.bias"]
    h2 = np.maximum(a2, 0)
    out = h2 @ w["fc3.weight"].T + w["fc3.bias"]
    d_out = 2 * (out - y) / out.size
    d_a2 = (d_out @ w["fc3.weight"]) * (a2 > 0)
    d_a1 = (d_a2 @ w["fc2.weight"]) * (a1 > 0)
    return {"fc3.weight": d_out.T @ h2, "fc3.bias": d_out.sum(0),
            "fc2.weight": d_a2.T @ h1, "fc2.bias": d_a2.sum(0),
            "fc1.weight": d_a1.T @ x, "fc1.bias": d_a1.sum(0)}


def test_gradients_mlp_match_numpy_reference():
    weights = _shared_weights("mlp")
    x, y = _rows()
    expected = _numpy_mlp_gradients(weights, x, y)
    _compare_gradients(expected, torch_gradients("mlp", weights, x, y), "torch", 1e-6)
    for api in APIS:
        _compare_gradients(expected, tf2_gradients("mlp", weights, x, y, api), api, 1e-6)
    _compare_gradients(expected, tf1_gradients("mlp", weights, x, y), "tf1", 1e-6)


# -- optimizer steps ------------------------------------------------------------------------------
def _batches(task, steps):
    return [(_images(20, seed=s) if task == "cnn" else _rows(20, seed=s)) for s in range(steps)]


def torch_adam(task, weights, batches, device="cpu"):
    model = _torch_model(task)
    torch_models.import_weights(model, weights)
    model.to(device).train()
    loss_fn, optimizer = torch_train.make_loss(TASK[task]), torch_train.make_optimizer(model, 1e-3)
    for t, (x, y) in enumerate(batches, start=1):
        # Keras and TF1 add eps to sqrt(v) before the bias correction, torch after it
        # (test_pitfall_adam_eps_default_1e8_vs_1e7): this eps makes torch's update theirs.
        optimizer.param_groups[0]["eps"] = config.ADAM_EPS / np.sqrt(1 - config.ADAM_BETA2 ** t)
        inputs = torch.from_numpy(layout.nhwc_to_nchw(x) if task == "cnn" else x).to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), torch.from_numpy(y).to(device))
        loss.backward()
        optimizer.step()
    return torch_models.export_weights(model)


def tf2_adam(task, weights, batches):
    model = _tf2_model(task)
    tf2_models.import_weights(model, weights)
    step = tf2_train.make_train_step(model, tf2_train.make_loss(TASK[task]),
                                     tf2_train.make_optimizer(model, 1e-3))
    for x, y in batches:
        step(tf.constant(x), tf.constant(y))
    return tf2_models.export_weights(model)


def tf1_adam(task, weights, batches, device="cpu"):
    with tf.Graph().as_default():
        model = _tf1_model(task)
        train_op = tf1_train.make_train_step(tf1_train.make_optimizer(1e-3),
                                             tf1_train.make_loss(TASK[task], model))
        with tf1.Session(config=tf1_train.session_config(device)) as sess:
            sess.run(tf1.global_variables_initializer())
            tf1_models.import_weights(sess, model, weights)
            for x, y in batches:
                sess.run(train_op, tf1_train.feed(model, x, y, training=True))
            return tf1_models.export_weights(sess, model)


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("task", ["mlp", "cnn"])
def test_adam_steps_agree_with_matched_defaults(task, steps, monkeypatch, device, tf_device):
    """After 1 and 10 Adam steps (lr 1e-3, eps 1e-8) from the same weights on the same
    batches, every parameter agrees, through each framework's make_loss, make_optimizer
    and training step. Dropout is switched off (its masks come from each
    framework's own RNG); batch norm runs on batch statistics. torch and TF1 fold the
    unbiased batch variance into the moving variance, Keras's BatchNormalization the
    biased one: its running_var is held to 0.1 * var / (n - 1) per step more (n = N*H*W
    >= 1280 here, so 1e-4 per step)."""
    monkeypatch.setattr(config, "DROPOUT", 0.0)
    weights = _shared_weights(task)
    batches = _batches(task, steps)
    expected = torch_adam(task, weights, batches, device)
    moved = max(np.abs(expected[k] - weights[k]).max() for k in expected)
    assert moved > 0.5e-3 * steps * 0.5  # the weights really moved
    with tf.device(TF_DEVICE[tf_device]):
        got_tf2 = tf2_adam(task, weights, batches)
    for name, got in (("tf2", got_tf2), ("tf1", tf1_adam(task, weights, batches, tf_device))):
        for param, value in expected.items():
            atol = 1e-4 * steps if name == "tf2" and param.endswith("running_var") else 2e-5 * steps
            np.testing.assert_allclose(got[param], value, atol=atol, rtol=1e-3,
                                       err_msg=f"{name} {param}")
