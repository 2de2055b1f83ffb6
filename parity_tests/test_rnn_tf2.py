"""tf2_impl's recurrent classifier: ``rnn_models`` in the three Keras APIs (layers, variables and
shapes per cell, one and two directions, a stack), the same function as the torch reference
``torch_impl/rnn_models.py`` from the same weights (forward, gradients, 5 Adam steps), the
weights round trip, and the two entry points ``run_rnn`` / ``run_rnn_keras``.

Parity runs in float64 (Keras's dtype policy and torch's ``.double()``); the numbers are compared
in the shared format, which ``export_weights`` writes in float32, so the tolerance is float32
rounding: 1e-6 of the largest entry (float32's relative step is 6e-8). Small tensors, in this
process; one subprocess per entry point.
"""
import json

import numpy as np
import pytest
import torch
import keras
import tensorflow as tf

from common import config
from common.datasets import load_dataset
from common.errors import WeightsError
from common.weights import read_weights
from parity_tests.conftest import call, expect_exit, metrics
from tf2_impl import train
from tf2_impl.models import APIS
from tf2_impl.rnn_models import build_rnn, export_weights, import_weights
from torch_impl import rnn_models as torch_rnn
from torch_impl import train as torch_train

F, T, N, CLASSES = 5, 7, 6, 4  # all different, so a misread axis cannot fit
H = config.RNN_HIDDEN
DIRECTIONS = [False, True]
RTOL = 1e-6


@pytest.fixture
def float64():
    """Keras layers built in this test hold and compute float64 (the dtype policy, read at
    each layer's creation); the process's policy is restored afterwards."""
    policy, floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def _data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, T, F)), rng.integers(0, CLASSES, n)


def _torch_model(cell, bidirectional, seed=0):
    """The torch reference in float64, with its own (seeded) initial weights."""
    torch.manual_seed(seed)
    return torch_rnn.build_rnn(F, CLASSES, cell, bidirectional).double()


def _keras_model(cell, bidirectional, api, tensors):
    model = build_rnn(F, CLASSES, cell, bidirectional, api)
    return import_weights(model, tensors)


def _lstm_bias_hh(cell, tensors):
    """The names of an LSTM's bias_hh tensors (of every layer and direction)."""
    return [name for name in tensors if cell == "lstm" and "bias_hh" in name]


def _sum_lstm_biases(cell, tensors):
    """`tensors` with each LSTM bias_hh added into its bias_ih: the one sum the function uses."""
    tensors = dict(tensors)
    for name in _lstm_bias_hh(cell, tensors):
        ih = name.replace("_hh", "_ih")
        tensors[ih] = tensors[ih] + tensors.pop(name)
    return tensors


def _assert_close(got, expected, what):
    """Equal within RTOL of the largest entry of each expected tensor."""
    assert got.keys() == expected.keys(), what
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=RTOL * np.abs(value).max(),
                                   err_msg=f"{what} {name}")


# -- the model: stock layers, variables, shapes -----------------------------------------------
@pytest.mark.parametrize("bidirectional", DIRECTIONS, ids=["one-way", "bidirectional"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_model_layers_variables_and_output_shape(cell, api, bidirectional):
    model = build_rnn(F, CLASSES, cell, bidirectional, api)
    assert [layer.name for layer in model.layers if layer.name != "sequences"] == ["rnn", "fc"]
    rnn, directions = model.get_layer("rnn"), 2 if bidirectional else 1
    halves = [rnn.forward_layer, rnn.backward_layer] if bidirectional else [rnn]
    assert isinstance(rnn, keras.layers.Bidirectional) == bidirectional
    gates = config.RNN_GATES[cell]
    for half in halves:
        assert type(half) is {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[cell]
        assert (half.units, half.return_sequences) == (H, False)
        assert cell == "lstm" or half.reset_after  # torch's GRU
    bias = (2, gates * H) if cell == "gru" else (gates * H,)  # GRU: rows (input, recurrent)
    expected = [((F, gates * H), (H, gates * H), bias)[i % 3] for i in range(3 * directions)]
    assert [tuple(w.shape) for w in rnn.weights] == expected  # Keras layouts: (in, gates*H)
    assert [tuple(w.shape) for w in model.get_layer("fc").weights] == [(H * directions, CLASSES),
                                                                       (CLASSES,)]
    x = np.zeros((N, T, F), np.float32)
    assert tuple(rnn(x).shape) == (N, H * directions)  # the final hidden state
    assert tuple(model(x).shape) == (N, CLASSES)
    exported = export_weights(model)
    assert {k: v.shape for k, v in exported.items()} == \
        config.rnn_parameter_shapes(F, CLASSES, cell, bidirectional)
    assert all(v.dtype == np.float32 for v in exported.values())


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_stacked_layers_return_sequences_but_the_last_and_match_torch(cell, monkeypatch, float64):
    """RNN_LAYERS > 1: ``rnn`` is a Sequential of one (Bidirectional) layer per torch layer."""
    monkeypatch.setattr(config, "RNN_LAYERS", 2)
    reference = _torch_model(cell, True)
    tensors = torch_rnn.export_weights(reference)
    assert "rnn.weight_ih_l1_reverse" in tensors
    x, _ = _data()
    with torch.no_grad():
        expected = {"logits": reference(torch.from_numpy(x)).numpy()}
    for api in APIS:
        model = _keras_model(cell, True, api, tensors)
        stack = model.get_layer("rnn").layers
        assert [(layer.name, layer.forward_layer.return_sequences) for layer in stack] == \
            [("l0", True), ("l1", False)]
        _assert_close({"logits": model(x).numpy()}, expected, api)
        assert export_weights(model).keys() == tensors.keys()


# -- parity with the torch reference from the same weights -----------------------------------
@pytest.mark.parametrize("bidirectional", DIRECTIONS, ids=["one-way", "bidirectional"])
@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_forward_and_gradients_match_torch(cell, bidirectional, float64):
    """Logits and d(cross-entropy)/d(every weight), every API. The gradients are taken to the
    shared format by writing them into a twin model's variables and exporting it. Keras's one
    LSTM bias stands for torch's bias_ih + bias_hh: its gradient is that of either addend."""
    reference = _torch_model(cell, bidirectional)
    tensors = torch_rnn.export_weights(reference)
    x, y = _data()
    logits = reference(torch.from_numpy(x))
    torch_train.make_loss("classification")(logits, torch.from_numpy(y)).backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for name in _lstm_bias_hh(cell, expected):
        np.testing.assert_allclose(expected.pop(name), expected[name.replace("_hh", "_ih")],
                                   rtol=1e-12)
    loss_fn = train.make_loss("classification")
    for api in APIS:
        model = _keras_model(cell, bidirectional, api, tensors)
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = loss_fn(y, outputs)
        _assert_close({"logits": outputs.numpy()}, {"logits": logits.detach().numpy()}, api)
        twin = _keras_model(cell, bidirectional, api, tensors)
        for variable, grad in zip(twin.trainable_variables,
                                  tape.gradient(loss, model.trainable_variables), strict=True):
            variable.assign(grad)
        grads = export_weights(twin)
        for name in _lstm_bias_hh(cell, grads):
            assert not grads.pop(name).any(), name
        _assert_close(grads, expected, f"{api} gradient of")


def _torch_adam(cell, tensors, batches, freeze_bias_hh):
    model = torch_rnn.build_rnn(F, CLASSES, cell).double()
    torch_rnn.import_weights(model, tensors)
    model.rnn.bias_hh_l0.requires_grad_(not freeze_bias_hh)
    loss_fn = torch_train.make_loss("classification")
    optimizer = torch_train.make_optimizer(model, 1e-2)
    for t, (x, y) in enumerate(batches, start=1):
        # Keras adds eps to sqrt(v) before the bias correction, torch after it
        # (test_pitfall_adam_eps_default_1e8_vs_1e7): this eps makes torch's update Keras's.
        optimizer.param_groups[0]["eps"] = config.ADAM_EPS / np.sqrt(1 - config.ADAM_BETA2 ** t)
        optimizer.zero_grad()
        loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    return _sum_lstm_biases(cell, {k: v.detach().numpy() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_five_adam_steps_match_torch(cell, float64, monkeypatch):
    """Five steps of each framework's make_optimizer and training step (lr 1e-2), compared as
    weights with the LSTM's two torch biases summed. Adam normalises each parameter's step, so
    torch moves an LSTM's bias_ih + bias_hh by two steps where Keras moves its one bias by one:
    the LSTM trains alike only with torch's bias_hh frozen (the GRU's biases act separately).
    The betas are float32 numbers here: Keras's Adam computes its bias corrections from the
    betas converted to float32 tensors first, which for 0.999 shifts a float64 step by 6e-6."""
    monkeypatch.setattr(config, "ADAM_BETA1", 0.875)
    monkeypatch.setattr(config, "ADAM_BETA2", 1 - 2 ** -10)
    reference = _torch_model(cell, False)
    tensors = torch_rnn.export_weights(reference)
    batches = [_data(seed) for seed in range(1, 6)]
    model = _keras_model(cell, False, "subclassing", tensors)
    step = train.make_train_step(model, train.make_loss("classification"),
                                 train.make_optimizer(model, 1e-2))
    for x, y in batches:
        step(tf.constant(x), tf.constant(y))
    got = _sum_lstm_biases(cell, export_weights(model))
    _assert_close(got, _torch_adam(cell, tensors, batches, freeze_bias_hh=cell == "lstm"), "Adam")
    start = _sum_lstm_biases(cell, tensors)
    assert np.abs(got["rnn.bias_ih_l0"] - start["rnn.bias_ih_l0"]).max() > 1e-2  # they moved
    if cell == "lstm":
        unfrozen = _torch_adam(cell, tensors, batches, freeze_bias_hh=False)
        assert np.abs(unfrozen["rnn.bias_ih_l0"] - got["rnn.bias_ih_l0"]).max() > 1e-2


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_torch_tf2_torch_round_trip_keeps_the_function(cell):
    """The GRU comes back unchanged; the LSTM comes back with its two biases summed into
    bias_ih and bias_hh zero, computing the same logits."""
    reference = _torch_model(cell, True).float()
    tensors = torch_rnn.export_weights(reference)
    back = export_weights(_keras_model(cell, True, "functional", tensors))
    assert back.keys() == tensors.keys()
    for name in _lstm_bias_hh(cell, back):
        assert not back[name].any(), name
    expected = _sum_lstm_biases(cell, tensors)
    for name, value in _sum_lstm_biases(cell, back).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    twin = torch_rnn.build_rnn(F, CLASSES, cell, True)
    torch_rnn.import_weights(twin, back)
    x = torch.from_numpy(_data()[0].astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(twin(x).numpy(), reference(x).numpy(), rtol=0, atol=1e-6)


def test_weights_that_do_not_fit_raise_one_sentence_and_assign_nothing():
    tensors = torch_rnn.export_weights(_torch_model("gru", False))
    with pytest.raises(WeightsError, match="weight_ih has shape"):  # 3 gates, the LSTM has 4
        import_weights(build_rnn(F, CLASSES, "lstm"), tensors)
    model = build_rnn(F, CLASSES, "gru")
    before = export_weights(model)
    narrow = {**tensors, "rnn.weight_ih_l0": tensors["rnn.weight_ih_l0"][:, 1:]}
    with pytest.raises(WeightsError, match="gru_cell/kernel has shape"):  # 4 features, not 5
        import_weights(model, narrow)
    wide = {**tensors, "fc.weight": np.zeros((CLASSES, H + 1), np.float32)}
    with pytest.raises(WeightsError, match="weight has shape"):
        import_weights(model, wide)
    for name, value in export_weights(model).items():  # the rnn's fitting tensors too
        np.testing.assert_array_equal(value, before[name], err_msg=name)


# -- the entry points --------------------------------------------------------------------------
@pytest.mark.parametrize("module,cell,flags", [
    ("tf2_impl.run_rnn", "lstm", ["--bidirectional"]),
    ("tf2_impl.run_rnn_keras", "gru", ["--fast"]),
])
def test_entry_point_trains_and_writes_its_outputs(module, cell, flags, spawn, tmp_path):
    """One process each, as a user starts it: 2 epochs on digits."""
    out = tmp_path / "out"
    with open(tmp_path / "log", "w") as log:
        process = spawn(module, ["--cell", cell, "--epochs", "2", "--out", str(out), *flags], log)
        assert process.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-2000:]
    result = metrics(out)
    default_api, loop = {"tf2_impl.run_rnn": ("subclassing", "tape"),
                         "tf2_impl.run_rnn_keras": ("functional", "fit")}[module]
    assert (result["entry_point"], result["cell"], result["api"], result["loop"]) == \
        (module, cell, default_api, loop)
    assert result["bidirectional"] == ("--bidirectional" in flags)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["test"]["accuracy"] > 0.3  # 10 classes: learning has begun
    _, meta = read_weights(out / "weights.safetensors")
    assert meta["cell"] == cell and meta["implementation"] == "tf2"
    n_test = len(load_dataset("digits", "sequence").x_test)
    assert len((out / "predictions.csv").read_text().splitlines()) == n_test + 1


def _predictions(out):
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    return np.array([[float(v) for v in row.split(",")[1:3]] for row in rows])


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_torch_trained_weights_predict_the_same_in_both_entry_points(cell, tmp_path, capsys):
    """A file trained by torch_impl.run_rnn evaluates with --eval-only --weights to the same
    class for every test sample, confidences within 1e-4, in each TF2 loop and API default
    (the tape one with --fast's traced evaluation); given to the other cell it is refused in
    one sentence."""
    source = tmp_path / "torch"
    assert call("torch_impl.run_rnn", ["--cell", cell, "--epochs", "2", "--out", str(source)]) == 0
    weights = str(source / "weights.safetensors")
    expected = _predictions(source)
    for module, flags in (("tf2_impl.run_rnn", ["--fast"]), ("tf2_impl.run_rnn_keras", [])):
        out = tmp_path / module
        assert call(module, ["--cell", cell, "--eval-only", "--weights", weights,
                             "--out", str(out), *flags]) == 0
        got = _predictions(out)
        np.testing.assert_array_equal(got[:, 1], expected[:, 1], err_msg=module)
        np.testing.assert_allclose(got[:, 0], expected[:, 0], rtol=0, atol=1e-4, err_msg=module)
        assert json.loads((out / "metrics.json").read_text())["epochs"] == []
    other = [c for c in config.RNN_CELLS if c != cell][0]
    expect_exit(capsys, "tf2_impl.run_rnn", ["--cell", other, "--eval-only", "--weights", weights,
                                             "--out", str(tmp_path / "other")], 2, f"--cell {cell}")
