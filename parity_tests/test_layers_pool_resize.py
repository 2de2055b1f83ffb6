"""The layer rosetta's weightless layers of the conv family in torch, Keras 3 and TF1
(``tf1_compat.layers.conv``): max and average pooling, adaptive and global average pooling,
F.interpolate / Upsample and F.pad's modes; then the family's named pitfalls, those of the
convolutions too (test_layers_conv.py, whose helpers serve here, is full).

Parity: forward and input gradient, in float64 (TOL = 1e-9), except bilinear resizing,
which TensorFlow computes in float32 whatever the input: RESIZE_TOL = 1e-5 (relative and
absolute; measured at most 7e-7 on unit-variance inputs).
"""
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch.nn.functional as F
from keras import layers
from torch import nn

from common.converters.base import ConversionError, lookup
from common.converters.conv import keras_transpose_crops
from parity_tests.test_layers_conv import (TOL, assert_close, k64, keras_pad, run_keras,
                                           run_tf1, run_torch, torch_config)
from tf1_compat.layers import conv as tf1_conv

tf1 = tf.compat.v1
RNG = np.random.default_rng(1717)
RESIZE_TOL = 1e-5
PADS = [(0, 0), (2, 2), (2, 2), (0, 0)]
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _check(torch_fn, keras_fn, tf1_fn, shape=(2, 7, 8, 3), tol=TOL):
    """Forward and input-gradient parity; keras_fn None where Keras has no twin (a pitfall
    test below shows it)."""
    x = RNG.normal(size=shape)
    expected = run_torch(torch_fn, x)[:2]
    assert_close(run_tf1(tf1_fn, x)[:2], expected, tol)
    if keras_fn is not None:
        assert_close(run_keras(keras_fn, x)[:2], expected, tol)


POOL = {  # torch, Keras and TF1 code on (2, 7, 8, 3) inputs
    "max_pool_k2": (lambda x: F.max_pool2d(x, 2), k64(layers.MaxPooling2D, 2),
                    lambda x: tf1_conv.max_pool2d(x, 2)),
    "max_pool_k3_s2_p1": (nn.MaxPool2d(3, 2, 1), lambda x: k64(layers.MaxPooling2D, 3, 2)(
        keras.ops.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-np.inf)),
        lambda x: tf1_conv.max_pool2d(x, 3, 2, 1)),
    "avg_pool_count_include_pad": (
        nn.AvgPool2d(3, 1, 1), lambda x: k64(layers.AveragePooling2D, 3, 1)(
            k64(layers.ZeroPadding2D, 1)(x)), lambda x: tf1_conv.avg_pool2d(x, 3, 1, 1)),
    "avg_pool_exclude_pad": (
        nn.AvgPool2d(3, 1, 1, count_include_pad=False), k64(layers.AveragePooling2D, 3, 1, "same"),
        lambda x: tf1_conv.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
    "adaptive_avg_pool_3x3": (nn.AdaptiveAvgPool2d(3), k64(layers.AdaptiveAveragePooling2D, 3),
                              lambda x: tf1_conv.adaptive_avg_pool2d(x, 3)),
    "global_avg_pool": (nn.AdaptiveAvgPool2d(1), k64(layers.GlobalAveragePooling2D, keepdims=True),
                        lambda x: tf1_conv.adaptive_avg_pool2d(x, 1)),
}
PAD = {
    "pad_reflect": (lambda x: F.pad(x, (2, 2, 2, 2), "reflect"),
                    lambda x: keras.ops.pad(x, PADS, "reflect"),
                    lambda x: tf1_conv.pad(x, PADS[1:3], "reflect")),
    **{f"pad_{mode}": (lambda x, mode=mode: F.pad(x, (2, 2, 2, 2), mode),
                       lambda x, mode=mode: keras_pad(x, PADS[1:3], mode),
                       lambda x, mode=mode: tf1_conv.pad(x, PADS[1:3], mode))
       for mode in ("replicate", "circular")},
    "pad_constant_last_axis_first": (  # F.pad lists (left, right, top, bottom)
        lambda x: F.pad(x, (1, 2, 0, 3), value=0.5),
        lambda x: keras.ops.pad(x, [(0, 0), (0, 3), (1, 2), (0, 0)], constant_values=0.5),
        lambda x: tf1_conv.pad(x, [(0, 3), (1, 2)], value=0.5)),
}
RESIZE = {  # torch, Keras (None: no twin), TF1, tolerance; inputs 7x8
    "interpolate_nearest_x2": (nn.Upsample(scale_factor=2), k64(layers.UpSampling2D, 2),
                               lambda x: tf1_conv.interpolate(x, (14, 16)), TOL),
    "interpolate_nearest_non_integer": (lambda x: F.interpolate(x, (10, 11)), None,
                                        lambda x: tf1_conv.interpolate(x, (10, 11)), TOL),
    "interpolate_nearest_exact": (
        lambda x: F.interpolate(x, (10, 11), mode="nearest-exact"),
        k64(layers.Resizing, 10, 11, "nearest"),
        lambda x: tf1_conv.interpolate(x, (10, 11), "nearest-exact"), TOL),
    **{f"interpolate_bilinear_{h}x{w}": (
        lambda x, size=(h, w): F.interpolate(x, size, mode="bilinear"),
        k64(layers.Resizing, h, w),
        lambda x, size=(h, w): tf1_conv.interpolate(x, size, "bilinear"), RESIZE_TOL)
       for h, w in ((10, 11), (4, 5))},
    "upsample_bilinear_x2": (nn.Upsample(scale_factor=2, mode="bilinear"),
                             k64(layers.UpSampling2D, 2, interpolation="bilinear"),
                             lambda x: tf1_conv.interpolate(x, (14, 16), "bilinear"), RESIZE_TOL),
    "interpolate_bilinear_align_corners": (
        lambda x: F.interpolate(x, (10, 11), mode="bilinear", align_corners=True), None,
        lambda x: tf1_conv.interpolate(x, (10, 11), "bilinear", align_corners=True), RESIZE_TOL),
}


@pytest.mark.parametrize("case", POOL)
def test_pool_parity(case):
    _check(*POOL[case])


@pytest.mark.parametrize("case", PAD)
def test_pad_parity(case):
    _check(*PAD[case])


@pytest.mark.parametrize("case", RESIZE)
def test_interpolate_parity(case):
    *fns, tol = RESIZE[case]
    _check(*fns, tol=tol)


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _torch(fn, x):
    """torch's fn on a channels-last array, channels-last out."""
    return run_torch(fn, x)[0]


def _tf1(fn, x):
    return run_tf1(fn, x)[0]


# -- pooling and padding -----------------------------------------------------------------------
def test_pitfall_avg_pool_count_include_pad():
    """torch's AvgPool2d divides by the whole window, padding zeros included
    (count_include_pad=True, the default); Keras 'same' and TF's 'SAME' divide by the real
    pixels only, which is count_include_pad=False. Right: zero-pad, then 'valid'."""
    x = RNG.normal(size=(1, 5, 5, 2))
    expected = _torch(nn.AvgPool2d(3, 1, 1), x)
    assert _diff(layers.AveragePooling2D(3, 1, "same", dtype="float64")(x), expected) > 0.1
    assert _diff(_torch(nn.AvgPool2d(3, 1, 1, count_include_pad=False), x),
                 layers.AveragePooling2D(3, 1, "same", dtype="float64")(x)) < TOL
    assert _diff(_tf1(lambda t: tf1_conv.avg_pool2d(t, 3, 1, 1), x), expected) < TOL


def test_pitfall_max_pool_pads_minus_infinity():
    """torch's MaxPool2d pads with -inf: ZeroPadding2D + 'valid' lets the border zeros win
    wherever a window holds only negative numbers. Right: pad with -inf."""
    x = -np.abs(RNG.normal(size=(1, 6, 6, 2)))
    expected = _torch(nn.MaxPool2d(3, 2, 1), x)
    assert _diff(layers.MaxPooling2D(3, 2, dtype="float64")(layers.ZeroPadding2D(1)(x)),
                 expected) > 0.1
    assert _diff(_tf1(lambda t: tf1_conv.max_pool2d(t, 3, 2, 1), x), expected) < TOL


@pytest.mark.parametrize("p", [1, 2])
def test_pitfall_replicate_padding_is_not_symmetric(p):
    """torch's replicate repeats the edge value; tf.pad's SYMMETRIC mirrors the border,
    which repeats the edge only for a pad of 1. tf.pad and keras.ops.pad (on TensorFlow) have
    no edge mode: right is a gather with torch's indices (keras_pad, tf1_conv.pad)."""
    x = RNG.normal(size=(1, 4, 5, 2))
    pads = [(0, 0), (p, p), (p, p), (0, 0)]
    expected = _torch(lambda t: F.pad(t, (p,) * 4, "replicate"), x)
    symmetric = _diff(tf.pad(x, pads, "SYMMETRIC"), expected)
    assert symmetric > 0.1 if p >= 2 else symmetric == 0
    assert _diff(keras_pad(x, pads[1:3], "replicate"), expected) == 0
    assert _diff(_tf1(lambda t: tf1_conv.pad(t, pads[1:3], "replicate"), x), expected) == 0


# -- resizing -------------------------------------------------------------------------------------
def test_pitfall_interpolate_bilinear_tf1_default():
    """TF1's resize_bilinear defaults to neither torch option (align_corners=False,
    half_pixel_centers=False); torch's default align_corners=False is half_pixel_centers=True,
    as in TF2's tf.image.resize and Keras."""
    x = RNG.normal(size=(1, 4, 4, 2))
    expected = _torch(lambda t: F.interpolate(t, (8, 8), mode="bilinear"), x)
    assert _diff(_tf1(lambda t: tf1.image.resize_bilinear(t, (8, 8)), x), expected) > 0.3
    right = _tf1(lambda t: tf1_conv.interpolate(t, (8, 8), "bilinear"), x)
    assert _diff(right, expected) < RESIZE_TOL
    assert _diff(tf.image.resize(x, (8, 8)), expected) < RESIZE_TOL


def test_pitfall_interpolate_align_corners_true_has_no_tf2_twin():
    """align_corners=True maps the corner pixels onto each other; TF2's tf.image.resize and
    Keras's Resizing/UpSampling2D have no such option (half-pixel centres only): only TF1's
    resize_bilinear(align_corners=True) matches."""
    x = RNG.normal(size=(1, 4, 4, 2))
    expected = _torch(lambda t: F.interpolate(t, (8, 8), mode="bilinear", align_corners=True), x)
    assert "align_corners" not in inspect.signature(tf.image.resize).parameters
    assert "align_corners" not in inspect.signature(layers.Resizing).parameters
    upsampled = layers.UpSampling2D(2, interpolation="bilinear")(x)
    for tf2_way in (tf.image.resize(x, (8, 8)), upsampled):
        assert _diff(tf2_way, expected) > 0.1
    assert _diff(_tf1(lambda t: tf1_conv.interpolate(t, (8, 8), "bilinear", True), x),
                 expected) < RESIZE_TOL


def test_pitfall_interpolate_nearest_non_integer_scale():
    """torch's 'nearest' takes source pixel floor(i*n/o); TF2 and Keras take the nearest
    half-pixel centre, which is torch's 'nearest-exact'. They agree for integer upscaling
    and differ for 5 -> 7. TF1's resize_nearest_neighbor default is torch's 'nearest'."""
    x = RNG.normal(size=(1, 5, 5, 2))
    nearest = _torch(lambda t: F.interpolate(t, (7, 7)), x)
    exact = _torch(lambda t: F.interpolate(t, (7, 7), mode="nearest-exact"), x)
    assert _diff(layers.Resizing(7, 7, "nearest", dtype="float64")(x), nearest) > 0.5
    assert _diff(layers.Resizing(7, 7, "nearest", dtype="float64")(x), exact) == 0
    assert _diff(_tf1(lambda t: tf1_conv.interpolate(t, (7, 7)), x), nearest) == 0
    assert _diff(layers.UpSampling2D(2, dtype="float64")(x),
                 _torch(lambda t: F.interpolate(t, scale_factor=2), x)) == 0


# -- convolutions ---------------------------------------------------------------------------------
def _converted(module, layer):
    """torch's float64 module's weights through the registry, and its weight tensor."""
    tensors = {k: v.detach().numpy() for k, v in module.double().state_dict().items()}
    converter = lookup(type(module).__name__)
    return converter.to_keras(tensors, torch_config(module), layer.get_config()), tensors["weight"]


def _keras_diffs(layer, kernels, bias, x, expected):
    """max |Keras - torch| with each of `kernels` (and `bias`) set into `layer`."""
    layer(x)
    diffs = []
    for kernel in kernels:
        layer.set_weights([kernel, bias])
        diffs.append(_diff(layer(x), expected))
    return diffs


def test_pitfall_depthwise_multiplier_order():
    """torch's depthwise output channel c*m + j is multiplier j of input channel c, and the
    Keras DepthwiseConv2D kernel (kh, kw, C, m) keeps that order: C*m splits as (C, m). Split
    as (m, C), the shapes still fit and the numbers are wrong."""
    module = nn.Conv2d(3, 6, 3, padding=1, groups=3)
    layer = k64(layers.DepthwiseConv2D, 3, padding="same", depth_multiplier=2)
    (kernel, bias), weight = _converted(module, layer)
    wrong = weight.reshape(2, 3, 3, 3).transpose(2, 3, 1, 0)  # (m, C, kh, kw) -> (kh, kw, C, m)
    assert wrong.shape == kernel.shape
    x = RNG.normal(size=(1, 5, 5, 3))
    wrong_diff, right_diff = _keras_diffs(layer, [wrong, kernel], bias, x, _torch(module, x))
    assert wrong_diff > 0.1 and right_diff < TOL


def test_pitfall_conv_transpose_kernel_in_out_order():
    """Both frameworks store a transposed conv's kernel with in and out swapped (torch (in,
    out, kh, kw), Keras (kh, kw, out, in)), so the permutation is transpose(2, 3, 1, 0);
    writing Keras's kernel as (kh, kw, in, out), as for Conv2D, fails on the shapes only when
    in != out."""
    module = nn.ConvTranspose2d(3, 3, 4, 2, 1)
    layer = k64(layers.Conv2DTranspose, 3, 4, 2, "same")
    (kernel, bias), weight = _converted(module, layer)
    x = RNG.normal(size=(1, 4, 4, 3))
    wrong_diff, right_diff = _keras_diffs(layer, [weight.transpose(2, 3, 0, 1), kernel], bias, x,
                                          _torch(module, x))
    assert wrong_diff > 0.1 and right_diff < TOL


def test_pitfall_conv_transpose_output_padding_is_not_same():
    """torch's kernel 3, stride 2, padding 1, output_padding 1 doubles the size as Keras
    'same' does, but torch crops the full output's first row and column, TF its last ones
    (keras_transpose_crops). Keras 'same', 'same' with output_padding=1 and TF1's
    conv2d_transpose 'SAME' all differ; exact: 'valid', then Cropping2D(((1, 0), (1, 0))),
    which the converter names when it refuses 'same'."""
    module = nn.ConvTranspose2d(3, 4, 3, 2, 1, 1)
    (kernel, bias), _ = _converted(module, k64(layers.Conv2DTranspose, 4, 3, 2))
    x = RNG.normal(size=(1, 4, 5, 3))
    expected = _torch(module, x)
    same = k64(layers.Conv2DTranspose, 4, 3, 2, "same")
    wrong = _keras_diffs(same, [kernel], bias, x, expected)
    wrong += _keras_diffs(k64(layers.Conv2DTranspose, 4, 3, 2, "same", output_padding=1),
                          [kernel], bias, x, expected)
    wrong.append(_diff(_tf1(lambda t: tf1.nn.conv2d_transpose(t, kernel, (1, 8, 10, 4), 2, "SAME")
                            + bias, x), expected))
    assert min(wrong) > 0.1
    valid = k64(layers.Conv2DTranspose, 4, 3, 2)
    valid(x)
    valid.set_weights([kernel, bias])
    assert _diff(k64(layers.Cropping2D, ((1, 0), (1, 0)))(valid(x)), expected) < TOL
    assert keras_transpose_crops(same.get_config()) == ((0, 1), (0, 1))
    with pytest.raises(ConversionError, match=r"Cropping2D\(\(\(1, 0\), \(1, 0\)\)\)"):
        _converted(module, same)


def test_pitfall_conv_same_even_kernel():
    """'same' with kernel 4 needs 3 padding rows: TF pads (1, 2), the extra one at the end,
    and so does torch's padding='same'. The odd-kernel habit padding=k//2 pads (2, 2) and
    gives one row more; padding (2, 1) shifts the output. Right: torch padding='same', or
    F.pad (1, 2) before a padding 0 conv; the converter refuses padding=2 against 'same'."""
    module = nn.Conv2d(3, 4, 4, padding="same")
    layer = k64(layers.Conv2D, 4, 4, padding="same")
    (kernel, bias), _ = _converted(module, layer)
    x = RNG.normal(size=(1, 6, 6, 3))
    layer(x)
    layer.set_weights([kernel, bias])
    keras_out = layer(x).numpy()
    w, b = module.weight, module.bias

    def padded(pads):
        return _torch(lambda t: F.conv2d(F.pad(t, pads), w, b), x)

    assert _torch(lambda t: F.conv2d(t, w, b, padding=2), x).shape[1:3] == (7, 7)
    assert _diff(padded((2, 1, 2, 1)), keras_out) > 0.1
    assert _diff(padded((1, 2, 1, 2)), keras_out) < TOL
    assert _diff(_torch(module, x), keras_out) < TOL
    with pytest.raises(ConversionError, match=r"pads \(1, 2\)"):
        _converted(nn.Conv2d(3, 4, 4, padding=2), layer)
