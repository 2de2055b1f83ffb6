"""porting's TF1 side: variables named by scope (``scope/kernel``, ...) <-> torch modules
through the converter registry (``porting/tf1.py``).

The TF1 graph is written with this project's TF1 layers (``tf1_compat/models.py``'s conv2d,
batch_norm and dense, ``tf1_compat/layers/``'s conv, LSTM, GRU, layer norm and dense), the
torch side is {scope: module}. After a conversion either way the outputs agree within 1e-5
(float32); round trips give the values back; a mismatch is one ``TransferError`` naming
every culprit, and nothing is changed.
"""
import numpy as np
import pytest
import torch
from torch import nn

import porting
import tensorflow as tf
from keras import layers
from tf1_compat import models
from tf1_compat.layers import attention, conv, norm, recurrent

TOL = 1e-5
tf1 = tf.compat.v1
rng = np.random.default_rng(0)
FLATTEN = {"fc": (6, 3, 3)}  # conv2's map, read flattened by fc


def torch_modules(lstm_hidden=4, fc_out=5):
    return {"conv1": nn.Conv2d(3, 4, 3, padding=1, bias=False), "bn1": nn.BatchNorm2d(4),
            "conv2": nn.Conv2d(4, 6, 3, stride=2, padding=1), "fc": nn.Linear(54, fc_out),
            "lstm": nn.LSTM(3, lstm_hidden, num_layers=2, bidirectional=True, batch_first=True),
            "gru": nn.GRU(8, 3, batch_first=True), "ln": nn.LayerNorm(3),
            "head": nn.Linear(8, 2)}


KERAS_CONFIGS = {  # what the TF1 graph computes, in Keras's words
    "conv1": layers.Conv2D(4, 3, padding="same", use_bias=False),
    "bn1": layers.BatchNormalization(epsilon=1e-5, momentum=0.9),
    "conv2": layers.Conv2D(6, 3, strides=2), "fc": layers.Dense(5), "lstm": layers.LSTM(4),
    "gru": layers.GRU(3), "ln": layers.LayerNormalization(epsilon=1e-5), "head": layers.Dense(2)}


def torch_forward(m, images, sequences):
    """images (B, 6, 6, 3) NHWC, sequences (B, 5, 3) -> (B, 2)."""
    with torch.no_grad():
        for module in m.values():
            module.eval()
        h = torch.relu(m["bn1"](m["conv1"](torch.from_numpy(images).permute(0, 3, 1, 2))))
        h = m["fc"](torch.flatten(m["conv2"](h), 1))
        q = m["gru"](m["lstm"](torch.from_numpy(sequences))[0])[0]
        return m["head"](torch.cat([h, m["ln"](q[:, -1])], 1)).numpy()


def tf1_graph():
    """(graph, images, sequences, outputs): the same network as TF1 ops on scoped variables."""
    with tf.Graph().as_default() as graph:
        images = tf1.placeholder(tf.float32, (None, 6, 6, 3))
        sequences = tf1.placeholder(tf.float32, (None, 5, 3))
        h = models.conv2d(images, 4, "conv1")
        h = tf.nn.relu(models.batch_norm(h, tf.constant(False), "bn1"))
        h = conv.conv(h, 6, 3, stride=2, padding=1, name="conv2")
        h = models.dense(tf.reshape(h, (-1, 54)), 5, "fc")
        q, _ = recurrent.rnn(sequences, "lstm", 4, "lstm", num_layers=2, bidirectional=True)
        q, _ = recurrent.rnn(q, "gru", 3, "gru")
        q = norm.layer_norm(q[:, -1], "ln")
        outputs = attention.dense(tf.concat([h, q], 1), 2, "head")
    return graph, images, sequences, outputs


def random_values(shapes):
    """Random values for {name: shape}, variances positive, so nothing converts by luck."""
    return {name: rng.uniform(0.5, 1.5, shape).astype("f") if "variance" in name
            else rng.uniform(-0.5, 0.5, shape).astype("f") for name, shape in shapes.items()}


def randomize(modules):
    for module in modules.values():
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(torch.from_numpy(random_values({name: tensor.shape})[name]))
    return modules


def inputs():
    return rng.normal(size=(2, 6, 6, 3)).astype("f"), rng.normal(size=(2, 5, 3)).astype("f")


def test_tf1_graph_variables_convert_into_torch_modules():
    """A TF1 graph's variables, read from its session, loaded into torch: same outputs."""
    graph, images, sequences, outputs = tf1_graph()
    x, s = inputs()
    with graph.as_default(), tf1.Session() as session:
        shapes = {v.op.name: v.shape.as_list() for v in tf1.global_variables()}
        porting.tf1_load(session, random_values(shapes))
        expected = session.run(outputs, {images: x, sequences: s})
        values = porting.tf1_read(session)
    assert {"bn1/moving_variance", "lstm/layer1/backward/recurrent_kernel"} <= set(values)
    modules = torch_modules()
    tensors = porting.torch_values(modules, KERAS_CONFIGS, values, flatten_shape=FLATTEN)
    assert sorted(tensors["lstm"]) == sorted(k for k in modules["lstm"].state_dict())
    porting.torch_load(modules, tensors)
    np.testing.assert_allclose(torch_forward(modules, x, s), expected, rtol=0, atol=TOL)


def test_round_trips_torch_tf1_torch_and_tf1_torch_tf1_are_lossless():
    """Every conversion is a permutation or a copy, except the LSTM's two torch biases, which
    TF1 (as Keras) keeps as one sum: back in torch it is bias_ih, with bias_hh zero."""
    graph, images, sequences, outputs = tf1_graph()
    modules, back, (x, s) = randomize(torch_modules()), torch_modules(), inputs()
    with graph.as_default(), tf1.Session() as session:
        variables = tf1.global_variables()
        values = porting.tf1_values(modules, KERAS_CONFIGS, variables, FLATTEN)
        porting.tf1_load(session, values)
        np.testing.assert_allclose(session.run(outputs, {images: x, sequences: s}),
                                   torch_forward(modules, x, s), rtol=0, atol=TOL)
        read = porting.tf1_read(session)
    porting.torch_load(back, porting.torch_values(back, KERAS_CONFIGS, read, FLATTEN))
    for scope, module in modules.items():
        state, again = module.state_dict(), back[scope].state_dict()
        for name, tensor in state.items():
            if scope == "lstm" and name.startswith("bias_ih"):
                hh = name.replace("ih", "hh")
                np.testing.assert_allclose(again[name], tensor + state[hh], rtol=0, atol=1e-7)
                assert not again[hh].any()
            elif not (scope == "lstm" and name.startswith("bias_hh")):
                assert torch.equal(again[name], tensor), f"{scope}.{name}"
    assert read.keys() == values.keys()
    again = porting.tf1_values(back, KERAS_CONFIGS, variables, FLATTEN)
    for name, value in read.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_torch_values_mismatch_names_every_culprit_and_changes_nothing():
    """A Linear too wide, an LSTM with another hidden size, a module without a Keras config
    and a stray variable under a scope: one error lists them all."""
    graph, *_ = tf1_graph()
    with graph.as_default(), tf1.Session() as session:
        shapes = {v.op.name: v.shape.as_list() for v in tf1.global_variables()}
        porting.tf1_load(session, random_values(shapes))
        values = {**porting.tf1_read(session), "head/extra": np.zeros(2, "f")}
    modules = randomize(torch_modules(lstm_hidden=5, fc_out=7))
    modules["norm"] = nn.LayerNorm(3)
    before = {s: {k: v.clone() for k, v in m.state_dict().items()} for s, m in modules.items()}
    with pytest.raises(porting.TransferError) as error:
        porting.torch_values(modules, KERAS_CONFIGS, values, flatten_shape=FLATTEN)
    message = str(error.value)
    for culprit in ("fc: output size differs", "lstm/layer0/forward: hidden size differs",
                    "lstm/layer1/backward: hidden size differs", "norm: no Keras config",
                    "head/extra: a TF1 variable under a given scope"):
        assert culprit in message, message
    assert "conv1" not in message and "gru:" not in message, message
    del values["head/extra"]
    good = porting.torch_values(torch_modules(), KERAS_CONFIGS, values, flatten_shape=FLATTEN)
    with pytest.raises(porting.TransferError, match=r"fc\.weight: \(5, 54\) does not fit"):
        porting.torch_load(modules, good)  # conv1, bn1, ... fit: not copied either
    for scope, module in modules.items():
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, before[scope][name]), f"{scope}.{name}"
