"""The layer rosetta's convolutions: Conv1d, Conv2d (stride, dilation, groups, padding modes,
even kernels), depthwise and transposed convolutions in torch, Keras 3 and TF1
(``tf1_compat.layers.conv``), with torch's weights converted by ``common.converters.conv``.

Each parity test checks the forward pass, the gradient of a fixed scalar loss with respect
to the input, and the weight gradients, which come back to torch's layout through
``to_torch``. All three run in float64, so the tolerance is TOL = 1e-9. The helpers here
serve test_layers_pool_resize.py, which holds this family's pitfall tests too.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from keras import layers
from torch import nn

from common.converters.base import ConversionError, lookup
from common.converters.conv import torch_pad_indices
from tf1_compat.layers import conv as tf1_conv

tf1 = tf.compat.v1
RNG = np.random.default_rng(17)
TOL = 1e-9
SCOPE = "layer"
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def last(a):
    """Channels-first (N, C, *spatial) -> channels-last (N, *spatial, C)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))


def probe(shape):
    """The fixed weights of the scalar loss sum(y * probe) for a channels-last output y: one
    formula over the channels-first order, so the loss is the same number in each layout."""
    first = (shape[0], shape[-1], *shape[1:-1])
    return last(np.cos(np.arange(np.prod(first))).reshape(first))


def torch_config(module):
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def run_torch(fn, x, params=()):
    """(output, input gradient, parameter gradients) of torch's fn, channels-last in and out."""
    xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    y = fn(xt)
    y_last = torch.movedim(y, 1, -1)
    loss = (y_last * torch.tensor(probe(tuple(y_last.shape)), dtype=y.dtype)).sum()
    grads = torch.autograd.grad(loss, [xt, *params])
    return last(y.detach()), last(grads[0]), [g.numpy() for g in grads[1:]]


def run_keras(fn, x, variables=()):
    """The same for Keras code `fn` (layers, and keras.ops around them)."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = fn(xt)
        loss = tf.reduce_sum(y * tf.cast(probe(tuple(y.shape)), y.dtype))
    grads = tape.gradient(loss, [xt, *variables])
    return y.numpy(), grads[0].numpy(), [g.numpy() for g in grads[1:]]


def run_tf1(build, x, weights=None):
    """The same for TF1 graph code, in its own tf.Graph; `weights` {variable name: value} are
    loaded by name ("layer/kernel"); the variables' gradients come back in that order."""
    with tf.Graph().as_default():
        xp = tf1.placeholder(x.dtype, x.shape)
        y = build(xp)
        loss = tf.reduce_sum(y * tf.cast(probe(tuple(y.shape)), y.dtype))
        variables = tf1.trainable_variables()
        assert sorted(v.op.name for v in variables) == sorted(weights or {})
        grads = tf1.gradients(loss, [xp, *variables])
        with tf1.Session() as sess:
            for v in variables:
                v.load(weights[v.op.name], sess)
            out, grad_x, *grad_w = sess.run([y, *grads], {xp: x})
    order = {v.op.name: g for v, g in zip(variables, grad_w)}
    return out, grad_x, [order[name] for name in weights or {}]


def assert_close(results, expected, tol):
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def check_weighted(module, keras_layer, tf1_build, shape, keras_fn=None, torch_fn=None):
    """Forward and gradient parity of torch `module` (inside `torch_fn`, e.g. after a pad),
    `keras_layer` (inside `keras_fn`) and `tf1_build`, with torch's weights converted by the
    registry."""
    x = RNG.normal(size=shape)
    keras_fn = keras_fn or keras_layer
    module.double()
    params = dict(module.named_parameters())
    expected = run_torch(torch_fn or module, x, params.values())
    keras_fn(tf.constant(x))
    converter = lookup(type(module).__name__)
    config, keras_config = torch_config(module), keras_layer.get_config()
    weights = converter.to_keras({k: v.detach().numpy() for k, v in params.items()},
                                 config, keras_config)
    keras_layer.set_weights(weights)
    named = {f"{SCOPE}/{n}": w for n, w in zip(converter.keras_names, weights)}
    for out, grad_x, grad_w in (run_keras(keras_fn, x, keras_layer.trainable_weights),
                                run_tf1(tf1_build, x, named)):
        back = converter.to_torch(grad_w, config, keras_config)
        assert list(back) == list(params)
        assert_close([out, grad_x, *back.values()], [*expected[:2], *expected[2]], TOL)


def keras_pad(x, pads, mode):
    """Keras twin of torch's padding_mode: keras.ops.take with torch's indices per axis
    (keras.ops.pad on TensorFlow has only constant, reflect and symmetric)."""
    for axis, (before, after) in enumerate(pads, start=1):
        x = keras.ops.take(x, torch_pad_indices(x.shape[axis], before, after, mode), axis=axis)
    return x


def k64(cls, *args, **kwargs):
    return cls(*args, dtype="float64", **kwargs)


def pad_then(mode, p=2):
    """Keras code: torch's padding_mode `mode` by `p`, then the 'valid' Keras layer."""
    return lambda layer, x: layer(keras_pad(x, [(p, p)] * (len(x.shape) - 2), mode))


# torch module, Keras layer, TF1 twin, Keras code around the layer, torch code around the module
CONV1D = {
    "same": (nn.Conv1d(4, 6, 3, padding=1), k64(layers.Conv1D, 6, 3, padding="same"),
             lambda x: tf1_conv.conv(x, 6, 3, padding=1, name=SCOPE)),
    "stride2_groups2": (nn.Conv1d(4, 6, 3, stride=2, groups=2),
                        k64(layers.Conv1D, 6, 3, strides=2, groups=2),
                        lambda x: tf1_conv.conv(x, 6, 3, stride=2, groups=2, name=SCOPE)),
    "dilation2_same": (nn.Conv1d(4, 6, 3, padding=2, dilation=2),
                       k64(layers.Conv1D, 6, 3, padding="same", dilation_rate=2),
                       lambda x: tf1_conv.conv(x, 6, 3, padding=2, dilation=2, name=SCOPE)),
    "causal": (nn.Conv1d(4, 6, 3, dilation=2), k64(layers.Conv1D, 6, 3, padding="causal",
                                                   dilation_rate=2),
               lambda x: tf1_conv.conv(tf1_conv.pad(x, [(4, 0)]), 6, 3, dilation=2, name=SCOPE),
               None, lambda module, x: module(F.pad(x, (4, 0)))),
    "replicate": (nn.Conv1d(4, 6, 3, padding=2, padding_mode="replicate"),
                  k64(layers.Conv1D, 6, 3), lambda x: tf1_conv.conv(
                      x, 6, 3, padding=2, padding_mode="replicate", name=SCOPE),
                  pad_then("replicate")),
}
CONV2D = {
    "stride2_pad1": (nn.Conv2d(3, 4, 3, stride=2, padding=1), k64(layers.Conv2D, 4, 3, strides=2),
                     lambda x: tf1_conv.conv(x, 4, 3, stride=2, padding=1, name=SCOPE),
                     lambda layer, x: layer(k64(layers.ZeroPadding2D, 1)(x))),
    "dilation2_same_nobias": (
        nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False),
        k64(layers.Conv2D, 4, 3, padding="same", dilation_rate=2, use_bias=False),
        lambda x: tf1_conv.conv(x, 4, 3, padding=2, dilation=2, use_bias=False, name=SCOPE)),
    "groups2": (nn.Conv2d(4, 6, 3, groups=2), k64(layers.Conv2D, 6, 3, groups=2),
                lambda x: tf1_conv.conv(x, 6, 3, groups=2, name=SCOPE)),
    "even_kernel_same": (nn.Conv2d(3, 4, 4, padding="same"),
                         k64(layers.Conv2D, 4, 4, padding="same"),
                         lambda x: tf1_conv.conv(x, 4, 4, padding="SAME", name=SCOPE)),
    **{f"padding_mode_{mode}": (
        nn.Conv2d(3, 4, 3, padding=2, padding_mode=mode), k64(layers.Conv2D, 4, 3),
        lambda x, mode=mode: tf1_conv.conv(x, 4, 3, padding=2, padding_mode=mode, name=SCOPE),
        pad_then(mode)) for mode in ("reflect", "replicate", "circular")},
}
DEPTHWISE = {
    "multiplier2_same": (nn.Conv2d(3, 6, 3, padding=1, groups=3),
                         k64(layers.DepthwiseConv2D, 3, padding="same", depth_multiplier=2),
                         lambda x: tf1_conv.depthwise_conv2d(x, 2, 3, padding=1, name=SCOPE)),
    "stride2_reflect": (nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, padding_mode="reflect"),
                        k64(layers.DepthwiseConv2D, 3, strides=2),
                        lambda x: tf1_conv.depthwise_conv2d(x, 1, 3, stride=2, padding=1,
                                                            padding_mode="reflect", name=SCOPE),
                        lambda layer, x: layer(keras.ops.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)],
                                                             "reflect"))),
    "as_grouped_conv2d": (nn.Conv2d(3, 6, 3, groups=3), k64(layers.Conv2D, 6, 3, groups=3),
                          lambda x: tf1_conv.conv(x, 6, 3, groups=3, name=SCOPE)),
}
CONV_TRANSPOSE = {
    "k4_s2_p1_same": (nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1),
                      k64(layers.Conv2DTranspose, 4, 4, strides=2, padding="same"),
                      lambda x: tf1_conv.conv2d_transpose(x, 4, 4, 2, 1, name=SCOPE)),
    "k3_s2_p1_op1_valid_cropped": (
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        k64(layers.Conv2DTranspose, 4, 3, strides=2),
        lambda x: tf1_conv.conv2d_transpose(x, 4, 3, 2, 1, 1, name=SCOPE),
        lambda layer, x: k64(layers.Cropping2D, ((1, 0), (1, 0)))(layer(x))),
    "k3_s2_p0_op1_nobias": (
        nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1, bias=False),
        k64(layers.Conv2DTranspose, 4, 3, strides=2, output_padding=1, use_bias=False),
        lambda x: tf1_conv.conv2d_transpose(x, 4, 3, 2, 0, 1, use_bias=False, name=SCOPE)),
    "k2_s3_gap": (nn.ConvTranspose2d(3, 4, 2, stride=3, output_padding=1),
                  k64(layers.Conv2DTranspose, 4, 2, strides=3),
                  lambda x: tf1_conv.conv2d_transpose(x, 4, 2, 3, 0, 1, name=SCOPE)),
}


def _check(case, shape):
    module, layer, tf1_build, keras_around, torch_around = (*case, None, None)[:5]
    check_weighted(module, layer, tf1_build, shape,
                   keras_around and (lambda x: keras_around(layer, x)),
                   torch_around and (lambda x: torch_around(module, x)))


@pytest.mark.parametrize("case", CONV1D)
def test_conv1d_parity(case):
    _check(CONV1D[case], (2, 9, 4))


@pytest.mark.parametrize("case", CONV2D)
def test_conv2d_parity(case):
    _check(CONV2D[case], (2, 7, 8, 4 if "groups" in case else 3))


@pytest.mark.parametrize("case", DEPTHWISE)
def test_depthwise_parity(case):
    _check(DEPTHWISE[case], (2, 7, 8, 3))


@pytest.mark.parametrize("case", CONV_TRANSPOSE)
def test_conv_transpose_parity(case):
    _check(CONV_TRANSPOSE[case], (2, 4, 5, 3))


def test_conv_registry_one_converter_for_conv2d_and_depthwise():
    """The torch name Conv2d finds one converter for both Keras twins; it picks the
    depthwise layout when the Keras config has depth_multiplier (test_depthwise_parity)."""
    assert lookup("Conv2d") is lookup("Conv2D") is lookup("DepthwiseConv2D")
    assert lookup("Conv1d") is lookup("Conv1D")
    assert lookup("ConvTranspose2d") is lookup("Conv2DTranspose")


@pytest.mark.parametrize("case", ["conv1d", "conv2d_groups", "depthwise", "conv_transpose"])
def test_conv_round_trip(case):
    """to_torch(to_keras(tensors)) gives torch's tensors back, bit for bit; a tensor of the
    wrong shape is refused."""
    module, layer = {"conv1d": CONV1D["stride2_groups2"], "conv2d_groups": CONV2D["groups2"],
                     "depthwise": DEPTHWISE["multiplier2_same"],
                     "conv_transpose": CONV_TRANSPOSE["k3_s2_p1_op1_valid_cropped"]}[case][:2]
    converter, config = lookup(type(module).__name__), torch_config(module)
    tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    back = converter.to_torch(converter.to_keras(tensors, config, layer.get_config()), config,
                              layer.get_config())
    assert list(back) == list(tensors)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ConversionError, match="torch weight has shape"):
        converter.to_keras({**tensors, "weight": tensors["weight"][:1]}, config,
                           layer.get_config())


REFUSED = {  # torch module, Keras layer, words of the error
    "conv2d_same_stride2": (nn.Conv2d(3, 4, 3, 2, 1), layers.Conv2D(4, 3, 2, "same"),
                            "ZeroPadding2D(1)"),
    "conv2d_same_even_kernel": (nn.Conv2d(3, 4, 4, padding=2), layers.Conv2D(4, 4, padding="same"),
                                "pads (1, 2)"),
    "conv2d_same_reflect": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                            layers.Conv2D(4, 3, padding="same"), "padding_mode='reflect'"),
    "conv2d_groups": (nn.Conv2d(4, 6, 3, groups=2), layers.Conv2D(6, 3), "groups differs"),
    "conv2d_bias": (nn.Conv2d(3, 4, 3, bias=False), layers.Conv2D(4, 3), "bias differs"),
    "depthwise_multiplier": (nn.Conv2d(3, 6, 3, groups=3), layers.DepthwiseConv2D(3),
                             "depth_multiplier"),
    "depthwise_of_full_conv": (nn.Conv2d(3, 6, 3), layers.DepthwiseConv2D(3, depth_multiplier=2),
                               "groups=in_channels"),
    "conv1d_causal_padded": (nn.Conv1d(4, 6, 3, padding=1), layers.Conv1D(6, 3, padding="causal"),
                             "causal"),
    "conv_transpose_k3_s2_p1_op1_same": (
        nn.ConvTranspose2d(3, 4, 3, 2, 1, 1), layers.Conv2DTranspose(4, 3, 2, "same"),
        "twin: padding='valid', output_padding=(0, 0), then keras.layers.Cropping2D(((1, 0), "
        "(1, 0)))"),
    "conv_transpose_same_output_padding1": (
        nn.ConvTranspose2d(3, 4, 3, 2, 1, 1),
        layers.Conv2DTranspose(4, 3, 2, "same", output_padding=1), "crops ((0, 1), (0, 1))"),
    "conv_transpose_groups": (nn.ConvTranspose2d(4, 4, 3, groups=2), layers.Conv2DTranspose(4, 3),
                              "no groups"),
    "conv_transpose_no_twin": (nn.ConvTranspose2d(3, 4, 3, output_padding=1, dilation=2),
                               layers.Conv2DTranspose(4, 3, dilation_rate=2), "twin: none"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_conv_refuses_pairs_without_exact_twin(case):
    """Pairs that compute different functions raise one ConversionError naming the fix,
    torch to Keras and back (to_torch checks the configs before reading the weights)."""
    module, layer, words = REFUSED[case]
    converter, config = lookup(type(module).__name__), torch_config(module)
    tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    with pytest.raises(ConversionError) as refused:
        converter.to_keras(tensors, config, layer.get_config())
    assert words in str(refused.value)
    if case != "conv2d_bias":  # to_torch takes the bias from the Keras layer
        with pytest.raises(ConversionError):
            converter.to_torch([], config, layer.get_config())
