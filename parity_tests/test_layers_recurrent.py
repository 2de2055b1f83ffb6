"""Recurrent layers in three frameworks through ``common.converters.recurrent``: torch
``nn.LSTM``/``nn.GRU``, Keras ``LSTM``/``GRU`` (stacked, in ``Bidirectional``) and this
project's TF1 ``tf.scan`` cells, with the same weights and inputs.

Forward parity covers the output sequences and every final state (h, and c for the LSTM);
gradient parity covers a scalar loss (outputs and states times fixed random weights) with
respect to the inputs and every weight, Keras's and TF1's gradients taken to torch's layout
through ``to_torch``. All float64 (every op here allows it): tolerance 1e-9 relative to the
largest entry. Also the round trips and the state-dict split; the pitfalls and the refused
configurations are in test_layers_recurrent_pitfalls.py.
"""
import numpy as np
import pytest
import torch
import tensorflow as tf
import keras

from common.converters import recurrent as conv
from common.converters.base import ConversionError, lookup
from tf1_compat.layers import recurrent as tf1_rnn

tf1 = tf.compat.v1
B, T, I, H = 3, 5, 4, 6   # all different, so a transposed or misread axis cannot fit
RTOL = 1e-9
RNG = np.random.default_rng(17)
# (num_layers, bidirectional, batch_first): each value of each option at least twice
CASES = [(1, False, True), (1, True, False), (2, False, False), (2, True, True)]
CASE_IDS = ["1layer-batch_first", "1layer-bidirectional-time_major",
            "2layers-time_major", "2layers-bidirectional-batch_first"]


# -- building and loading ----------------------------------------------------------------------
def make_torch(kind, num_layers=1, bidirectional=False, batch_first=True, bias=True):
    """A torch nn.LSTM/GRU with weights in U(-0.5, 0.5): wider than torch's default init,
    so a wrongly converted weight shows clearly in the outputs."""
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(I, H, num_layers, bias=bias, batch_first=batch_first,
                                     bidirectional=bidirectional).double()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    return module


def torch_config(module):
    """The converter's torch_config: the module's public attributes."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def torch_parts(module):
    """{(layer, direction): {"weight_ih": ..., ...}} of a torch module's weights."""
    state = module.state_dict()
    return conv.split_rnn_state_dict({k: v.detach().numpy() for k, v in state.items()})


def keras_halves(layer):
    """{direction: Keras LSTM/GRU} of one layer of a stack (one or two directions)."""
    if isinstance(layer, keras.layers.Bidirectional):
        return {"forward": layer.forward_layer, "backward": layer.backward_layer}
    return {"forward": layer}


def keras_twin(module, convert=True, **kw):
    """The Keras stack that mirrors `module`, one (Bidirectional) LSTM/GRU per torch layer,
    returning sequences and states (unless `kw` says otherwise), its weights converted from
    the module's if `convert`. float64, as the torch module."""
    directions = 2 if module.bidirectional else 1
    kw = {"return_sequences": True, "return_state": True, "use_bias": module.bias, **kw}
    layers = []
    for layer in range(module.num_layers):
        rnn = getattr(keras.layers, module.mode)(module.hidden_size, dtype="float64", **kw)
        layers.append(keras.layers.Bidirectional(rnn, dtype="float64") if directions == 2 else rnn)
        layers[-1].build((None, T, I if layer == 0 else directions * module.hidden_size))
    for (layer, direction), tensors in (torch_parts(module) if convert else {}).items():
        half = keras_halves(layers[layer])[direction]
        half.set_weights(lookup(module.mode).to_keras(tensors, torch_config(module),
                                                       half.get_config()))
    return layers


def run_keras(layers, x):
    """Batch-major x through the stack -> (outputs, {(layer, direction): states})."""
    states = {}
    for layer, rnn in enumerate(layers):
        halves = keras_halves(rnn)
        x, *flat = rnn(x)
        n = len(flat) // len(halves)
        for d, direction in enumerate(halves):
            states[layer, direction] = tuple(flat[d * n:(d + 1) * n])
    return x, states


def to_batch_major(x, batch_first):
    """torch's (T, B, ...) time-major layout to (B, T, ...), or x unchanged."""
    return x if batch_first else x.transpose(1, 0, 2)


def state_keys(module):
    """(layer, direction) in torch's h_n order, the keys of ``split_rnn_state_dict``."""
    directions = conv.DIRECTIONS[:1 + module.bidirectional]
    return [(k, d) for k in range(module.num_layers) for d in directions]


def torch_states(module, final):
    """torch's h_n (and c_n), each (layers * directions, B, H) -> {(layer, direction): states}."""
    final = final if isinstance(final, tuple) else (final,)
    return {key: tuple(s[i] for s in final) for i, key in enumerate(state_keys(module))}


# -- the three runs ----------------------------------------------------------------------------
def loss_weights(module):
    """Fixed random weights for the scalar loss: outputs (B, T, H*D) and each state (B, H)."""
    n_states = 2 if module.mode == "LSTM" else 1
    return (RNG.normal(size=(B, T, H * (1 + module.bidirectional))),
            {key: tuple(RNG.normal(size=(B, H)) for _ in range(n_states))
             for key in state_keys(module)})


def loss(out, states, weights, reduce_sum, const):
    """sum(outputs * w) + sum over states of sum(state * w); `const` makes w a tensor."""
    w_out, w_states = weights
    return reduce_sum(out * const(w_out)) + sum(reduce_sum(s * const(w)) for key in states
                                                for s, w in zip(states[key], w_states[key]))


def grads_to_torch(mode, keras_grads, config, keras_config):
    """Keras-layout gradients in torch's layout: ``to_torch`` is linear, so it maps gradients
    as it maps weights, except the LSTM's one bias, which is torch's bias_ih + bias_hh: the
    gradient of that sum is the gradient with respect to either addend."""
    out = lookup(mode).to_torch(keras_grads, config, keras_config)
    if mode == "LSTM" and "bias_ih" in out:
        out["bias_hh"] = out["bias_ih"]
    return out


def run_torch(module, x, weights):
    """x batch-major -> (outputs, states, d loss/dx, {part: torch grads}), batch-major."""
    xt = torch.tensor(to_batch_major(x, module.batch_first), requires_grad=True)
    out, final = module(xt)
    out = out if module.batch_first else out.transpose(0, 1)
    states = torch_states(module, final)
    loss(out, states, weights, torch.sum, torch.from_numpy).backward()
    grads = conv.split_rnn_state_dict({n: p.grad.numpy() for n, p in module.named_parameters()})
    states = {k: tuple(s.detach().numpy() for s in v) for k, v in states.items()}
    return (out.detach().numpy(), states, to_batch_major(xt.grad.numpy(), module.batch_first),
            grads)


def run_keras_grads(module, x, weights):
    """The same four results from the Keras twin, gradients by GradientTape."""
    layers = keras_twin(module)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out, states = run_keras(layers, xt)
        value = loss(out, states, weights, tf.reduce_sum, tf.constant)
    halves = {(k, d): half for k, rnn in enumerate(layers) for d, half in keras_halves(rnn).items()}
    dx, grads = tape.gradient(value, (xt, {key: h.trainable_weights for key, h in halves.items()}))
    return (out.numpy(), {k: tuple(s.numpy() for s in v) for k, v in states.items()}, dx.numpy(),
            {key: grads_to_torch(module.mode, [g.numpy() for g in grads[key]], torch_config(module),
                                 halves[key].get_config()) for key in halves})


def run_tf1(module, x, weights):
    """The same four results from ``tf1_compat.layers.recurrent.rnn`` in torch's layout (both
    batch_first values), variables loaded by name, gradients by ``tf.gradients``. The TF1
    cells compute what a Keras layer with default activations does, so that layer's config
    is the converter's keras_config."""
    keras_config = getattr(keras.layers, module.mode)(H, use_bias=module.bias).get_config()
    converter = lookup(module.mode)
    with tf.Graph().as_default():
        xt = tf.constant(to_batch_major(x, module.batch_first))
        out, states = tf1_rnn.rnn(xt, module.mode.lower(), H, "rnn", module.num_layers,
                                  module.bidirectional, module.batch_first, module.bias)
        out = out if module.batch_first else tf.transpose(out, (1, 0, 2))
        by_name = {v.op.name: v for v in tf1.global_variables()}
        variables = {key: [by_name[f"{tf1_rnn.scope_name('rnn', *key)}/{n}"]
                           for n in converter.keras_names[:2 + module.bias]] for key in states}
        flat = tf1.gradients(loss(out, states, weights, tf.reduce_sum, tf.constant),
                             tf.nest.flatten([xt, variables]))
        grads = tf.nest.pack_sequence_as([xt, variables], flat)
        with tf1.Session() as sess:
            for key, tensors in torch_parts(module).items():
                values = converter.to_keras(tensors, torch_config(module), keras_config)
                sess.run([v.assign(w) for v, w in zip(variables[key], values)])
            out, states, (dx, grads) = sess.run((out, states, grads))
    return (out, states, to_batch_major(dx, module.batch_first),
            {key: grads_to_torch(module.mode, grads[key], torch_config(module), keras_config)
             for key in grads})


# -- comparisons -------------------------------------------------------------------------------
def assert_close(got, expected, what, rtol=RTOL):
    """Equal within rtol times the largest entry of `expected`."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * np.abs(expected).max(),
                               err_msg=what)


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def assert_same_results(got, expected, label):
    out, states, dx, grads = got
    assert_close(out, expected[0], f"{label} outputs")
    assert states.keys() == expected[1].keys() and grads.keys() == expected[3].keys()
    for key in states:
        assert len(states[key]) == len(expected[1][key]), f"{label} states of {key}"
        for name, s, e in zip("hc", states[key], expected[1][key]):
            assert_close(s, e, f"{label} final {name} of {key}")
        for name in expected[3][key]:
            assert_close(grads[key][name], expected[3][key][name], f"{label} d/d{name} of {key}")
    assert_close(dx, expected[2], f"{label} d/dx")


def check_parity(kind, num_layers, bidirectional, batch_first, bias=True):
    """torch's results are the reference; Keras and TF1 get its weights via the converter."""
    module = make_torch(kind, num_layers, bidirectional, batch_first, bias)
    x, weights = RNG.normal(size=(B, T, I)), loss_weights(module)
    expected = run_torch(module, x, weights)
    assert_same_results(run_keras_grads(module, x, weights), expected, "Keras")
    assert_same_results(run_tf1(module, x, weights), expected, "TF1")


# -- parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", CASES, ids=CASE_IDS)
def test_lstm_parity_torch_keras_tf1(num_layers, bidirectional, batch_first):
    """nn.LSTM = Keras LSTM stack = TF1 scan LSTM: sequences, (h, c) and gradients."""
    check_parity("LSTM", num_layers, bidirectional, batch_first)


@pytest.mark.parametrize("num_layers,bidirectional,batch_first", CASES, ids=CASE_IDS)
def test_gru_parity_torch_keras_tf1(num_layers, bidirectional, batch_first):
    """nn.GRU = Keras GRU(reset_after=True) stack = TF1 scan GRU: sequences, h, gradients."""
    check_parity("GRU", num_layers, bidirectional, batch_first)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_lstm_gru_parity_without_bias(kind):
    """bias=False in torch pairs with use_bias=False in Keras and TF1 (two weights)."""
    check_parity(kind, 1, True, False, bias=False)


# -- round trips and the split -----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_round_trip(bias):
    """Keras -> torch -> Keras is the identity; torch -> Keras -> torch keeps every weight and
    the bias sum, with the whole sum in bias_ih (Keras has one bias, so the split is lost)."""
    module = make_torch("LSTM", bias=bias)
    (tensors,), config = torch_parts(module).values(), torch_config(module)
    keras_config = keras_twin(module)[0].get_config()
    weights = conv.lstm_to_keras(tensors, config, keras_config)
    back = conv.lstm_to_torch(weights, config, keras_config)
    for name in ("weight_ih", "weight_hh"):
        np.testing.assert_array_equal(back[name], tensors[name])
    if bias:
        np.testing.assert_array_equal(back["bias_ih"] + back["bias_hh"],
                                      tensors["bias_ih"] + tensors["bias_hh"])
        assert not back["bias_hh"].any()
    for a, b in zip(conv.lstm_to_keras(back, config, keras_config), weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_gru_round_trip(bias):
    """torch -> Keras -> torch and Keras -> torch -> Keras are both the identity for the GRU."""
    module = make_torch("GRU", bias=bias)
    (tensors,), config = torch_parts(module).values(), torch_config(module)
    keras_config = keras_twin(module)[0].get_config()
    weights = conv.gru_to_keras(tensors, config, keras_config)
    back = conv.gru_to_torch(weights, config, keras_config)
    assert back.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name])
    for a, b in zip(conv.gru_to_keras(back, config, keras_config), weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_lstm_gru_split_join_state_dict():
    """A 2-layer bidirectional state dict splits into 4 parts, in stacking order, and joins
    back unchanged; a projection weight (proj_size > 0) is refused by name."""
    state = {k: v.detach().numpy() for k, v in make_torch("LSTM", 2, True).state_dict().items()}
    parts = conv.split_rnn_state_dict(state)
    assert list(parts) == [(0, "forward"), (0, "backward"), (1, "forward"), (1, "backward")]
    assert parts[1, "backward"]["weight_ih"] is state["weight_ih_l1_reverse"]
    joined = conv.join_rnn_state_dict(parts)
    assert joined.keys() == state.keys() and all(joined[k] is state[k] for k in state)
    with pytest.raises(ConversionError, match="proj_size"):
        conv.split_rnn_state_dict({"weight_hr_l0": np.zeros((2, H))})


def test_lstm_gru_registered_by_name():
    """The registry finds both converters under torch's and Keras's class names."""
    assert lookup("LSTM") is conv.LSTM and lookup("GRU") is conv.GRU
    assert conv.LSTM.keras_names == conv.GRU.keras_names == ("kernel", "recurrent_kernel", "bias")
