"""porting: a user's own model's weights torch <-> Keras 3 (and TF1) through the converter
registry, and the layer-by-layer comparison.

The models are small twins written the way users write them: torch nn.Modules and Keras
Functional / Subclassing models with the same layer names. Outputs must agree within 1e-5
(float32) after a transfer in either direction; a failed transfer changes nothing.
"""
import numpy as np
import pytest
import torch
from torch import nn

import keras
import porting
import tensorflow as tf
from keras import layers

TOL = 1e-5
rng = np.random.default_rng(0)


def randomize(model):
    """Random weights everywhere (variances positive), so no layer converts by luck."""
    def values(name, shape):
        return rng.uniform(0.5, 1.5, shape) if "var" in name else rng.uniform(-.5, .5, shape)

    if isinstance(model, nn.Module):
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(torch.from_numpy(values(name, tensor.shape)))
    else:
        model.set_weights([values(v.path, v.shape) for v in model.weights])
    return model


def torch_out(model, x):
    with torch.no_grad():
        return model.eval()(x).numpy()


class ImageNet(nn.Module):
    """Conv, batch norm, depthwise conv, group norm, transposed conv, max pool, a Linear on
    the flattened map (torch.flatten: found by tracing), layer norm, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 16)
        self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.norm = nn.LayerNorm(10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):  # (B, 3, 6, 6)
        h = self.gn(self.depthwise(torch.relu(self.bn(self.conv(x)))))
        h = torch.flatten(self.pool(self.up(nn.functional.gelu(h))), 1)
        return self.out(self.norm(self.fc(h)))


def keras_image_net():
    inp = keras.Input((6, 6, 3))
    h = layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    h = layers.ReLU()(layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")(h))
    h = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="depthwise")(h)
    h = layers.Activation("gelu")(layers.GroupNormalization(4, epsilon=1e-5, name="gn")(h))
    h = layers.Conv2DTranspose(8, 4, strides=2, padding="same", name="up")(h)
    h = layers.Flatten()(layers.MaxPooling2D(3)(h))
    h = layers.LayerNormalization(epsilon=1e-5, name="norm")(layers.Dense(10, name="fc")(h))
    return keras.Model(inp, layers.Dense(3, name="out")(h))


class SeqNet(nn.Module):
    """Embedding, Conv1d, a 2-layer bidirectional LSTM, GRU, multi-head attention, layer
    norm, Linear on the last step."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 6, batch_first=True)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, ids):  # (B, T) ints
        h = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        h, _ = self.gru(self.lstm(h)[0])
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a)[:, -1])


def keras_seq_net():
    inp = keras.Input((7,), dtype="int32")
    h = layers.Conv1D(8, 3, padding="same", name="conv")(layers.Embedding(20, 8, name="embed")(inp))
    for i in range(2):
        h = layers.Bidirectional(layers.LSTM(6, return_sequences=True), name=f"lstm_l{i}")(h)
    h = layers.GRU(6, return_sequences=True, name="gru")(h)
    a = layers.MultiHeadAttention(2, 3, name="attn")(h, h)
    h = layers.LayerNormalization(epsilon=1e-5, name="norm")(layers.Add()([h, a]))
    return keras.Model(inp, layers.Dense(4, name="head")(h[:, -1]))


MODELS = {"image": (ImageNet, keras_image_net, lambda: rng.normal(size=(2, 6, 6, 3)).astype("f")),
          "sequence": (SeqNet, keras_seq_net, lambda: rng.integers(0, 20, size=(2, 7)))}


def outputs(net, km, x):
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)
    return torch_out(net, tx), np.asarray(km(x, training=False))


@pytest.mark.parametrize("direction", ["torch_to_keras", "keras_to_torch"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_transfer_mixed_model_conv_lstm_gru_mha_norms_embedding(kind, direction):
    """Eight-plus layer types in one model agree within 1e-5 after a transfer either way."""
    torch_net, keras_net, sample = MODELS[kind]
    net, km, x = torch_net(), keras_net(), sample()
    if direction == "torch_to_keras":
        names = porting.transfer(randomize(net), km)
    else:
        names = porting.transfer(randomize(km), net)
    assert {"conv", "norm"} <= set(names)
    t, k = outputs(net, km, x)
    np.testing.assert_allclose(k, t, rtol=0, atol=TOL)
    assert porting.compare(net, km, x).first_divergence is None


class CourseCNN(nn.Module):
    """The course manual's CNN: conv, pool, flatten, dense."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.dense = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.dense(self.flatten(self.pool(torch.relu(self.conv(x)))))


class KerasCourseCNN(keras.Model):
    """Its Keras Subclassing twin, with the same attribute names."""

    def __init__(self):
        super().__init__()
        self.conv = layers.Conv2D(8, 3, padding="same", activation="relu")
        self.pool = layers.MaxPooling2D(2)
        self.flatten = layers.Flatten()
        self.dense = layers.Dense(10)
        self(np.zeros((1, 8, 8, 3), "f"))

    def call(self, x):
        return self.dense(self.flatten(self.pool(self.conv(x))))


@pytest.mark.parametrize("direction", ["torch_to_keras", "keras_to_torch"])
def test_transfer_course_cnn_subclassing_with_flatten_permutation(direction):
    """The dense layer after the flatten gets the (C, H, W) -> (H, W, C) row permutation,
    found by tracing; without it (flatten_shape={}: no flatten) the outputs differ."""
    net, km, x = CourseCNN(), KerasCourseCNN(), rng.normal(size=(2, 8, 8, 3)).astype("f")
    source, target = (randomize(net), km) if direction == "torch_to_keras" else (randomize(km), net)
    porting.transfer(source, target, flatten_shape={})
    t, k = outputs(net, km, x)
    assert np.abs(k - t).max() > 1e-2, "the wrong way: the flatten order left as it is"
    porting.transfer(source, target)
    t, k = outputs(net, km, x)
    np.testing.assert_allclose(k, t, rtol=0, atol=TOL)
    report = porting.compare(net, km, x)
    assert [row.layer for row in report.rows] == ["conv", "pool", "flatten", "dense", "(output)"]
    assert report.first_divergence is None, report


def test_transfer_flatten_shape_given_instead_of_traced():
    """For a model that cannot be traced: the flattened map's (C, H, W), by Linear path."""
    net, km = randomize(CourseCNN()), KerasCourseCNN()
    porting.transfer(net, km, flatten_shape={"dense": (8, 4, 4)})
    x = rng.normal(size=(2, 8, 8, 3)).astype("f")
    np.testing.assert_allclose(*outputs(net, km, x), rtol=0, atol=TOL)


class Mismatched(nn.Module):
    """Every kind of mismatch at once; no forward, so the flatten order cannot be traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU()            # weights, no converter
        self.extra = nn.Linear(4, 4)     # no Keras partner
        self.dense = nn.Linear(8 * 4 * 4, 7)


def keras_mismatched():
    inp = keras.Input((8, 8, 3))
    h = layers.Conv2D(8, 5, padding="same", name="conv")(inp)             # torch's kernel is 3
    h = layers.Dense(8, name="act")(layers.MaxPooling2D(2)(h))
    h = layers.Dense(10, name="dense")(layers.Flatten()(layers.MaxPooling2D(2)(h)))
    return keras.Model(inp, layers.Dense(2, name="lonely")(h))


@pytest.mark.parametrize("direction", ["torch_to_keras", "keras_to_torch"])
def test_transfer_mismatch_names_every_culprit_and_changes_nothing(direction):
    """One TransferError lists all six problems (kernel size, no PReLU converter, a partner
    missing on each side, Dense units, an untraceable flatten order); neither model changes."""
    net, km = randomize(Mismatched()), randomize(keras_mismatched())
    before = ({k: v.clone() for k, v in net.state_dict().items()}, km.get_weights())
    with pytest.raises(porting.TransferError) as caught:
        porting.transfer(net, km) if direction == "torch_to_keras" else porting.transfer(km, net)
    message = str(caught.value)
    for culprit in ("conv: ", "act: ", "PReLU", "extra: ", "dense: ", "lonely: ", "sample="):
        assert culprit in message, message
    assert isinstance(caught.value, ValueError) and len(caught.value.problems) == 6
    assert all(torch.equal(before[0][k], v) for k, v in net.state_dict().items())
    assert all(np.array_equal(a, b) for a, b in zip(before[1], km.get_weights()))


def test_transfer_round_trip_torch_keras_torch_is_lossless():
    """Every conversion is a permutation or a copy: the tensors come back bit for bit."""
    net, back, km = randomize(ImageNet()), ImageNet(), keras_image_net()
    porting.transfer(net, km, sample=np.zeros((1, 6, 6, 3), "f"))
    porting.transfer(km, back)
    for name, tensor in net.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_transfer_round_trip_lstm_keeps_the_bias_sum():
    """Keras has one LSTM bias: back in torch it is bias_ih, with bias_hh zero (same sum)."""
    net, back, km = randomize(SeqNet()), SeqNet(), keras_seq_net()
    porting.transfer(net, km)
    porting.transfer(km, back)
    state, again = net.state_dict(), back.state_dict()
    for name, tensor in state.items():
        if name.startswith("lstm.bias_ih"):
            hh = name.replace("ih", "hh")
            np.testing.assert_allclose(again[name], tensor + state[hh], rtol=0, atol=1e-7)
            assert not again[hh].any()
        elif not name.startswith("lstm.bias_hh"):
            assert torch.equal(again[name], tensor), name


def test_compare_names_the_first_diverging_layer():
    """One GroupNorm scale moved by 1e-3: the rows before it agree, the report names it."""
    net, km, x = randomize(ImageNet()), keras_image_net(), rng.normal(size=(2, 6, 6, 3)).astype("f")
    porting.transfer(net, km)
    with torch.no_grad():
        net.gn.weight[3] += 1e-3
    report = porting.compare(net, km, x)
    assert report.first_divergence.layer == "gn"
    assert all(row.max_abs_diff <= TOL for row in report.rows[:3]), report
    text = str(report)
    assert "first layer beyond atol=1e-05: gn" in text and "GroupNormalization" in text


def test_compare_gives_a_conv1d_its_channels_first_input():
    """Keras-layout (B, T, C) inputs reach a torch Conv1d that reads the input as (B, C, T)."""
    net, km = randomize(nn.Sequential(nn.Conv1d(4, 5, 3))), keras.Sequential(
        [keras.Input((9, 4)), layers.Conv1D(5, 3, name="0")])
    porting.transfer(net, km)
    report = porting.compare(net, km, rng.normal(size=(2, 9, 4)).astype("f"))
    assert report.rows[0][:2] == ("0", "Conv1d") and report.first_divergence is None, report


def test_tf1_values_fill_a_dense_and_conv_graph_by_scope():
    """torch's conv + Linear in TF1 variables conv/kernel, conv/bias, fc/kernel, fc/bias."""
    conv, fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 6)
    randomize(conv), randomize(fc)
    x = rng.normal(size=(2, 5, 5, 3)).astype("f")
    expected = torch_out(nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc),
                         torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        inp = tf1.placeholder(tf.float32, (None, 5, 5, 3))
        with tf1.variable_scope("conv"):
            h = tf.nn.conv2d(inp, tf1.get_variable("kernel", (3, 3, 3, 4)), 1, "SAME")
            h = tf.nn.relu(h + tf1.get_variable("bias", (4,)))
        with tf1.variable_scope("fc"):
            h = tf.matmul(tf.reshape(h, (-1, 100)), tf1.get_variable("kernel", (100, 6)))
            h += tf1.get_variable("bias", (6,))
        values = porting.tf1_values(
            {"conv": conv, "fc": fc}, {"conv": layers.Conv2D(4, 3, padding="same"),
                                       "fc": layers.Dense(6)},
            tf1.global_variables(), flatten_shape={"fc": (4, 5, 5)})
        assert sorted(values) == ["conv/bias", "conv/kernel", "fc/bias", "fc/kernel"]
        with pytest.raises(porting.TransferError, match="fc: .*output size"):
            porting.tf1_values({"fc": fc}, {"fc": layers.Dense(7)}, tf1.global_variables())
        with tf1.Session() as session:
            porting.tf1_load(session, values)
            got = session.run(h, {inp: x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
