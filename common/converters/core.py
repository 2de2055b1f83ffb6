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

Only Linear transposes; the rest copy. The configurations are what a conversion checks:
torch's eps is 1e-5 where Keras's default epsilon is 1e-3, batch norm's momentum 0.1
weights the new batch statistic where Keras's 0.9 (= 1 - 0.1) weights the old value, and a
missing bias or affine transform must be missing on both sides.

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
list) is optional, the tensors present decide when it is absent.
"""
import numpy as np

from common import layout

from .base import ConversionError, Converter, expect_equal, expect_shape, register

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


def _take(tensors, wanted, ignored=()):
    """[tensors[name] for name in wanted], shapes asserted; any other name is refused.
    `wanted` is [(name, shape)]."""
    unexpected = sorted(set(tensors) - {name for name, _ in wanted} - set(ignored))
    missing = sorted({name for name, _ in wanted} - set(tensors))
    if unexpected or missing:
        raise ConversionError(f"torch tensors {sorted(tensors)} do not fit this configuration "
                              f"(missing {missing}, unexpected {unexpected})")
    return [expect_shape(name, np.asarray(tensors[name]), shape) for name, shape in wanted]


def _expect_count(weights, wanted):
    """Assert the Keras weights' count and shapes against [(keras name, shape)]."""
    if len(weights) != len(wanted):
        raise ConversionError(f"expected {len(wanted)} Keras weights "
                              f"({', '.join(name for name, _ in wanted)}), got {len(weights)}")
    return [expect_shape(name, np.asarray(w), shape) for w, (name, shape) in zip(weights, wanted)]


def _affine(torch_scale, torch_center, keras_config, layer):
    """Keras (scale, center) must equal torch's (weight present, bias present)."""
    if (keras_config["scale"], keras_config["center"]) != (torch_scale, torch_center):
        raise ConversionError(
            f"{layer} affine parameters differ: torch weight {torch_scale}, bias {torch_center}, "
            f"Keras scale {keras_config['scale']}, center {keras_config['center']}; build the "
            f"Keras layer with scale={torch_scale}, center={torch_center}")
    return [name for name, keep in (("gamma", torch_scale), ("beta", torch_center)) if keep]


# -- Linear <-> Dense ---------------------------------------------------------------------------
def _linear_check(torch_config, keras_config, has_bias):
    out, inp = torch_config["out_features"], torch_config["in_features"]
    expect_equal("output size", out, keras_config["units"], f"build the Dense with units={out}")
    if has_bias is not None:
        expect_equal("bias", has_bias, keras_config["use_bias"],
                     f"build the Dense with use_bias={has_bias} (torch bias={has_bias})")
    return out, inp


def linear_to_keras(tensors, torch_config, keras_config):
    """weight (out, in) -> kernel (in, out) = weight.T; bias copied."""
    has_bias = torch_has_bias(torch_config, tensors)
    out, inp = _linear_check(torch_config, keras_config, has_bias)
    wanted = [("weight", (out, inp))] + [("bias", (out,))] * has_bias
    arrays = _take(tensors, wanted)
    return [layout.dense_torch_to_tf(arrays[0])] + arrays[1:]


def linear_to_torch(weights, torch_config, keras_config):
    """kernel (in, out) -> weight (out, in); bias copied."""
    out, inp = _linear_check(torch_config, keras_config, torch_has_bias(torch_config))
    use_bias = keras_config["use_bias"]
    arrays = _expect_count(weights, [("kernel", (inp, out))] + [("bias", (out,))] * use_bias)
    return {"weight": layout.dense_tf_to_torch(arrays[0]), **({"bias": arrays[1]} if use_bias else {})}


# -- BatchNorm1d/2d <-> BatchNormalization ---------------------------------------------------------
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
    keras_momentum = layout.bn_momentum_torch_to_keras(momentum)
    if not np.isclose(keras_momentum, float(keras_config["momentum"]), rtol=_TOLERANCE, atol=0.0):
        raise ConversionError(
            f"momentum differs: torch {momentum:g} weights the new batch statistic, Keras "
            f"{keras_config['momentum']:g} the old value; build the Keras layer with "
            f"momentum={keras_momentum:g} (= 1 - {momentum:g})")
    affine = torch_config["affine"]
    return _affine(affine, affine, keras_config, "batch norm") + ["moving_mean", "moving_variance"]


def batch_norm_to_keras(tensors, torch_config, keras_config):
    """weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance
    (``layout.batchnorm_torch_to_tf``); num_batches_tracked is dropped, as Keras has none."""
    names = _batch_norm_check(torch_config, keras_config)
    c = (torch_config["num_features"],)
    torch_names = [layout.BN_TF_TO_TORCH[name] for name in names]
    arrays = dict(zip(torch_names, _take(tensors, [(n, c) for n in torch_names],
                                         ignored=("num_batches_tracked",))))
    full = layout.batchnorm_torch_to_tf({"weight": np.ones(c), "bias": np.zeros(c), **arrays})
    return [full[name] for name in names]


def batch_norm_to_torch(weights, torch_config, keras_config):
    """gamma, beta, moving_mean, moving_variance -> weight, bias, running_mean, running_var
    (without num_batches_tracked: ``load_state_dict`` keeps the module's own)."""
    names = _batch_norm_check(torch_config, keras_config)
    c = (torch_config["num_features"],)
    arrays = dict(zip(names, _expect_count(weights, [(n, c) for n in names])))
    full = layout.batchnorm_tf_to_torch({"gamma": np.ones(c), "beta": np.zeros(c), **arrays})
    return {layout.BN_TF_TO_TORCH[name]: full[layout.BN_TF_TO_TORCH[name]] for name in names}


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
    return _take(tensors, [(n, shape) for n in torch_names])


def _copy_to_torch(weights, names, shape):
    arrays = _expect_count(weights, [(n, shape) for n in names])
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
