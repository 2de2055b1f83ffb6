"""TF1-style transformer layers: dense, embedding and multi-head attention, written with
``get_variable``, ``tf.matmul``/``tf.einsum``, ``tf.nn.embedding_lookup`` and ``tf.nn.softmax``
(the activations of the feed-forward blocks are in ``activations.py``).

Variables take the Keras names and layouts in one ``variable_scope`` per layer (``kernel``
(in, out); ``embeddings`` (num, dim); ``query/kernel`` (E, heads, head_dim) ...), and x's
dtype, so ``common.converters.core`` and ``common.converters.attention`` fill them.
Initialisers follow Keras (Glorot uniform kernels, zero biases, U(-0.05, 0.05) embeddings).

Build inside ``with tf.Graph().as_default():`` and run in a ``tf.compat.v1.Session()``.
"""
import math

import tensorflow as tf

tf1 = tf.compat.v1
MASKED = -1e9  # added to blocked scores before the softmax, the TF1 transformers' idiom


def _kernel_and_bias(kernel_shape, bias_shape, dtype, use_bias):
    kernel = tf1.get_variable("kernel", kernel_shape, dtype,
                              initializer=tf1.glorot_uniform_initializer())
    bias = (tf1.get_variable("bias", bias_shape, dtype, initializer=tf1.zeros_initializer())
            if use_bias else None)
    return kernel, bias


def dense(x, units, name, use_bias=True):
    """x (N, ..., in) -> (N, ..., units) = x @ kernel + bias; kernel (in, units), bias (units,)
    (torch's Linear stores weight (units, in) and computes x W^T)."""
    with tf1.variable_scope(name):
        kernel, bias = _kernel_and_bias([x.shape[-1], units], [units], x.dtype, use_bias)
        y = tf.tensordot(x, kernel, axes=1)
        return y if bias is None else y + bias


def embedding(ids, num_embeddings, dim, name, dtype=tf.float32, padding_idx=None):
    """ids (N, ...) int -> (N, ..., dim): rows of ``embeddings`` (num_embeddings, dim).

    `padding_idx` gives torch's semantics, which Keras's Embedding lacks: that row is looked
    up as it is but gets no gradient (``tf.stop_gradient`` on it alone), so training never
    moves it (torch also starts it at zero; here it is whatever is loaded into it)."""
    with tf1.variable_scope(name):
        table = tf1.get_variable("embeddings", [num_embeddings, dim], dtype,
                                 initializer=tf1.random_uniform_initializer(-0.05, 0.05))
        if padding_idx is not None:
            frozen = tf.one_hot(padding_idx, num_embeddings, dtype=dtype)[:, None]  # (num, 1)
            table = table * (1 - frozen) + tf.stop_gradient(table * frozen)
        return tf.nn.embedding_lookup(table, ids)


def _projection(x, heads, head_dim, name, use_bias):
    """x (B, T, D) -> (B, T, heads, head_dim) with kernel (D, heads, head_dim), bias (heads,
    head_dim): Keras's EinsumDense "abc,cde->abde"."""
    with tf1.variable_scope(name):
        kernel, bias = _kernel_and_bias([x.shape[-1], heads, head_dim], [heads, head_dim],
                                        x.dtype, use_bias)
        y = tf.einsum("btd,dnh->btnh", x, kernel)
        return y if bias is None else y + bias


def multi_head_attention(query, value, num_heads, key_dim, name, key=None,
                         attention_mask=None, use_causal_mask=False, use_bias=True):
    """Keras's MultiHeadAttention (value_dim = key_dim, output back to query's size), batch
    first: query (B, T, E), value (B, S, Dv), key (B, S, Dk) (default: value) -> (B, T, E).

    scores = (q / sqrt(key_dim)) k^T per head; `attention_mask` (B, T, S) or (B, heads, T, S)
    is True where a query may ATTEND (Keras's convention; torch's boolean masks are True where
    it is BLOCKED: ``common.converters.attention.attention_mask_torch_to_keras``), and
    `use_causal_mask` lets query t attend to keys 0..t only. Blocked scores get -1e9.
    Variables query/key/value kernel (D, heads, key_dim) and bias (heads, key_dim),
    attention_output kernel (heads, key_dim, E) and bias (E,).
    """
    key = value if key is None else key
    with tf1.variable_scope(name):
        q = _projection(query, num_heads, key_dim, "query", use_bias)
        k = _projection(key, num_heads, key_dim, "key", use_bias)
        v = _projection(value, num_heads, key_dim, "value", use_bias)
        scores = tf.einsum("bsnh,btnh->bnts", k, q / math.sqrt(key_dim))  # (B, heads, T, S)
        attend = tf.ones_like(scores, dtype=tf.bool)
        if attention_mask is not None:
            mask = tf.convert_to_tensor(attention_mask, tf.bool)
            attend = attend & (mask[:, None] if mask.shape.rank == 3 else mask)
        if use_causal_mask:
            attend = attend & tf.cast(tf.linalg.band_part(tf.ones_like(scores), -1, 0), tf.bool)
        scores += (1 - tf.cast(attend, scores.dtype)) * MASKED
        context = tf.einsum("bnts,bsnh->btnh", tf.nn.softmax(scores, axis=-1), v)
        with tf1.variable_scope("attention_output"):
            e = query.shape[-1]
            kernel, bias = _kernel_and_bias([num_heads, key_dim, e], [e], query.dtype, use_bias)
            y = tf.einsum("btnh,nhe->bte", context, kernel)
            return y if bias is None else y + bias


# -- activations with torch's arguments ---------------------------------------------------------
