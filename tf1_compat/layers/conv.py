"""TF1-style twins of torch's convolutions, pooling, resizing and padding, channels-last.

Twins: torch's Conv1d/Conv2d/ConvTranspose2d/MaxPool2d/AvgPool2d/AdaptiveAvgPool2d/F.pad/
F.interpolate and Keras 3's Conv1D/Conv2D/DepthwiseConv2D/Conv2DTranspose/pooling/resizing
layers. Each function takes torch's arguments (ints for padding), so it computes what the
torch layer does, with the TF1 ops a TF1 program uses (``tf.nn.conv2d``, ``tf.pad``,
``tf.nn.avg_pool2d``, ``tf.compat.v1.image.resize_*``); a layer with weights opens a
``variable_scope`` whose ``kernel``/``bias`` variables have the Keras twin's names and layout,
so ``common.converters.conv`` converts them. Build inside ``with tf.Graph().as_default():``
with inputs of static spatial shape.
"""
import numpy as np
import tensorflow as tf

from common.converters.conv import torch_pad_indices

tf1 = tf.compat.v1


def _ints(value, nd=2):
    return (value,) * nd if isinstance(value, int) else tuple(value)


def pad(x, pads, mode="zeros", value=0.0):
    """torch's F.pad / padding_mode: x (N, *spatial, C) -> (N, *padded spatial, C).

    `pads`: one (before, after) per spatial axis, in axis order (F.pad lists the last axis
    first). zeros: ``tf.pad`` with `value`; reflect: ``tf.pad`` REFLECT; replicate and
    circular: ``tf.gather`` along each axis, since ``tf.pad`` has neither (its SYMMETRIC
    mirrors the edge, which equals replicate only for a pad of 1)."""
    paddings = [(0, 0), *pads, (0, 0)]
    if mode == "zeros":
        return tf.pad(x, paddings, constant_values=value)
    if mode == "reflect":
        return tf.pad(x, paddings, mode="REFLECT")
    for axis, (before, after) in enumerate(pads, start=1):
        x = tf.gather(x, torch_pad_indices(x.shape[axis], before, after, mode), axis=axis)
    return x


def _bias(y, use_bias):
    if not use_bias:
        return y
    return y + tf1.get_variable("bias", (y.shape[-1],), y.dtype, tf1.zeros_initializer())


def conv(x, filters, kernel_size, stride=1, padding=0, dilation=1, groups=1,
         padding_mode="zeros", use_bias=True, name="conv"):
    """torch's Conv1d/Conv2d: x (N, W, C) -> (N, W', filters) or (N, H, W, C) -> (N, H', W',
    filters); variables ``name/kernel`` (*kernel_size, C/groups, filters) and ``name/bias``
    (filters,), as Keras's Conv1D/Conv2D. `padding`: torch's ints (padded with
    `padding_mode`, then a VALID conv) or TF's 'SAME'/'VALID'.

    ``tf.nn.convolution`` does dilation by space-to-batch (the CPU conv kernels have none) and
    so refuses stride > 1 with dilation > 1. Groups are split by hand, as TF1 code did: the
    CPU kernels have no gradient for a grouped filter."""
    nd = x.shape.ndims - 2
    with tf1.variable_scope(name):
        kernel = tf1.get_variable("kernel", (*_ints(kernel_size, nd), x.shape[-1] // groups,
                                             filters), x.dtype)
        if not isinstance(padding, str):
            x, padding = pad(x, [(p, p) for p in _ints(padding, nd)], padding_mode), "VALID"
        pairs = zip(tf.split(x, groups, -1), tf.split(kernel, groups, -1))
        y = tf.concat([tf.nn.convolution(xg, kg, _ints(stride, nd), padding,
                                         dilations=_ints(dilation, nd))
                       for xg, kg in pairs], -1)
        return _bias(y, use_bias)


def depthwise_conv2d(x, depth_multiplier, kernel_size, stride=1, padding=0, dilation=1,
                     padding_mode="zeros", use_bias=True, name="depthwise_conv2d"):
    """torch's Conv2d(C, C*m, groups=C): x (N, H, W, C) -> (N, H', W', C*m), output channel
    c*m + j from input channel c; ``name/kernel`` (kh, kw, C, m) as Keras's DepthwiseConv2D.
    ``tf.nn.depthwise_conv2d`` needs equal strides in height and width."""
    with tf1.variable_scope(name):
        kernel = tf1.get_variable("kernel", (*_ints(kernel_size), x.shape[-1], depth_multiplier),
                                  x.dtype)
        if not isinstance(padding, str):
            x, padding = pad(x, [(p, p) for p in _ints(padding)], padding_mode), "VALID"
        y = tf.nn.depthwise_conv2d(x, kernel, (1, *_ints(stride), 1), padding,
                                   dilations=_ints(dilation))
        return _bias(y, use_bias)


def conv2d_transpose(x, filters, kernel_size, stride=1, padding=0, output_padding=0,
                     use_bias=True, name="conv2d_transpose"):
    """torch's ConvTranspose2d (dilation 1): x (N, H, W, C) -> (N, (H-1)*s - 2p + k + op, ...,
    filters); ``name/kernel`` (kh, kw, filters, C) as Keras's Conv2DTranspose.

    TF's ``conv2d_transpose`` with 'SAME' crops the odd row at the bottom/right, torch crops
    `padding` rows at the top/left and `padding - output_padding` at the bottom/right; so
    this takes the full 'VALID' output, longer by ``output_padding - padding`` rows where
    that is positive (rows that only get the bias, as in torch), and slices torch's rows."""
    k, s = _ints(kernel_size), _ints(stride)
    p, op = _ints(padding), _ints(output_padding)
    rows = [(n - 1) * si + ki for n, si, ki in zip(x.shape[1:3], s, k)]  # the full output
    full = [r + max(opi - pi, 0) for r, pi, opi in zip(rows, p, op)]
    size = [r - 2 * pi + opi for r, pi, opi in zip(rows, p, op)]
    with tf1.variable_scope(name):
        kernel = tf1.get_variable("kernel", (*k, filters, x.shape[-1]), x.dtype)
        y = tf1.nn.conv2d_transpose(x, kernel, tf.stack([tf.shape(x)[0], *full, filters]),
                                    (1, *s, 1), "VALID")
        return _bias(y[:, p[0]:p[0] + size[0], p[1]:p[1] + size[1]], use_bias)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """torch's MaxPool2d (floor mode): pads with -inf, not zeros, then a VALID max pool."""
    p = _ints(padding)
    x = pad(x, [(pi, pi) for pi in p], value=-np.inf) if any(p) else x
    return tf.nn.max_pool2d(x, kernel_size, stride or kernel_size, "VALID")


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """torch's AvgPool2d (floor mode). count_include_pad=True (torch's default) divides by
    the whole window, padding zeros included: zero-pad, then a VALID average. False divides
    by the real pixels only, as TF's 'SAME' does: divide by the VALID average of a padded
    map of ones."""
    p = [(pi, pi) for pi in _ints(padding)]
    stride = stride or kernel_size
    mean = tf.nn.avg_pool2d(pad(x, p), kernel_size, stride, "VALID")
    if count_include_pad or not any(map(any, p)):
        return mean
    return mean / tf.nn.avg_pool2d(pad(tf.ones_like(x[..., :1]), p), kernel_size, stride, "VALID")


def adaptive_bins(length, size):
    """torch's adaptive pooling windows: output i covers [floor(i*n/o), ceil((i+1)*n/o)),
    windows that overlap when `size` does not divide `length`."""
    return [(i * length // size, -(-(i + 1) * length // size)) for i in range(size)]


def adaptive_avg_pool2d(x, output_size):
    """torch's AdaptiveAvgPool2d: (N, H, W, C) -> (N, oh, ow, C); output size 1 is global
    average pooling (``tf.reduce_mean`` over H and W). A mean over a rectangle is the mean
    over its rows of the means over its columns, so rows and columns bin separately."""
    oh, ow = _ints(output_size)
    if (oh, ow) == (1, 1):
        return tf.reduce_mean(x, (1, 2), keepdims=True)
    rows = tf.concat([tf.reduce_mean(x[:, a:b], 1, keepdims=True)
                      for a, b in adaptive_bins(x.shape[1], oh)], 1)
    return tf.concat([tf.reduce_mean(rows[:, :, a:b], 2, keepdims=True)
                      for a, b in adaptive_bins(x.shape[2], ow)], 2)


def interpolate(x, size, mode="nearest", align_corners=None):
    """torch's F.interpolate(x, size=size, mode=mode) with TF1's resize ops:

    * 'nearest' (source floor(i*n/o)) is ``resize_nearest_neighbor``'s default; TF2's
      ``tf.image.resize`` and Keras do 'nearest-exact' (half-pixel centres) instead;
    * 'nearest-exact' is ``resize_nearest_neighbor(half_pixel_centers=True)``;
    * 'bilinear', align_corners False is ``resize_bilinear(half_pixel_centers=True)``, not
      its default (neither torch option); align_corners True is ``resize_bilinear(
      align_corners=True)``, which TF2's ``tf.image.resize`` lacks.
    TF's bilinear resize computes in float32 whatever the input dtype."""
    if mode == "bilinear":
        if align_corners:
            return tf1.image.resize_bilinear(x, size, align_corners=True)
        return tf1.image.resize_bilinear(x, size, half_pixel_centers=True)
    if mode not in ("nearest", "nearest-exact"):
        raise ValueError(f"mode {mode!r}: this twin has 'nearest', 'nearest-exact', 'bilinear'")
    return tf1.image.resize_nearest_neighbor(x, size, half_pixel_centers=mode == "nearest-exact")
