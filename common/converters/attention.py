"""Multi-head attention: torch ``nn.MultiheadAttention`` <-> Keras 3 ``MultiHeadAttention`` (and
``tf1_compat/layers/attention.py::multi_head_attention``, whose variables take the Keras names).

==================  ====================================  ======================================
what                torch (E = embed_dim, h heads,        Keras 3 / TF1
                    d = E / h)
==================  ====================================  ======================================
q, k, v weights     in_proj_weight (3E, E), packed q;k;v  query/key/value kernel (E, h, d):
                    (q/k/v_proj_weight (E, kdim|vdim)     each block .T.reshape(E, h, d)
                    when kdim or vdim != E)               (key/value: (kdim|vdim, h, d))
q, k, v biases      in_proj_bias (3E,)                    query/key/value bias (h, d)
output              out_proj.weight (E, E), bias (E,)     attention_output kernel (h, d, E)
                                                          = weight.T.reshape(h, d, E), bias (E,)
boolean masks       True = BLOCKED (attn_mask,            True = ATTEND (attention_mask (B, T, S))
                    key_padding_mask (B, S))
layout              batch_first=False: (T, B, E)          always (B, T, E)
==================  ====================================  ======================================

Refused: ``add_bias_kv`` and ``add_zero_attn`` (extra key/value rows Keras has no place for),
a bias on one side only (torch ``bias`` <-> Keras ``use_bias``), Keras ``key_dim`` or
``value_dim`` other than E / h, an ``output_shape`` other than E, ``use_gate``,
``sliding_window``, attention over other axes, and a different dropout. torch_config's
``bias`` and ``add_bias_kv`` are the constructor's flags, which the module keeps only as
parameters (``in_proj_bias``, ``bias_k``) or None; absent, the tensors decide. ``batch_first`` is
not a weight: transpose the inputs. ``attention_mask_torch_to_keras`` and
``attention_mask_keras_to_torch`` convert masks.
"""
import numpy as np

from .base import ConversionError, Converter, expect_equal, expect_shape, register
from .core import torch_has_bias

PROJECTIONS = ("query", "key", "value")
KERAS_NAMES = ("query/kernel", "query/bias", "key/kernel", "key/bias", "value/kernel",
               "value/bias", "attention_output/kernel", "attention_output/bias")


def _check(torch_config, keras_config, tensors=None):
    """(E, heads, head_dim, kdim, vdim, bias) after refusing what has no exact twin."""
    if torch_config.get("add_bias_kv") or "bias_k" in (tensors or {}):
        raise ConversionError("torch add_bias_kv=True appends learned key/value rows that Keras's "
                              "MultiHeadAttention has no place for; use add_bias_kv=False")
    if torch_config.get("add_zero_attn"):
        raise ConversionError("torch add_zero_attn=True appends a zero key/value row that Keras's "
                              "MultiHeadAttention does not; use add_zero_attn=False")
    e, heads = torch_config["embed_dim"], torch_config["num_heads"]
    d = e // heads
    expect_equal("number of heads", heads, keras_config["num_heads"],
                 f"build the Keras layer with num_heads={heads}")
    expect_equal("key_dim", d, keras_config["key_dim"],
                 f"build the Keras layer with key_dim={d} (embed_dim / num_heads)")
    value_dim = keras_config.get("value_dim") or keras_config["key_dim"]
    expect_equal("value_dim", d, value_dim, f"build the Keras layer with value_dim={d} or None")
    output = keras_config.get("output_shape")
    if output not in (None, e, (e,), [e]):
        raise ConversionError(f"Keras output_shape={output} but torch projects back to "
                              f"embed_dim={e}; use output_shape=None")
    if keras_config.get("use_gate"):
        raise ConversionError("Keras use_gate=True gates the attention output, which torch does "
                              "not; use use_gate=False")
    if keras_config.get("sliding_window") is not None:
        raise ConversionError("Keras sliding_window has no torch argument; use "
                              "sliding_window=None and pass the band as a mask")
    if keras_config.get("attention_axes") not in (None, 1, (1,), [1]):
        raise ConversionError(f"Keras attention_axes={keras_config['attention_axes']} attends "
                              "over other axes than the sequence; use attention_axes=None")
    expect_equal("dropout", float(torch_config["dropout"]), float(keras_config["dropout"]),
                 f"build the Keras layer with dropout={torch_config['dropout']}")
    bias = torch_has_bias(torch_config, tensors, "in_proj_bias")
    if bias is not None:
        expect_equal("bias", bias, keras_config["use_bias"],
                     f"build the Keras layer with use_bias={bias} (torch bias={bias})")
    kdim, vdim = torch_config.get("kdim") or e, torch_config.get("vdim") or e
    return e, heads, d, kdim, vdim, keras_config["use_bias"]


def mha_to_keras(tensors, torch_config, keras_config):
    """in_proj_weight (3E, E) -> three (E, h, d) kernels, each W.T.reshape; in_proj_bias (3E,)
    -> three (h, d); out_proj.weight (E, E) -> (h, d, E) = W.T.reshape; out_proj.bias copied."""
    e, heads, d, kdim, vdim, bias = _check(torch_config, keras_config, tensors)
    expected = ({"in_proj_weight"} if "in_proj_weight" in tensors
                else {"q_proj_weight", "k_proj_weight", "v_proj_weight"})
    expected |= {"out_proj.weight"} | ({"in_proj_bias", "out_proj.bias"} if bias else set())
    if set(tensors) != expected:
        raise ConversionError(f"torch tensors {sorted(tensors)} do not fit this configuration "
                              f"(expected {sorted(expected)})")
    if "in_proj_weight" in tensors:
        weights = np.split(expect_shape("in_proj_weight", tensors["in_proj_weight"], (3 * e, e)), 3)
    else:
        weights = [expect_shape(f"{p}_proj_weight", tensors[f"{p}_proj_weight"], (e, dim))
                   for p, dim in zip("qkv", (e, kdim, vdim))]
    biases = np.split(expect_shape("in_proj_bias", tensors["in_proj_bias"], (3 * e,)), 3) if bias else ()
    out = []
    for i, w in enumerate(weights):
        out.append(np.ascontiguousarray(w.T.reshape(w.shape[1], heads, d)))
        if bias:
            out.append(biases[i].reshape(heads, d))
    out.append(np.ascontiguousarray(
        expect_shape("out_proj.weight", tensors["out_proj.weight"], (e, e)).T.reshape(heads, d, e)))
    if bias:
        out.append(expect_shape("out_proj.bias", tensors["out_proj.bias"], (e,)))
    return out


def mha_to_torch(weights, torch_config, keras_config):
    """The inverse of ``mha_to_keras``: packed ``in_proj_weight`` when kdim = vdim = E (as torch
    stores it), else ``q/k/v_proj_weight``."""
    e, heads, d, kdim, vdim, bias = _check(torch_config, keras_config)
    names = [n for n in KERAS_NAMES if bias or not n.endswith("bias")]
    shapes = {"query/kernel": (e, heads, d), "key/kernel": (kdim, heads, d),
              "value/kernel": (vdim, heads, d), "attention_output/kernel": (heads, d, e),
              "attention_output/bias": (e,)}
    if len(weights) != len(names):
        raise ConversionError(f"expected {len(names)} Keras weights ({', '.join(names)}), "
                              f"got {len(weights)}")
    w = {n: expect_shape(n, np.asarray(a), shapes.get(n, (heads, d))) for n, a in zip(names, weights)}
    kernels = [w[f"{p}/kernel"].reshape(-1, e).T for p in PROJECTIONS]
    out = ({"in_proj_weight": np.concatenate(kernels)} if kdim == vdim == e
           else {f"{p}_proj_weight": k for p, k in zip("qkv", kernels)})
    if bias:
        out["in_proj_bias"] = np.concatenate([w[f"{p}/bias"].reshape(e) for p in PROJECTIONS])
    out["out_proj.weight"] = np.ascontiguousarray(w["attention_output/kernel"].reshape(e, e).T)
    if bias:
        out["out_proj.bias"] = w["attention_output/bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _blocked(mask, name):
    """A torch mask as booleans, True = blocked: bool masks as they are, float (additive)
    masks of 0 and -inf only."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if not np.all((mask == 0) | np.isneginf(mask)):
        raise ConversionError(f"a float {name} with values other than 0 and -inf adds a bias to "
                              "the scores, which Keras's attention_mask cannot; keep it additive "
                              "in torch or make it boolean")
    return np.isneginf(mask)


def attention_mask_torch_to_keras(batch, num_heads, query_len, key_len, attn_mask=None,
                                  key_padding_mask=None):
    """torch's ``attn_mask`` ((T, S) or (B*heads, T, S)) and ``key_padding_mask`` ((B, S)),
    True = blocked, -> one Keras ``attention_mask``, True = attend: (B, T, S), or
    (B, heads, T, S) when ``attn_mask`` differs per head."""
    blocked = np.zeros((batch, 1, query_len, key_len), bool)
    if attn_mask is not None:
        m = _blocked(attn_mask, "attn_mask")
        if m.ndim == 2:
            m = expect_shape("attn_mask", m, (query_len, key_len))[None, None]
        else:
            m = expect_shape("attn_mask", m, (batch * num_heads, query_len, key_len)).reshape(
                batch, num_heads, query_len, key_len)
        blocked = blocked | m
    if key_padding_mask is not None:
        m = expect_shape("key_padding_mask", _blocked(key_padding_mask, "key_padding_mask"),
                         (batch, key_len))
        blocked = blocked | m[:, None, None, :]
    attend = ~blocked
    return attend[:, 0] if attend.shape[1] == 1 else attend


def attention_mask_keras_to_torch(attention_mask, num_heads):
    """A Keras ``attention_mask`` (B, T, S) or (B, heads, T, S), True = attend, -> torch's
    boolean ``attn_mask`` (B*heads, T, S), True = blocked."""
    mask = np.asarray(attention_mask, bool)
    if mask.ndim == 3:
        mask = np.repeat(mask[:, None], num_heads, axis=1)
    if mask.ndim != 4 or mask.shape[1] != num_heads:
        raise ConversionError(f"attention_mask has shape {mask.shape}, expected (B, T, S) or "
                              f"(B, {num_heads}, T, S)")
    b, h, t, s = mask.shape
    return ~mask.reshape(b * h, t, s)


MULTI_HEAD_ATTENTION = register(Converter(
    ("MultiheadAttention",), ("MultiHeadAttention",), KERAS_NAMES, mha_to_keras, mha_to_torch,
    "in_proj_weight (3E, E) -> q/k/v kernels, each block .T.reshape(E, h, d); in_proj_bias -> "
    "(h, d) each; out_proj.weight.T.reshape(h, d, E); boolean masks inverted"))
