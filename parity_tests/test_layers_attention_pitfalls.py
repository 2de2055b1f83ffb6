"""Pitfalls of multi-head attention and Embedding between torch and Keras 3 (split from
test_layers_attention.py, whose helpers it uses): the wrong way differs by more than a stated
amount, the right way (this project's converters) agrees. Float32 as users run it,
tolerance 1e-5 absolute on outputs of order 1, unless a docstring says otherwise.
"""
import numpy as np
import pytest
import torch
import tensorflow as tf
import keras

from common.converters import attention as mha_conv
from common.converters.base import lookup
from parity_tests.test_layers_attention import B, D, E, HEADS, T, causal_and_padding, swap
from parity_tests.test_layers_norm import (F64, SCOPE, close, differs, floats, randomise,
                                           run_keras, run_tf1, run_torch, state, torch_config)
from tf1_compat.layers import attention as tf1_layers

ATOL = 1e-5


def converted_pair(batch_first=True):
    """A float32 torch MultiheadAttention and a Keras twin loaded through the converter."""
    module = randomise(torch.nn.MultiheadAttention(E, HEADS, batch_first=batch_first)).float()
    layer = keras.layers.MultiHeadAttention(HEADS, D)
    layer.build((B, T, E), (B, T, E))
    layer.set_weights(lookup("MultiheadAttention").to_keras(state(module), torch_config(module),
                                                           layer.get_config()))
    return module, layer


def torch_attention(module, x, **masks):
    with torch.no_grad():
        return module(*(torch.tensor(x),) * 3, need_weights=False,
                      **{k: torch.tensor(v) for k, v in masks.items()})[0].numpy()


@pytest.mark.parametrize("mask", ["causal", "key_padding"])
def test_pitfall_mha_bool_mask_inverted(mask):
    """nn.MultiheadAttention reads a boolean mask as True = BLOCKED, Keras's attention_mask as
    True = ATTEND: the same mask passed unchanged differs by more than 0.5 (1.70 measured in
    the research). attention_mask_torch_to_keras inverts and broadcasts it; Keras's
    use_causal_mask equals torch's triu(ones, 1)."""
    module, layer = converted_pair()
    x = floats(B, T, E).astype(np.float32)
    causal, padding = causal_and_padding()
    torch_mask = {"causal": {"attn_mask": causal}, "key_padding": {"key_padding_mask": padding}}[mask]
    expected = torch_attention(module, x, **torch_mask)
    unchanged = next(iter(torch_mask.values()))
    wrong = layer(x, x, attention_mask=np.broadcast_to(unchanged, (B, T, T)) if mask == "causal"
                  else unchanged[:, None, :]).numpy()
    assert differs(wrong, expected, 0.5)
    right = mha_conv.attention_mask_torch_to_keras(B, HEADS, T, T, **torch_mask)
    np.testing.assert_allclose(layer(x, x, attention_mask=right).numpy(), expected, atol=ATOL)
    if mask == "causal":
        np.testing.assert_allclose(layer(x, x, use_causal_mask=True).numpy(), expected, atol=ATOL)


def test_pitfall_mha_batch_first_default():
    """torch's MultiheadAttention is batch_first=False by default: fed (B, T, E) it runs
    silently, attending across the batch as if B were time, and differs from Keras (always
    batch first) by more than 0.5. batch_first=True, or transposing to (T, B, E), agrees."""
    module, layer = converted_pair(batch_first=False)
    x = floats(B, T, E).astype(np.float32)
    expected = layer(x, x).numpy()
    wrong = torch_attention(module, x)
    assert wrong.shape == expected.shape and differs(wrong, expected, 0.5)
    np.testing.assert_allclose(swap(torch_attention(module, swap(x))), expected, atol=ATOL)
    module.batch_first = True
    np.testing.assert_allclose(torch_attention(module, x), expected, atol=ATOL)


def test_pitfall_mha_in_proj_reshaped_without_transpose():
    """in_proj_weight's blocks are (out, in) like nn.Linear's: each Keras kernel is
    W.T.reshape(E, heads, head_dim). W.reshape(E, heads, head_dim) has the same shape and
    differs by more than 0.1; the converter's split agrees."""
    module, layer = converted_pair()
    x = floats(B, T, E).astype(np.float32)
    expected = torch_attention(module, x)
    np.testing.assert_allclose(layer(x, x).numpy(), expected, atol=ATOL)
    weights = layer.get_weights()
    blocks = np.split(module.in_proj_weight.detach().numpy(), 3)
    for i, w in enumerate(blocks):  # kernels at 0, 2, 4 (each followed by its bias)
        weights[2 * i] = w.reshape(E, HEADS, D)
    layer.set_weights(weights)
    assert differs(layer(x, x).numpy(), expected, 0.1)


def test_pitfall_embedding_padding_idx_gradient():
    """torch's padding_idx row starts at zero (Keras's Embedding has no padding_idx; its rows
    all start in U(-0.05, 0.05)) and never gets a gradient; Keras's does, so training moves
    it. The converter copies the row and the lookups agree; the TF1 graph's padding_idx
    (stop_gradient on that row) gives torch's gradient, and so does Keras's with that row of
    the gradient zeroed. Float64, tolerance 1e-10."""
    fresh = torch.nn.Embedding(10, 4, padding_idx=0)
    assert not fresh.weight[0].any()
    assert keras.layers.Embedding(10, 4)(np.array([0])).numpy().any()
    module = randomise(torch.nn.Embedding(10, 4, padding_idx=0))
    layer = keras.layers.Embedding(10, 4, **F64)
    ids = np.array([[0, 3, 9, 0, 1], [2, 0, 7, 3, 5]])
    layer.build(ids.shape)
    converter, t_config = lookup("Embedding"), torch_config(module)
    weights = converter.to_keras(state(module), t_config, layer.get_config())
    layer.set_weights(weights)
    t_out, _, t_grads, g = run_torch(module, module, [ids])
    assert not t_grads["weight"][0].any()
    k_out, _, (k_grad,) = run_keras(layer, layer, [ids], g)
    close(k_out, t_out)
    assert differs(k_grad[0], t_grads["weight"][0], 0.1)
    close(k_grad * (np.arange(10) != 0)[:, None], t_grads["weight"])
    tf1_out, _, (tf1_grad,) = run_tf1(
        lambda x: tf1_layers.embedding(x, 10, 4, SCOPE, tf.float64, padding_idx=0), [ids], g,
        {f"{SCOPE}/embeddings": weights[0]})
    close(tf1_out, t_out)
    close(converter.to_torch([tf1_grad], t_config, layer.get_config())["weight"], t_grads["weight"])
