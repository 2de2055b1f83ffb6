"""tf1_compat's recurrent classifier: ``rnn_models`` (variables and shapes per cell, one and two
directions, in the style of slim's ``alexnet_test``), the same function as the torch reference
``torch_impl/rnn_models.py`` from the same weights (forward, gradients, 5 Adam steps), the
weights round trip, and the entry point ``tf1_compat.run_rnn``.

Parity runs in float64: ``rnn_classifier`` on float64 placeholders, every ``get_variable``
made float64 by a custom getter, torch's model ``.double()``. Logits and the input gradient
are compared as they are, within 1e-9 of the largest entry; weights and their gradients in the
shared format, which ``export_weights`` writes in float32, so within float32 rounding: 1e-6 of
the largest entry (after 5 Adam steps 1e-5: TF1's optimizer keeps float32 hyperparameters).
Each graph is built in its own ``tf.Graph()`` in this process (TF2 behaviour on); one
subprocess runs the entry point as ``python -m`` does, under ``disable_v2_behavior``.
"""
import numpy as np
import pytest
import tensorflow as tf
import torch

from common import config
from common.datasets import load_dataset
from common.weights import read_weights
from parity_tests.conftest import call, metrics
# The torch side (data, reference model, Adam steps) and the LSTM bias bookkeeping are the
# TF2 twin's tests' (F, T, N, CLASSES all different, so a misread axis cannot fit).
from parity_tests.test_rnn_tf2 import (CLASSES, F, N, T, _data, _lstm_bias_hh, _predictions,
                                       _sum_lstm_biases, _torch_adam, _torch_model)
from tf1_compat import train
from tf1_compat.rnn_models import (RNNGraphModel, build_rnn, export_weights, import_weights,
                                   rnn_classifier)
from torch_impl import rnn_models as torch_rnn
from torch_impl import train as torch_train

tf1 = tf.compat.v1
H = config.RNN_HIDDEN
DIRECTIONS = [False, True]
DIRECTION_IDS = ["one-way", "bidirectional"]
RTOL, RTOL64 = 1e-6, 1e-9


def _float64_getter(getter, *args, **kwargs):
    kwargs["dtype"] = tf.float64  # every variable in float64, whatever dtype a layer asks for
    return getter(*args, **kwargs)


def _float64_model(cell, bidirectional):
    """``build_rnn``'s model in float64, in the current graph."""
    inputs = tf1.placeholder(tf.float64, [None, None, F], name="inputs")
    targets = tf1.placeholder(tf.int64, [None], name="targets")
    with tf1.variable_scope(tf1.get_variable_scope(), custom_getter=_float64_getter):
        logits = rnn_classifier(inputs, CLASSES, cell, bidirectional)
    variables = {v.op.name: v for v in tf1.trainable_variables()}
    assert all(v.dtype.base_dtype == tf.float64 for v in variables.values())
    return RNNGraphModel(inputs, targets, None, logits, variables, cell, bidirectional)


def _close(got, expected, what, rtol=RTOL):
    """Equal within rtol of the largest entry of each expected tensor."""
    assert got.keys() == expected.keys(), what
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=rtol * np.abs(value).max(),
                                   err_msg=f"{what} {name}")


# -- the graph: variables and shapes -----------------------------------------------------------
@pytest.mark.parametrize("bidirectional", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_graph_variables_and_output_shape(cell, bidirectional):
    with tf.Graph().as_default() as graph:
        model = build_rnn(F, CLASSES, cell, bidirectional)
        initialize = tf1.global_variables_initializer()
        assert tf1.global_variables()[0].op.name == "global_step"  # not a model weight
    gates, directions = config.RNN_GATES[cell], ("forward", "backward")[:1 + bidirectional]
    bias = (2, gates * H) if cell == "gru" else (gates * H,)  # GRU: rows (input, recurrent)
    expected = [(f"rnn/layer0/{d}/{name}", shape) for d in directions for name, shape in
                (("kernel", (F, gates * H)), ("recurrent_kernel", (H, gates * H)), ("bias", bias))]
    expected += [("fc/kernel", (H * len(directions), CLASSES)), ("fc/bias", (CLASSES,))]
    assert [(n, tuple(v.shape.as_list())) for n, v in model.variables.items()] == expected
    assert all(v.trainable for v in model.variables.values())
    assert model.inputs.shape.as_list() == [None, None, F]  # any number of steps
    hidden = graph.get_operation_by_name("fc/MatMul").inputs[0]  # the final hidden state
    with tf1.Session(graph=graph) as sess:
        sess.run(initialize)
        for steps in (T, 2):
            x = np.zeros((N, steps, F), np.float32)
            logits, h = sess.run([model.outputs, hidden], train.feed(model, x))
            assert logits.shape == (N, CLASSES) and h.shape == (N, H * len(directions))
        exported = export_weights(sess, model)
    assert {k: v.shape for k, v in exported.items()} == \
        config.rnn_parameter_shapes(F, CLASSES, cell, bidirectional)
    assert list(exported) == list(config.rnn_parameter_shapes(F, CLASSES, cell, bidirectional))
    assert all(v.dtype == np.float32 for v in exported.values())


def test_initial_weights_are_torch_scale_and_seeded():
    """The variable scope's initializer: every recurrent weight in U(-1/sqrt(H), 1/sqrt(H)),
    torch's default; the graph seed fixes them, another seed changes them."""
    def initial(seed):
        with tf.Graph().as_default() as graph:
            tf1.set_random_seed(seed)
            model = build_rnn(F, CLASSES, "lstm")
            initialize = tf1.global_variables_initializer()
        with tf1.Session(graph=graph) as sess:
            sess.run(initialize)
            return sess.run(model.variables)
    first, again, other = initial(0), initial(0), initial(1)
    for name, value in first.items():
        np.testing.assert_array_equal(value, again[name], err_msg=name)
        assert not np.array_equal(value, other[name]) or not value.any(), name
        if name.startswith("rnn/"):
            assert np.abs(value).max() <= 1 / np.sqrt(H) and np.abs(value).max() > 0.9 / np.sqrt(H)
    assert not first["fc/bias"].any()  # fc starts like models.dense: zero bias


# -- parity with the torch reference from the same weights -----------------------------------
@pytest.mark.parametrize("bidirectional", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_forward_and_gradients_match_torch(cell, bidirectional):
    """Logits, d(loss)/d(inputs) and d(cross-entropy)/d(every weight). The gradients are taken
    to the shared format by writing them into the variables and exporting (torch's float32
initial weights are exact in float64, so both sides start equal). TF1's one LSTM
    bias stands for torch's bias_ih + bias_hh: its gradient is that of either addend."""
    reference = _torch_model(cell, bidirectional)
    tensors = torch_rnn.export_weights(reference)
    x, y = _data()
    x_torch = torch.from_numpy(x).requires_grad_(True)
    logits = reference(x_torch)
    torch_train.make_loss("classification")(logits, torch.from_numpy(y)).backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for name in _lstm_bias_hh(cell, expected):
        np.testing.assert_allclose(expected.pop(name), expected[name.replace("_hh", "_ih")],
                                   rtol=1e-12)  # torch sums them in two orders
    with tf.Graph().as_default() as graph:
        model = _float64_model(cell, bidirectional)
        loss = train.make_loss("classification", model)
        names = list(model.variables)
        grads = tf1.gradients(loss, [model.inputs] + [model.variables[n] for n in names])
    with tf1.Session(graph=graph) as sess:
        import_weights(sess, model, tensors)
        got_logits, (dx, *dw) = sess.run([model.outputs, grads], train.feed(model, x, y))
        sess.run([v.initializer for v in model.variables.values()],
                 {model.variables[n].initial_value: g for n, g in zip(names, dw)})
        got = export_weights(sess, model)
    _close({"logits": got_logits}, {"logits": logits.detach().numpy()}, "", RTOL64)
    _close({"d/dx": dx}, {"d/dx": x_torch.grad.numpy()}, "", RTOL64)
    for name in _lstm_bias_hh(cell, got):
        assert not got.pop(name).any(), name
    _close(got, expected, "gradient of")


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_five_adam_steps_match_torch(cell):
    """Five steps of tf1_compat.train's make_optimizer and make_train_step (lr 1e-2) fed one
    batch each, compared as weights with the LSTM's two torch biases summed. Adam normalises
    each parameter's step, so torch moves an LSTM's bias_ih + bias_hh by two steps where TF1
    moves its one bias by one: they train alike only with torch's bias_hh frozen. Within 1e-5
    of the largest entry, not 1e-6: TF1's AdamOptimizer holds lr, the betas and eps as float32
    tensors and the beta powers as float32 variables, cast to float64 for a float64 variable
    (beta2's rounding alone changes 1 - beta2^t by about 1e-5 relative)."""
    tensors = torch_rnn.export_weights(_torch_model(cell, False))
    batches = [_data(seed) for seed in range(1, 6)]
    with tf.Graph().as_default() as graph:
        model = _float64_model(cell, False)
        train_step = train.make_train_step(train.make_optimizer(1e-2),
                                           train.make_loss("classification", model))
        initialize = tf1.global_variables_initializer()
    with tf1.Session(graph=graph) as sess:
        sess.run(initialize)
        import_weights(sess, model, tensors)
        for x, y in batches:
            sess.run(train_step, train.feed(model, x, y))
        assert sess.run(tf1.train.get_global_step(graph)) == 5
        got = _sum_lstm_biases(cell, export_weights(sess, model))
    expected = {frozen: _torch_adam(cell, tensors, batches, frozen) for frozen in (False, True)}
    _close(got, expected[cell == "lstm"], "Adam", rtol=1e-5)
    bias = "rnn.bias_ih_l0"  # the weights moved, and torch's free LSTM bias_hh went elsewhere
    assert np.abs(got[bias] - _sum_lstm_biases(cell, tensors)[bias]).max() > 1e-2
    assert cell == "gru" or np.abs(expected[False][bias] - got[bias]).max() > 1e-2


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_torch_tf1_torch_round_trip_keeps_the_function(cell):
    """Imported into two graphs of other initial weights, torch's weights give the same
    logits as torch; exported, the GRU comes back unchanged and the LSTM with its two
    biases summed into bias_ih and bias_hh zero, computing the same logits in torch."""
    reference = _torch_model(cell, True).float()
    tensors = torch_rnn.export_weights(reference)
    x = _data()[0].astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    for seed in (0, 1):
        with tf.Graph().as_default() as graph:
            tf1.set_random_seed(seed)
            model = build_rnn(F, CLASSES, cell, True)
            initialize = tf1.global_variables_initializer()
        with tf1.Session(graph=graph) as sess:
            sess.run(initialize)
            import_weights(sess, model, tensors)
            logits = train.predict(sess, model, x)
            back = export_weights(sess, model)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        assert back.keys() == tensors.keys()
        assert not any(back[name].any() for name in _lstm_bias_hh(cell, back))  # LSTM: zeros
        _close(_sum_lstm_biases(cell, back), _sum_lstm_biases(cell, tensors), "round trip", rtol=0)
    twin = torch_rnn.build_rnn(F, CLASSES, cell, True)
    torch_rnn.import_weights(twin, back)
    with torch.no_grad():
        np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), expected, rtol=0, atol=1e-6)


# -- the entry point ---------------------------------------------------------------------------
def test_entry_point_trains_and_writes_its_outputs(spawn, tmp_path):
    """One process, as a user starts it (``disable_v2_behavior``): 2 epochs on digits."""
    out = tmp_path / "out"
    with open(tmp_path / "log", "w") as log:
        argv = ["--cell", "gru", "--bidirectional", "--epochs", "2", "--out", str(out)]
        assert spawn("tf1_compat.run_rnn", argv, log).wait(timeout=300) == 0, \
            (tmp_path / "log").read_text()[-2000:]
    result = metrics(out)
    assert (result["entry_point"], result["implementation"], result["variant"]) == \
        ("tf1_compat.run_rnn", "tf1_compat", "plain")
    assert (result["cell"], result["bidirectional"]) == ("gru", True)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["test"]["accuracy"] > 0.3  # 10 classes: learning has begun
    tensors, meta = read_weights(out / "weights.safetensors")
    assert (meta["cell"], meta["implementation"]) == ("gru", "tf1_compat")
    assert {k: v.shape for k, v in tensors.items()} == config.rnn_parameter_shapes(8, 10, "gru", True)
    n_test = len(load_dataset("digits", "sequence").x_test)
    assert len((out / "predictions.csv").read_text().splitlines()) == n_test + 1


def test_fast_runs_the_plain_graph_and_says_so(tmp_path):
    assert call("tf1_compat.run_rnn", ["--fast", "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert metrics(tmp_path)["variant"] == "fast"
    assert "plain graph" in metrics(tmp_path)["fast_note"]


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_torch_trained_weights_predict_the_same(cell, tmp_path):
    """A file trained by torch_impl.run_rnn evaluates with --eval-only --weights to the same
    class for every test sample, confidences within 1e-4."""
    source = tmp_path / "torch"
    assert call("torch_impl.run_rnn", ["--cell", cell, "--epochs", "2", "--out", str(source)]) == 0
    out = tmp_path / "tf1"
    assert call("tf1_compat.run_rnn", ["--cell", cell, "--eval-only", "--weights",
                                       str(source / "weights.safetensors"), "--out", str(out)]) == 0
    got, expected = _predictions(out), _predictions(source)
    np.testing.assert_array_equal(got[:, 1], expected[:, 1])
    np.testing.assert_allclose(got[:, 0], expected[:, 0], rtol=0, atol=1e-4)
    assert metrics(out)["epochs"] == [] and metrics(out)["best_epoch"] == 0
