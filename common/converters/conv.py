"""Convolution converters: Conv1d <-> Conv1D, Conv2d <-> Conv2D or DepthwiseConv2D,
ConvTranspose2d <-> Conv2DTranspose; numpy only.

=====================  ==========================  ===========================================
torch                  weight                      Keras kernel
=====================  ==========================  ===========================================
Conv1d                 (out, in/g, k)              (k, in/g, out): transpose(2, 1, 0)
Conv2d                 (out, in/g, kh, kw)         (kh, kw, in/g, out): transpose(2, 3, 1, 0)
Conv2d, groups=C       (C*m, 1, kh, kw)            DepthwiseConv2D (kh, kw, C, m): the conv
                                                   permutation, then C*m split as (C, m)
ConvTranspose2d        (in, out, kh, kw)           (kh, kw, out, in): transpose(2, 3, 1, 0)
=====================  ==========================  ===========================================

One permutation for all of them: ``conv_weight_to_keras`` and its inverse ``conv_weight_to_torch``.

The torch name ``Conv2d`` has one converter for both Keras targets: it reads the Keras
config and uses the depthwise layout when it has ``depth_multiplier`` (a DepthwiseConv2D),
the plain one otherwise (a Conv2D, with ``groups`` for grouped convolutions).

Padding: Keras pads zeros only, as ``'same'`` (or ``'causal'``) or ``'valid'``. A Keras
``'same'`` conv must pad exactly as torch does for every input size, so it is refused with a
stride above 1 (TF puts the odd row at the bottom/right, depending on the input size), with
a kernel whose ``dilation*(kernel-1)`` is odd against an integer torch padding (Keras pads
(1, 2), torch (p, p); torch's ``padding='same'`` is the twin), and with a non-zero
``padding_mode``. A Keras ``'valid'`` conv is the twin of any torch padding, which the Keras
model then does with an explicit pad before it (``ZeroPadding2D``, or ``torch_pad_indices``
with ``keras.ops.take`` for reflect/replicate/circular). A Conv2DTranspose crops the full
transposed output where torch does (``keras_transpose_crops``): 'same' exactly, 'valid'
with a ``Cropping2D`` after it; the refusal names that exact twin.
"""
import numpy as np

from common.converters.base import (ConversionError, Converter, expect_equal, expect_shape,
                                    register)

TORCH_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def torch_pad_indices(length, before, after, mode):
    """Indices into an axis of `length` that pad it as torch's padding_mode `mode` does.

    ``x.take(indices, axis)`` (``keras.ops.take``, ``tf.gather``) then pads like torch:
    reflect is TF's ``REFLECT``; replicate repeats the edge, which none of ``tf.pad``'s modes
    does (``SYMMETRIC`` mirrors, and equals replicate only for a pad of 1); circular wraps
    around, which ``tf.pad`` lacks."""
    if mode not in TORCH_PAD_MODES:
        raise ConversionError(f"padding_mode {mode!r} is not one of {sorted(TORCH_PAD_MODES)}")
    return np.pad(np.arange(length), (before, after), mode=TORCH_PAD_MODES[mode])


def conv_weight_to_keras(weight):
    """torch conv weight (out, in/g, *kernel) -> Keras kernel (*kernel, in/g, out): the spatial
    axes first, then in and out swapped (Conv2d: transpose(2, 3, 1, 0)). A transposed conv's
    (in, out/g, *kernel) becomes (*kernel, out/g, in) by the same permutation."""
    assert weight.ndim >= 3, f"expected an (out, in, *kernel) weight, got shape {weight.shape}"
    return np.ascontiguousarray(weight.transpose(*range(2, weight.ndim), 1, 0))


def conv_weight_to_torch(kernel):
    """Keras kernel (*kernel, in/g, out) -> torch weight (out, in/g, *kernel)."""
    assert kernel.ndim >= 3, f"expected a (*kernel, in, out) kernel, got shape {kernel.shape}"
    n = kernel.ndim
    return np.ascontiguousarray(kernel.transpose(n - 1, n - 2, *range(n - 2)))


def _ints(value, nd):
    return (value,) * nd if isinstance(value, int) else tuple(int(v) for v in value)


def _torch_padding(torch_config, nd):
    padding = torch_config["padding"]
    if padding in ("same", "valid"):
        return padding if padding == "same" else (0,) * nd
    return _ints(padding, nd)


def _check_same_padding(torch_config, keras_config, nd):
    """A Keras 'same' conv pads (d*(k-1)//2, the rest) with zeros, for every input size only at
    stride 1; torch must pad exactly that much on each side."""
    padding, mode = _torch_padding(torch_config, nd), torch_config.get("padding_mode", "zeros")
    if mode != "zeros":
        raise ConversionError(f"torch padding_mode={mode!r} differs from Keras padding='same' "
                              f"(zeros); pad explicitly before a padding='valid' Keras layer")
    if padding == "same":
        return
    for k, s, d, p in zip(keras_config["kernel_size"], keras_config["strides"],
                          keras_config["dilation_rate"], padding):
        total = d * (k - 1)
        if s > 1 and total > 0:
            raise ConversionError(f"Keras padding='same' with strides {s} pads by the input size "
                                  f"(the odd row at the bottom/right), torch padding={p} on both "
                                  f"sides; use keras ZeroPadding{nd}D({p}) and padding='valid'")
        if total != 2 * p:
            raise ConversionError(f"Keras padding='same' pads ({total // 2}, "
                                  f"{total - total // 2}) for kernel {k}, dilation {d}; torch "
                                  f"padding={p} pads ({p}, {p}); use torch padding='same', or "
                                  f"pad explicitly before a padding='valid' Keras layer")


def _check_conv_config(torch_config, keras_config, nd, has_bias):
    """Refuse a torch/Keras convolution pair that does not compute the same function."""
    fix = "build both layers with the same value"
    for what, torch_key, keras_key in (("kernel_size", "kernel_size", "kernel_size"),
                                       ("stride", "stride", "strides"),
                                       ("dilation", "dilation", "dilation_rate")):
        expect_equal(what, _ints(torch_config[torch_key], nd), tuple(keras_config[keras_key]), fix)
    expect_equal("bias", has_bias, keras_config["use_bias"], "set Keras use_bias to torch's bias")
    out, groups = torch_config["out_channels"], torch_config["groups"]
    if "depth_multiplier" in keras_config:
        expect_equal("groups", groups, torch_config["in_channels"],
                     "a DepthwiseConv2D is a torch Conv2d with groups=in_channels")
        expect_equal("output channels", out, groups * keras_config["depth_multiplier"],
                     "depth_multiplier is out_channels // in_channels")
    else:
        expect_equal("output channels", out, keras_config["filters"], fix)
        expect_equal("groups", groups, keras_config["groups"], fix)
    if keras_config["padding"] == "same":
        _check_same_padding(torch_config, keras_config, nd)
    elif keras_config["padding"] == "causal":
        expect_equal("padding", _torch_padding(torch_config, nd), (0,) * nd,
                     "Keras 'causal' is torch padding=0 after F.pad(x, (dilation*(k-1), 0))")


def _conv_kernel_shapes(torch_config, keras_config, nd):
    """(torch weight shape, Keras kernel shape) from the configs."""
    kernel = _ints(torch_config["kernel_size"], nd)
    out, cin = torch_config["out_channels"], torch_config["in_channels"]
    groups = torch_config["groups"]
    torch_shape = (out, cin // groups, *kernel)
    if "depth_multiplier" in keras_config:
        return torch_shape, (*kernel, cin, out // cin)
    return torch_shape, (*kernel, cin // groups, out)


def _split_tensors(tensors):
    unexpected = set(tensors) - {"weight", "bias"}
    if unexpected or "weight" not in tensors:
        raise ConversionError(f"expected torch tensors weight[, bias], got {sorted(tensors)}")
    return tensors["weight"], tensors.get("bias")


def _check_count(weights, keras_config):
    expect_equal("number of Keras weights", len(weights), 1 + bool(keras_config["use_bias"]),
                 "pass the Keras layer's get_weights(): kernel[, bias]")


def _bias_to_torch(weights, out):
    if len(weights) == 1:
        return {}
    return {"bias": expect_shape("Keras bias", np.asarray(weights[1]), (out,))}


def _conv_to_keras(tensors, torch_config, keras_config, nd):
    weight, bias = _split_tensors(tensors)
    _check_conv_config(torch_config, keras_config, nd, bias is not None)
    torch_shape, keras_shape = _conv_kernel_shapes(torch_config, keras_config, nd)
    weight = expect_shape("torch weight", np.asarray(weight), torch_shape)
    kernel = conv_weight_to_keras(weight).reshape(keras_shape)  # depthwise: C*m split as (C, m)
    out = [expect_shape("Keras kernel", kernel, keras_shape)]
    if bias is not None:
        out.append(expect_shape("torch bias", np.asarray(bias), (torch_config["out_channels"],)))
    return out


def _conv_to_torch(weights, torch_config, keras_config, nd):
    _check_conv_config(torch_config, keras_config, nd, bool(keras_config["use_bias"]))
    _check_count(weights, keras_config)
    torch_shape, keras_shape = _conv_kernel_shapes(torch_config, keras_config, nd)
    kernel = expect_shape("Keras kernel", np.asarray(weights[0]), keras_shape)
    grouped = kernel.reshape(*keras_shape[:nd], *torch_shape[1::-1])  # depthwise: (C, m) -> C*m
    weight = conv_weight_to_torch(grouped)
    return {"weight": expect_shape("torch weight", weight, torch_shape),
            **_bias_to_torch(weights, torch_config["out_channels"])}


def conv1d_to_keras(tensors, torch_config, keras_config):
    """Conv1d weight (out, in/g, k) -> Conv1D kernel (k, in/g, out), bias unchanged."""
    return _conv_to_keras(tensors, torch_config, keras_config, 1)


def conv1d_to_torch(weights, torch_config, keras_config):
    """Conv1D kernel (k, in/g, out) -> Conv1d weight (out, in/g, k)."""
    return _conv_to_torch(weights, torch_config, keras_config, 1)


def conv2d_to_keras(tensors, torch_config, keras_config):
    """Conv2d weight -> Conv2D kernel (kh, kw, in/g, out), or, when keras_config is a
    DepthwiseConv2D's, (C*m, 1, kh, kw) -> (kh, kw, C, m): output channel c*m + j is
    multiplier j of input channel c in both frameworks, so C*m splits as (C, m), not (m, C)."""
    return _conv_to_keras(tensors, torch_config, keras_config, 2)


def conv2d_to_torch(weights, torch_config, keras_config):
    """Conv2D (kh, kw, in/g, out) or DepthwiseConv2D (kh, kw, C, m) kernel -> Conv2d weight."""
    return _conv_to_torch(weights, torch_config, keras_config, 2)


def keras_transpose_crops(keras_config):
    """Per spatial axis, the (start, end) rows a Keras Conv2DTranspose crops from the full
    transposed convolution (length (n-1)*s + d*(k-1) + 1); a negative end appends rows.

    TF's 'same' crops the odd row at the end (bottom/right); torch crops (padding,
    padding - output_padding), the odd row at the start when output_padding is 1."""
    crops = []
    output_padding = keras_config["output_padding"] or (None,) * 2
    for k, s, d, op in zip(keras_config["kernel_size"], keras_config["strides"],
                           keras_config["dilation_rate"], output_padding):
        span = d * (k - 1) + 1
        if keras_config["padding"] == "valid":
            crops.append((0, -(max(s - span, 0) if op is None else op)))
            continue
        total = span - s if op is None else 2 * (span // 2) - op
        crops.append((max(total, 0) // 2, total - max(total, 0) // 2))
    return tuple(crops)


def _check_transpose_config(torch_config, keras_config, has_bias):
    """Refuse a ConvTranspose2d/Conv2DTranspose pair that does not compute the same function."""
    if torch_config["groups"] != 1:
        raise ConversionError(f"ConvTranspose2d has groups={torch_config['groups']}; Keras "
                              f"Conv2DTranspose has no groups: split it into one layer per group")
    _check_conv_config({**torch_config, "groups": 1}, {**keras_config, "groups": 1,
                                                       "padding": "valid"}, 2, has_bias)
    padding = _ints(torch_config["padding"], 2)
    output_padding = _ints(torch_config["output_padding"], 2)
    torch_crops = tuple((p, p - op) for p, op in zip(padding, output_padding))
    keras_crops = keras_transpose_crops(keras_config)
    if ((keras_config["padding"] == "same" and keras_crops != torch_crops)
            or any(t_end < k_end for (_, t_end), (_, k_end) in zip(torch_crops, keras_crops))):
        grow = tuple(max(op - p, 0) for p, op in zip(padding, output_padding))
        twin = ("none, Keras needs output_padding < strides" if
                any(g >= s for g, s in zip(grow, keras_config["strides"])) else
                f"padding='valid', output_padding={grow}, then keras.layers.Cropping2D("
                f"{tuple((p, p + g - op) for p, g, op in zip(padding, grow, output_padding))})")
        raise ConversionError(f"Keras padding={keras_config['padding']!r}, output_padding="
                              f"{keras_config['output_padding']} crops {keras_crops} (start, end) "
                              f"rows/columns of the full output, torch padding={padding}, "
                              f"output_padding={output_padding} crops {torch_crops}; exact Keras "
                              f"twin: {twin}")


def conv_transpose2d_to_keras(tensors, torch_config, keras_config):
    """ConvTranspose2d weight (in, out, kh, kw) -> Conv2DTranspose kernel (kh, kw, out, in):
    the same axis permutation as a conv kernel, since both frameworks store a transposed
    conv's kernel with in and out swapped; (kh, kw, in, out) by analogy with Conv2D is wrong."""
    weight, bias = _split_tensors(tensors)
    _check_transpose_config(torch_config, keras_config, bias is not None)
    kh, kw = _ints(torch_config["kernel_size"], 2)
    cin, out = torch_config["in_channels"], torch_config["out_channels"]
    weight = expect_shape("torch weight", np.asarray(weight), (cin, out, kh, kw))
    kernel = [expect_shape("Keras kernel", conv_weight_to_keras(weight), (kh, kw, out, cin))]
    if bias is not None:
        kernel.append(expect_shape("torch bias", np.asarray(bias), (out,)))
    return kernel


def conv_transpose2d_to_torch(weights, torch_config, keras_config):
    """Conv2DTranspose kernel (kh, kw, out, in) -> ConvTranspose2d weight (in, out, kh, kw)."""
    _check_transpose_config(torch_config, keras_config, bool(keras_config["use_bias"]))
    _check_count(weights, keras_config)
    kh, kw = _ints(torch_config["kernel_size"], 2)
    cin, out = torch_config["in_channels"], torch_config["out_channels"]
    kernel = expect_shape("Keras kernel", np.asarray(weights[0]), (kh, kw, out, cin))
    return {"weight": conv_weight_to_torch(kernel), **_bias_to_torch(weights, out)}


NAMES = ("kernel", "bias")
register(Converter(("Conv1d",), ("Conv1D",), NAMES, conv1d_to_keras, conv1d_to_torch,
                   "weight (out, in/g, k) -> kernel (k, in/g, out): transpose(2, 1, 0)"))
register(Converter(("Conv2d",), ("Conv2D", "DepthwiseConv2D"), NAMES, conv2d_to_keras,
                   conv2d_to_torch,
                   "weight (out, in/g, kh, kw) -> kernel (kh, kw, in/g, out): transpose(2, 3, 1, "
                   "0); DepthwiseConv2D (groups=C): (C*m, 1, kh, kw) -> (kh, kw, C, m)"))
register(Converter(("ConvTranspose2d",), ("Conv2DTranspose",), NAMES, conv_transpose2d_to_keras,
                   conv_transpose2d_to_torch,
                   "weight (in, out, kh, kw) -> kernel (kh, kw, out, in): transpose(2, 3, 1, 0)"))
