"""Linear, the normalisations and Embedding: torch modules <-> Keras 3 layers (and this
project's TF1 graph versions, ``tf1_compat/layers/``, which use the Keras names and layouts).

======================  =================================  ===================================
torch                   state_dict (shape)                 Keras get_weights() (shape)
======================  =================================  ===================================
Linear                  weight (out, in), bias (out,)      Dense kernel (in, out), bias (out,)
BatchNorm1d/2d          weight, bias, running_mean/var     BatchNormalization gamma, beta,
                        (C,); num_batches_tracked           moving_mean, moving_variance (C,)
LayerNorm               weight, bias (normalized_shape)    LayerNormalization gamma, beta
GroupNorm               weight, bias (C,)                  GroupNormalization gamma, beta (C,)
Embedding               weight (num, dim)                  Embedding embeddings (num, dim)
======================  =================================  ===================================

Only Linear transposes (and permutes, reading a flattened map); the rest copy. The configs
are what a conversion checks: torch's eps is 1e-5 where Keras's default epsilon is 1e-3,
batch norm's momentum 0.1 weights the new batch statistic where Keras's 0.9 (= 1 - 0.1,
``bn_momentum_torch_to_keras``) weights the old value, and a missing bias or affine
transform must be missing on both sides.

What is refused, and what is not: a difference that a Keras argument fixes (epsilon,
momentum, use_bias, center/scale, axis, mask_zero) or that changes the forward pass (torch
``max_norm``, batch norm without running statistics) raises ``ConversionError``. Differences
only in training that no Keras argument expresses are converted and documented: torch's
``padding_idx`` keeps its row's gradient at zero (Keras updates it; the row's values are
copied as they are), ``scale_grad_by_freq`` and ``sparse`` change the gradient's scale or
type. A Keras Dense ``activation`` is not checked: it has no weights, and torch applies it
outside ``nn.Linear``.

``torch_config`` is the module's public attributes; ``bias`` there (whether the module has
one: ``nn.Linear``/``nn.LayerNorm`` keep a missing bias as None, which ``vars()`` does not
list) is optional, the tensors present decide when it is absent. A Linear's may add
``flatten_chw``: the (C, H, W) of the flattened feature map it reads.
"""
import numpy as np

from .base import (ConversionError, Converter, expect_equal, expect_weights, register,
                   take_tensors)

_TOLERANCE = 1e-6  # relative, for eps and momentum given as floats on both sides


def torch_has_bias(torch_config, tensors=None, tensor_name="bias"):
    """Whether the torch module has a bias: its config's ``bias`` if given, else whether the
    tensors hold `tensor_name` (None when neither says)."""
    if "bias" in torch_config:
        flag = torch_config["bias"]
        return flag is not None and flag is not False
    return None if tensors is None else tensor_name in tensors


def _expect_close(what, torch_value, keras_value, fix):
    if not np.isclose(float(torch_value), float(keras_value), rtol=_TOLERANCE, atol=0.0):
        raise ConversionError(f"{what} differs: torch {torch_value:g}, Keras {keras_value:g}; "
                              f"{fix}")


def _expect_eps(torch_config, keras_config):
    eps = torch_config["eps"]
    _expect_close("eps", eps, keras_config["epsilon"], f"build the Keras layer with epsilon={eps:g}")


def _affine(torch_scale, torch_center, keras_config, layer):
    """Keras (scale, center) must equal torch's (weight present, bias present)."""
    if (keras_config["scale"], keras_config["center"]) != (torch_scale, torch_center):
        raise ConversionError(
            f"{layer} affine parameters differ: torch weight {torch_scale}, bias {torch_center}, "
            f"Keras scale {keras_config['scale']}, center {keras_config['center']}; build the "
            f"Keras layer with scale={torch_scale}, center={torch_center}")
    return [name for name, keep in (("gamma", torch_scale), ("beta", torch_center)) if keep]


# -- Linear <-> Dense ---------------------------------------------------------------------------
def flatten_order(chw):
    """torch flattens an NCHW map in (C, H, W) order, Keras and TF1 an NHWC map in (H, W, C)
    order: entry i is the (C, H, W) index of the i-th (H, W, C) feature."""
    c, h, w = chw
    return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()


def linear_weight_to_keras(weight, flatten_chw=None):
    """Linear weight (out, in) -> Dense kernel (in, out): torch computes x W^T, Keras x W. A
    Linear reading a flattened (C, H, W) map (``flatten_chw``) also has its inputs permuted to
    (H, W, C) order (``flatten_order``): without it the shapes match, the outputs are wrong."""
    assert weight.ndim == 2, f"expected an (out, in) weight, got shape {weight.shape}"
    if flatten_chw is not None:
        order = flatten_order(flatten_chw)
        assert weight.shape[1] == order.size, f"expected {order.size} inputs, got {weight.shape}"
        weight = weight[:, order]
    return np.ascontiguousarray(weight.T)


def linear_weight_to_torch(kernel, flatten_chw=None):
    """Dense kernel (in, out) -> Linear weight (out, in), inputs back in (C, H, W) order."""
    assert kernel.ndim == 2, f"expected an (in, out) kernel, got shape {kernel.shape}"
    if flatten_chw is not None:
        order = flatten_order(flatten_chw)
        assert kernel.shape[0] == order.size, f"expected {order.size} inputs, got {kernel.shape}"
        kernel = kernel[np.argsort(order)]
    return np.ascontiguousarray(kernel.T)


def _linear_check(torch_config, keras_config, has_bias):
    out, inp = torch_config["out_features"], torch_config["in_features"]
    expect_equal("output size", out, keras_config["units"], f"build the Dense with units={out}")
    if has_bias is not None:
        expect_equal("bias", has_bias, keras_config["use_bias"],
                     f"build the Dense with use_bias={has_bias} (torch bias={has_bias})")
    return out, inp


def linear_to_keras(tensors, torch_config, keras_config):
    """weight (out, in) -> kernel (in, out) = weight.T, rows permuted with ``flatten_chw``
    (``linear_weight_to_keras``); bias copied."""
    has_bias = torch_has_bias(torch_config, tensors)
    out, inp = _linear_check(torch_config, keras_config, has_bias)
    wanted = [("weight", (out, inp))] + [("bias", (out,))] * has_bias
    arrays = take_tensors(tensors, wanted)
    return [linear_weight_to_keras(arrays[0], torch_config.get("flatten_chw"))] + arrays[1:]


def linear_to_torch(weights, torch_config, keras_config):
    """kernel (in, out) -> weight (out, in) (``linear_weight_to_torch``); bias copied."""
    out, inp = _linear_check(torch_config, keras_config, torch_has_bias(torch_config))
    use_bias = keras_config["use_bias"]
    arrays = expect_weights(weights, [("kernel", (inp, out))] + [("bias", (out,))] * use_bias)
    weight = linear_weight_to_torch(arrays[0], torch_config.get("flatten_chw"))
    return {"weight": weight, **({"bias": arrays[1]} if use_bias else {})}


# -- BatchNorm1d/2d <-> BatchNormalization ---------------------------------------------------------
BN_TORCH_TO_KERAS = {"weight": "gamma", "bias": "beta",
                     "running_mean": "moving_mean", "running_var": "moving_variance"}
BN_KERAS_TO_TORCH = {v: k for k, v in BN_TORCH_TO_KERAS.items()}


def bn_momentum_torch_to_keras(momentum):
    """torch: running = (1-m)*running + m*batch; Keras: moving = m'*moving + (1-m')*batch."""
    return 1.0 - momentum


def _batch_norm_check(torch_config, keras_config):
    """The Keras names present; refuses what differs (eps, momentum, affine, statistics)."""
    if not torch_config["track_running_stats"]:
        raise ConversionError("torch batch norm with track_running_stats=False normalises with "
                              "batch statistics in eval mode too, which Keras cannot; use "
                              "track_running_stats=True")
    if torch_config["momentum"] is None:
        raise ConversionError("torch batch norm momentum=None (a cumulative average) has no Keras "
                              "twin; give torch a momentum such as 0.1")
    if keras_config.get("renorm"):
        raise ConversionError("Keras batch renormalization (renorm=True) has no torch twin; use "
                              "renorm=False")
    _expect_eps(torch_config, keras_config)
    momentum = torch_config["momentum"]
    keras_momentum = bn_momentum_torch_to_keras(momentum)
    if not np.isclose(keras_momentum, float(keras_config["momentum"]), rtol=_TOLERANCE, atol=0.0):
        raise ConversionError(
            f"momentum differs: torch {momentum:g} weights the new batch statistic, Keras "
            f"{keras_config['momentum']:g} the old value; build the Keras layer with "
            f"momentum={keras_momentum:g} (= 1 - {momentum:g})")
    affine = torch_config["affine"]
    return _affine(affine, affine, keras_config, "batch norm") + ["moving_mean", "moving_variance"]


def batch_norm_to_keras(tensors, torch_config, keras_config):
    """weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance,
    as float32; num_batches_tracked is dropped, as Keras has none. The values carry over
    unchanged: only the running statistics' update rule and the default eps differ."""
    names = _batch_norm_check(torch_config, keras_config)
    c = (torch_config["num_features"],)
    torch_names = [BN_KERAS_TO_TORCH[name] for name in names]
    arrays = take_tensors(tensors, [(n, c) for n in torch_names], ignored=("num_batches_tracked",))
    return [np.asarray(a, dtype=np.float32) for a in arrays]


def batch_norm_to_torch(weights, torch_config, keras_config):
    """gamma, beta, moving_mean, moving_variance -> weight, bias, running_mean, running_var,
    as float32 (without num_batches_tracked: ``load_state_dict`` keeps the module's own)."""
    names = _batch_norm_check(torch_config, keras_config)
    c = (torch_config["num_features"],)
    arrays = expect_weights(weights, [(n, c) for n in names])
    return {BN_KERAS_TO_TORCH[n]: np.asarray(a, dtype=np.float32) for n, a in zip(names, arrays)}


# -- LayerNorm <-> LayerNormalization ----------------------------------------------------------------
def _layer_norm_check(torch_config, keras_config, has_bias):
    shape = tuple(torch_config["normalized_shape"])
    axes = keras_config["axis"]
    axes = [axes] if isinstance(axes, int) else list(axes)
    last = list(range(-len(shape), 0))
    consecutive = all(b - a == 1 for a, b in zip(axes, axes[1:]))
    if len(axes) != len(shape) or not (axes == last or (min(axes) >= 0 and consecutive)):
        raise ConversionError(
            f"torch normalized_shape {shape} normalises the last {len(shape)} dims but Keras "
            f"axis is {keras_config['axis']}; build the Keras layer with axis={tuple(last)}")
    if keras_config.get("rms_scaling"):
        raise ConversionError("Keras rms_scaling=True (deprecated) scales by the variance, which "
                              "torch's LayerNorm does not; use rms_scaling=False")
    _expect_eps(torch_config, keras_config)
    scale = torch_config["elementwise_affine"]
    center = scale and (has_bias if has_bias is not None else keras_config["center"])
    return _affine(scale, center, keras_config, "layer norm"), shape


_TORCH_NAME = {"gamma": "weight", "beta": "bias", "embeddings": "weight"}


def _copy_to_keras(tensors, names, shape):
    """Same values, Keras names: gamma <- weight, beta <- bias, embeddings <- weight."""
    torch_names = [_TORCH_NAME[name] for name in names]
    return take_tensors(tensors, [(n, shape) for n in torch_names])


def _copy_to_torch(weights, names, shape):
    arrays = expect_weights(weights, [(n, shape) for n in names])
    return {_TORCH_NAME[name]: a for name, a in zip(names, arrays)}


def layer_norm_to_keras(tensors, torch_config, keras_config):
    """weight, bias (normalized_shape) -> gamma, beta: copied."""
    has_bias = torch_has_bias(torch_config, tensors)
    return _copy_to_keras(tensors, *_layer_norm_check(torch_config, keras_config, has_bias))


def layer_norm_to_torch(weights, torch_config, keras_config):
    """gamma, beta -> weight, bias: copied."""
    return _copy_to_torch(weights, *_layer_norm_check(torch_config, keras_config,
                                                      torch_has_bias(torch_config)))


# -- GroupNorm <-> GroupNormalization -----------------------------------------------------------------
def _group_norm_check(torch_config, keras_config):
    groups = torch_config["num_groups"]
    expect_equal("number of groups", groups, keras_config["groups"],
                 f"build the Keras layer with groups={groups}")
    _expect_eps(torch_config, keras_config)
    affine = torch_config["affine"]
    return _affine(affine, affine, keras_config, "group norm"), (torch_config["num_channels"],)


def group_norm_to_keras(tensors, torch_config, keras_config):
    """weight, bias (C,) -> gamma, beta: copied (both split C into contiguous groups)."""
    return _copy_to_keras(tensors, *_group_norm_check(torch_config, keras_config))


def group_norm_to_torch(weights, torch_config, keras_config):
    return _copy_to_torch(weights, *_group_norm_check(torch_config, keras_config))


# -- Embedding <-> Embedding ------------------------------------------------------------------------
def _embedding_check(torch_config, keras_config):
    num, dim = torch_config["num_embeddings"], torch_config["embedding_dim"]
    expect_equal("vocabulary size", num, keras_config["input_dim"],
                 f"build the Keras Embedding with input_dim={num}")
    expect_equal("embedding size", dim, keras_config["output_dim"],
                 f"build the Keras Embedding with output_dim={dim}")
    if torch_config.get("max_norm") is not None:
        raise ConversionError(f"torch max_norm={torch_config['max_norm']} renormalises looked-up "
                              "rows in the forward pass, which Keras cannot; use max_norm=None")
    if keras_config.get("mask_zero"):
        raise ConversionError("Keras mask_zero=True masks id 0 in the layers downstream, which "
                              "torch never does (padding_idx only freezes that row); use "
                              "mask_zero=False and pass masks explicitly")
    return ["embeddings"], (num, dim)


def embedding_to_keras(tensors, torch_config, keras_config):
    """weight (num, dim) -> embeddings (num, dim): copied, the padding_idx row included."""
    return _copy_to_keras(tensors, *_embedding_check(torch_config, keras_config))


def embedding_to_torch(weights, torch_config, keras_config):
    return _copy_to_torch(weights, *_embedding_check(torch_config, keras_config))


LINEAR = register(Converter(
    ("Linear",), ("Dense",), ("kernel", "bias"), linear_to_keras, linear_to_torch,
    "weight (out, in) -> kernel (in, out) = weight.T; bias copied; bias=False <-> use_bias=False"))
BATCH_NORM = register(Converter(
    ("BatchNorm1d", "BatchNorm2d"), ("BatchNormalization",),
    ("gamma", "beta", "moving_mean", "moving_variance"), batch_norm_to_keras, batch_norm_to_torch,
    "weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance, "
    "copied; eps equal, Keras momentum = 1 - torch's"))
LAYER_NORM = register(Converter(
    ("LayerNorm",), ("LayerNormalization",), ("gamma", "beta"), layer_norm_to_keras,
    layer_norm_to_torch,
    "weight, bias -> gamma, beta, copied; normalized_shape (k dims) <-> axis = the last k; eps equal"))
GROUP_NORM = register(Converter(
    ("GroupNorm",), ("GroupNormalization",), ("gamma", "beta"), group_norm_to_keras,
    group_norm_to_torch,
    "weight, bias (C,) -> gamma, beta, copied; groups and eps equal; NCHW <-> NHWC (axis=-1)"))
# One converter for both frameworks' "Embedding" (the registry refuses a name twice).
EMBEDDING = register(Converter(
    ("Embedding",), (), ("embeddings",), embedding_to_keras, embedding_to_torch,
    "weight (num, dim) -> embeddings, copied; padding_idx's zero gradient does not carry over"))
