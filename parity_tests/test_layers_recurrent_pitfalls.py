"""Recurrent-layer pitfalls, one named test each: the wrong conversion or call runs without
an error but gives different numbers (max |diff| above 0.05), the right one, through
``common.converters.recurrent``, agrees. float64 (tolerance 1e-9 relative to the largest
entry), except where TF1's ``BlockLSTM`` op allows only float32 (1e-5 relative). Then the
configurations the converters refuse rather than convert into a different model.
"""
import numpy as np
import pytest
import torch
import tensorflow as tf
import keras

from common.converters import recurrent as conv
from common.converters.base import ConversionError, lookup
from parity_tests.test_layers_recurrent import (B, H, I, RNG, T, assert_close, keras_twin,
                                                make_torch, max_diff, run_keras, to_batch_major,
                                                torch_config, torch_parts)
from tf1_compat.layers import recurrent as tf1_rnn

tf1 = tf.compat.v1
WRONG = 0.05  # every wrong way below differs by more than this


def torch_forward(module, x):
    """Batch-major x -> torch's batch-major outputs and (h_n, ...), as numpy."""
    with torch.no_grad():
        out, final = module(torch.from_numpy(to_batch_major(x, module.batch_first)))
    final = final if isinstance(final, tuple) else (final,)
    return to_batch_major(out.numpy(), module.batch_first), [s.numpy() for s in final]


def check_wrong_and_right(module, wrong, **wrong_kw):
    """The converted Keras twin agrees with torch; a twin (built with `wrong_kw`) whose one
    layer holds the `wrong` weights runs as well, with the same shapes, and differs."""
    x = RNG.normal(size=(B, T, I))
    expected, right = torch_forward(module, x)[0], run_keras(keras_twin(module), x)[0].numpy()
    layers = keras_twin(module, convert=False, **wrong_kw)
    layers[0].set_weights(wrong)
    wrong = run_keras(layers, x)[0].numpy()
    assert right.shape == wrong.shape == expected.shape  # the shapes cannot tell
    assert max_diff(wrong, expected) > WRONG
    assert_close(right, expected, "converted Keras outputs")


def blocks(a, order):
    """Gate blocks of the last axis in a new order."""
    parts = np.split(a, len(order), axis=-1)
    return np.concatenate([parts[i] for i in order], axis=-1)


def single(kind, **kw):
    """A one-layer torch module and its one part's tensors."""
    module = make_torch(kind, **kw)
    return module, next(iter(torch_parts(module).values()))


# -- LSTM --------------------------------------------------------------------------------------
def test_pitfall_lstm_dropped_b_hh():
    """torch's LSTM adds two biases, Keras has one: loading bias_ih alone drops bias_hh."""
    module, t = single("LSTM")
    check_wrong_and_right(module, [t["weight_ih"].T, t["weight_hh"].T, t["bias_ih"]])


def test_pitfall_lstm_gate_order_needs_no_reorder_for_keras():
    """torch (i, f, g, o) and Keras (i, f, c, o) share the gate order: reordering to TF1's
    i, g, f, o on the way to Keras, as TF1 code would need, breaks it."""
    module, t = single("LSTM")
    check_wrong_and_right(module, [blocks(a, [0, 2, 1, 3]) for a in (
        t["weight_ih"].T, t["weight_hh"].T, t["bias_ih"] + t["bias_hh"])])


def test_pitfall_lstm_tf1_checkpoint_gate_order_and_forget_bias():
    """TF1's LSTMCell/BlockLSTM keep one (I+H, 4H) kernel with gates i, j, f, o and add
    forget_bias=1.0 at run time; this project's TF1 cell (Keras layout) needs the gates
    reordered and the constant folded into the bias. Reference: the real BlockLSTM op,
    float32 only, so tolerance 1e-5 relative."""
    kernel = RNG.uniform(-0.5, 0.5, (I + H, 4 * H)).astype(np.float32)
    bias = RNG.uniform(-0.5, 0.5, 4 * H).astype(np.float32)
    x = RNG.normal(size=(T, B, I)).astype(np.float32)
    fold = np.repeat(np.eye(4, dtype=np.float32)[2], H)  # forget_bias on the f of i, j, f, o
    candidates = {"right": conv.lstm_tf1_checkpoint_to_keras(kernel, bias, I),
                  "no_reorder": [kernel[:I], kernel[I:], bias + fold],
                  "no_forget_bias": conv.lstm_tf1_checkpoint_to_keras(kernel, bias, I,
                                                                      forget_bias=0.0)}
    with tf.Graph().as_default():
        zeros = tf.zeros((B, H))
        reference = tf.raw_ops.BlockLSTM(
            seq_len_max=tf.constant(T, tf.int64), x=x, cs_prev=zeros, h_prev=zeros, w=kernel,
            wci=tf.zeros(H), wcf=tf.zeros(H), wco=tf.zeros(H), b=bias, forget_bias=1.0,
            cell_clip=-1.0, use_peephole=False).h
        outputs = {name: tf1_rnn.rnn(tf.constant(x), "lstm", H, name, batch_first=False)[0]
                   for name in candidates}
        by_name = {v.op.name: v for v in tf1.global_variables()}
        with tf1.Session() as sess:
            sess.run([by_name[f"{tf1_rnn.scope_name(name, 0, 'forward')}/{var}"].assign(value)
                      for name, weights in candidates.items()
                      for var, value in zip(conv.LSTM.keras_names, weights)])
            reference, outputs = sess.run((reference, outputs))
    assert max_diff(outputs["no_reorder"], reference) > WRONG
    assert max_diff(outputs["no_forget_bias"], reference) > WRONG
    assert_close(outputs["right"], reference, "TF1 scan LSTM vs BlockLSTM", rtol=1e-5)
    back = conv.lstm_keras_to_tf1_checkpoint(candidates["right"])
    np.testing.assert_allclose(back[0], kernel, rtol=0, atol=0)
    np.testing.assert_allclose(back[1], bias, rtol=0, atol=1e-7)  # +1 then -1 in float32


# -- GRU ---------------------------------------------------------------------------------------
def test_pitfall_gru_gate_order_r_z_swapped():
    """torch's GRU gates are r, z, n, Keras's z, r, h: a plain transpose swaps reset and update."""
    module, t = single("GRU")
    check_wrong_and_right(module, [t["weight_ih"].T, t["weight_hh"].T,
                                   np.stack([t["bias_ih"], t["bias_hh"]])])


def test_pitfall_gru_summed_biases():
    """Keras reset_after=True keeps both biases as rows (input, recurrent) of a (2, 3H) bias:
    the recurrent n-bias sits inside r * (h U + b_hn), so summing the biases (the LSTM's
    rule) into the input row changes the function."""
    module, t = single("GRU")
    kernels = conv.gru_to_keras(t, torch_config(module), keras_twin(module)[0].get_config())[:2]
    summed = blocks(t["bias_ih"] + t["bias_hh"], [1, 0, 2])
    check_wrong_and_right(module, kernels + [np.stack([summed, np.zeros_like(summed)])])


def test_pitfall_gru_reset_after_false():
    """Keras GRU(reset_after=False) resets h before the recurrent matmul: no weights make it
    torch's GRU. The converter refuses it; the closest loading (summed bias) differs."""
    module, t = single("GRU")
    with pytest.raises(ConversionError, match="reset_after=True"):
        keras_twin(module, reset_after=False)
    check_wrong_and_right(module, [blocks(a, [1, 0, 2]) for a in (
        t["weight_ih"].T, t["weight_hh"].T, t["bias_ih"] + t["bias_hh"])], reset_after=False)


# -- layout and outputs ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_pitfall_rnn_batch_first_default(kind):
    """Documents torch behaviour: nn.LSTM/GRU default to batch_first=False and run a (B, T, F)
    batch silently as T=B steps of a batch of T, with an output of the expected shape.
    Paired with the converter: the converted Keras twin agrees once the input is time-major."""
    module, _ = single(kind, batch_first=False)
    x = RNG.normal(size=(B, T, I))
    keras_out = run_keras(keras_twin(module), x)[0].numpy()
    with torch.no_grad():
        silent = module(torch.from_numpy(x))[0].numpy()
    assert silent.shape == keras_out.shape == (B, T, H)
    assert max_diff(silent, keras_out) > WRONG
    assert_close(torch_forward(module, x)[0], keras_out, "time-major torch vs Keras")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_pitfall_rnn_bidirectional_last_step(kind):
    """A bidirectional torch RNN's output[:, -1] holds the backward direction's FIRST step;
    Keras's Bidirectional(return_sequences=False) gives (forward's last, backward's last),
    which is torch's cat(h_n[-2], h_n[-1])."""
    module, _ = single(kind, bidirectional=True)
    x = RNG.normal(size=(B, T, I))
    out, final = torch_forward(module, x)
    keras_last = run_keras(keras_twin(module, return_sequences=False), x)[0].numpy()
    assert max_diff(out[:, -1], keras_last) > WRONG
    assert_close(np.concatenate([final[0][-2], final[0][-1]], axis=-1), keras_last,
                 "torch h_n vs Keras last output")


# -- refused configurations --------------------------------------------------------------------
REFUSED = {
    "gru_reset_after_false": ("GRU", {}, {"reset_after": False}, "reset_after=True"),
    "lstm_torch_bias_only": ("LSTM", {}, {"use_bias": False}, "use_bias"),
    "gru_keras_bias_only": ("GRU", {"bias": False}, {"use_bias": True}, "use_bias"),
    "lstm_proj_size": ("LSTM", {"proj_size": 2}, {}, "proj_size=0"),
    "lstm_given_a_gru": ("LSTM", {"mode": "GRU"}, {}, "lookup"),
    "lstm_hidden_size": ("LSTM", {}, {"units": H + 1}, "units=hidden_size"),
    "gru_activation": ("GRU", {}, {"activation": "relu"}, "Keras's defaults"),
    "lstm_recurrent_activation": ("LSTM", {}, {"recurrent_activation": "hard_sigmoid"},
                                  "defaults"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_lstm_gru_refused_configurations(case):
    """No silently different model: each mismatch raises one sentence that names the fix,
    in both directions."""
    kind, torch_kw, keras_kw, fix = REFUSED[case]
    module = make_torch(kind, bias=torch_kw.get("bias", True))
    config = {**torch_config(module), **torch_kw}
    keras_config = {**getattr(keras.layers, kind)(H).get_config(), **keras_kw}
    (tensors,) = torch_parts(module).values()
    weights = lookup(kind).to_keras(tensors, torch_config(module),
                                    keras_twin(module)[0].get_config())
    for convert, args in ((lookup(kind).to_keras, tensors), (lookup(kind).to_torch, weights)):
        with pytest.raises(ConversionError, match=fix) as info:
            convert(args, config, keras_config)
        assert str(info.value).count(". ") == 0


def test_lstm_refuses_a_whole_state_dict_and_wrong_shapes():
    """Suffixed names point to split_rnn_state_dict; a GRU's tensors are not an LSTM's."""
    module = make_torch("LSTM", 2)
    keras_config = keras.layers.LSTM(H).get_config()
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    with pytest.raises(ConversionError, match="split_rnn_state_dict"):
        conv.lstm_to_keras(state, torch_config(module), keras_config)
    (gru_tensors,) = torch_parts(make_torch("GRU")).values()
    with pytest.raises(ConversionError, match="weight_ih has shape"):
        conv.lstm_to_keras(gru_tensors, torch_config(module), keras_config)
