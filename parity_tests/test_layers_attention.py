"""Multi-head attention and Embedding in three frameworks through ``common.converters`` (attention,
core): torch ``nn.MultiheadAttention``/``nn.Embedding``, Keras 3 ``MultiHeadAttention``/
``Embedding`` and this project's TF1 graphs (``tf1_compat/layers/attention.py``).

Parity: outputs, and gradients of sum(outputs * fixed random weights) w.r.t. the inputs and
every weight (Keras's and TF1's taken to torch's layout by ``to_torch``), all float64,
tolerance 1e-10 relative to the largest entry (``test_layers_norm.check_parity``). Masks go
through ``attention_mask_torch_to_keras``. Also the round trips and refused configurations;
the pitfalls are in test_layers_attention_pitfalls.py.
"""
import numpy as np
import pytest
import torch
import tensorflow as tf
import keras

from common.converters import attention as mha_conv
from common.converters.base import ConversionError, lookup
from parity_tests.test_layers_norm import (F64, SCOPE, check_parity, check_round_trip, floats,
                                           randomise, state, torch_config)
from tf1_compat.layers import attention as tf1_layers

E, HEADS, B, T, S = 8, 2, 2, 4, 5   # embed dim, heads, batch, query and key lengths
D = E // HEADS


def swap(a):
    """(T, B, E) <-> (B, T, E): torch's batch_first=False layout to Keras's."""
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def causal_and_padding():
    """torch masks for T queries over T keys: attn_mask True above the diagonal
    (blocked), key_padding_mask True on sample 0's last key (never a whole row)."""
    padding = np.zeros((B, T), bool)
    padding[0, -1] = True
    return np.triu(np.ones((T, T), bool), 1), padding


def make_mha(kdim=None, vdim=None, bias=True, batch_first=True, **keras_kw):
    module = randomise(torch.nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first,
                                                   kdim=kdim, vdim=vdim))
    return module, keras.layers.MultiHeadAttention(HEADS, D, use_bias=bias, **F64, **keras_kw)


def mha_calls(module, layer, keras_mask=None, torch_masks=(None, None), causal=False, bias=True):
    """The three calls on (query, key, value), masks included."""
    attn_mask, padding = torch_masks
    return dict(
        torch_call=lambda q, k, v: module(q, k, v, need_weights=False, attn_mask=(
            None if attn_mask is None else torch.tensor(attn_mask)), key_padding_mask=(
            None if padding is None else torch.tensor(padding)))[0],
        keras_call=lambda q, k, v: layer(q, v, key=k, attention_mask=keras_mask,
                                         use_causal_mask=causal),
        tf1_build=lambda q, k, v: tf1_layers.multi_head_attention(
            q, v, HEADS, D, SCOPE, key=k, attention_mask=keras_mask, use_causal_mask=causal,
            use_bias=bias))


MHA_CASES = {  # name: (make_mha kwargs, query length, key length, kdim, vdim)
    "equal_lengths-batch_first": ({}, T, T, E, E),
    "cross-time_major": ({"batch_first": False}, T, S, E, E),
    "cross-kdim_vdim-no_bias": ({"kdim": 6, "vdim": 3, "bias": False}, T, S, 6, 3),
}


@pytest.mark.parametrize("name", MHA_CASES)
def test_mha_parity_torch_keras_tf1(name):
    kwargs, t, s, kdim, vdim = MHA_CASES[name]
    module, layer = make_mha(**kwargs)
    inputs = [floats(B, t, E), floats(B, s, kdim), floats(B, s, vdim)]
    layout = {}
    if not kwargs.get("batch_first", True):
        inputs, layout = [swap(a) for a in inputs], {"to_keras": swap, "from_keras": swap}
    calls = mha_calls(module, layer, bias=kwargs.get("bias", True))
    check_parity(module, layer, inputs=inputs, **calls, **layout)


def test_mha_parity_key_padding_and_causal_masks():
    """torch attn_mask (causal, True = blocked) and key_padding_mask against Keras's
    use_causal_mask plus the converted padding mask (True = attend), and TF1 the same."""
    attn_mask, padding = causal_and_padding()
    module, layer = make_mha()
    keras_mask = mha_conv.attention_mask_torch_to_keras(B, HEADS, T, T, key_padding_mask=padding)
    calls = mha_calls(module, layer, keras_mask, (attn_mask, padding), causal=True)
    check_parity(module, layer, inputs=[floats(B, T, E) for _ in range(3)], **calls)


def test_mha_per_head_and_float_masks_convert():
    """A per-head (B*heads, T, S) attn_mask becomes Keras's (B, heads, T, S); a float mask of
    0/-inf equals the boolean one; keras_to_torch inverts; other float values are refused."""
    blocked = np.random.default_rng(3).random((B * HEADS, T, S)) < 0.3
    blocked[..., 0] = False   # every query keeps a key
    module, layer = make_mha()
    keras_mask = mha_conv.attention_mask_torch_to_keras(B, HEADS, T, S, attn_mask=blocked)
    assert keras_mask.shape == (B, HEADS, T, S)
    additive = np.where(blocked, -np.inf, 0.0)
    np.testing.assert_array_equal(
        mha_conv.attention_mask_torch_to_keras(B, HEADS, T, S, attn_mask=additive), keras_mask)
    np.testing.assert_array_equal(mha_conv.attention_mask_keras_to_torch(keras_mask, HEADS), blocked)
    calls = mha_calls(module, layer, keras_mask, (blocked, None))
    check_parity(module, layer, inputs=[floats(B, T, E), floats(B, S, E), floats(B, S, E)], **calls)
    with pytest.raises(ConversionError, match="0 and -inf"):
        mha_conv.attention_mask_torch_to_keras(B, HEADS, T, S, attn_mask=additive + 0.5)


def test_embedding_parity_torch_keras_tf1():
    """Rows copied: lookups agree and so do the weight gradients (repeated ids add up)."""
    module = randomise(torch.nn.Embedding(10, 4))
    layer = keras.layers.Embedding(10, 4, **F64)
    ids = np.array([[0, 3, 9, 3, 1], [2, 2, 7, 0, 5]])
    check_parity(module, layer, lambda x: tf1_layers.embedding(x, 10, 4, SCOPE, tf.float64), [ids])


ROUND_TRIPS = {
    "mha-packed": lambda: make_mha(),
    "mha-kdim_vdim": lambda: make_mha(kdim=6, vdim=3),
    "mha-no_bias": lambda: make_mha(bias=False),
    "embedding": lambda: (randomise(torch.nn.Embedding(10, 4, padding_idx=0)),
                          keras.layers.Embedding(10, 4, **F64)),
}


def _built(module, layer):
    """Build `layer` for `module`'s shapes."""
    if isinstance(layer, keras.layers.MultiHeadAttention):
        layer.build((B, T, E), (B, S, module.vdim), (B, S, module.kdim))
    else:
        layer.build((B, T))
    return layer


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_mha_and_embedding_round_trip_is_identity(name):
    module, layer = ROUND_TRIPS[name]()
    check_round_trip(module, _built(module, layer))


REFUSED = {
    "mha-add_bias_kv": (dict(add_bias_kv=True), {}, "add_bias_kv=False"),
    "mha-add_zero_attn": (dict(add_zero_attn=True), {}, "add_zero_attn=False"),
    "mha-bias": (dict(bias=False), dict(use_bias=True), "use_bias=False"),
    "mha-key_dim": ({}, dict(key_dim=2 * D), f"key_dim={D}"),
    "mha-value_dim": ({}, dict(value_dim=2 * D), f"value_dim={D}"),
    "mha-heads": ({}, dict(num_heads=4, key_dim=D), "num_heads=2"),
    "mha-dropout": (dict(dropout=0.1), {}, "dropout=0.1"),
    "mha-output_shape": ({}, dict(output_shape=4), "output_shape=None"),
    "mha-use_gate": ({}, dict(use_gate=True), "use_gate=False"),
    "embedding-max_norm": (dict(max_norm=1.0), {}, "max_norm=None"),
    "embedding-mask_zero": ({}, dict(mask_zero=True), "mask_zero=False"),
    "embedding-size": ({}, dict(output_dim=5), "output_dim=4"),
}


@pytest.mark.parametrize("direction", ["to_keras", "to_torch"])
@pytest.mark.parametrize("name", REFUSED)
def test_mha_and_embedding_conversion_refused(name, direction):
    """No exact Keras twin, or a Keras argument that differs: refused both ways, one
    sentence naming the fix. (Keras's mask_zero only attaches a mask for the layers
    downstream; the lookup itself is unchanged, so the refusal is about the model.)"""
    torch_kw, keras_kw, fix = REFUSED[name]
    if name.startswith("mha"):
        module = randomise(torch.nn.MultiheadAttention(E, HEADS, batch_first=True, **torch_kw))
        layer = keras.layers.MultiHeadAttention(**{"num_heads": HEADS, "key_dim": D, **keras_kw})
    else:
        module = randomise(torch.nn.Embedding(10, 4, **torch_kw))
        layer = keras.layers.Embedding(**{"input_dim": 10, "output_dim": 4, **keras_kw})
    layer = _built(module, layer)
    converter, t_config, k_config = lookup(type(module).__name__), torch_config(module), layer.get_config()
    with pytest.raises(ConversionError) as info:
        if direction == "to_keras":
            converter.to_keras(state(module), t_config, k_config)
        else:
            converter.to_torch(layer.get_weights(), t_config, k_config)
    assert fix in str(info.value) and str(info.value).count(". ") == 0, str(info.value)
