"""The hyper-parameters and architecture sizes every implementation shares.

Defaults follow the course manual the project grew from. Every implementation
reads them from here so that the pairs train the same thing.
"""
from dataclasses import dataclass

# Training defaults (Adam, batch 100, 50 epochs).
LEARNING_RATE = 1e-3
BATCH_SIZE = 100
EPOCHS = 50
SEED = 0

# Adam's constants. torch's eps default is 1e-8, Keras's is 1e-7 and TF1's
# AdamOptimizer's is 1e-8: the TF implementations pass ADAM_EPS explicitly.
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8

# Batch norm in torch's convention: eps 1e-5 and momentum 0.1 weighting the *new*
# batch statistic. Keras's defaults are eps 1e-3 and momentum 0.99 weighting the
# *old* moving value, so the TF side uses eps=BN_EPS, momentum=1 - BN_MOMENTUM.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

# MLP regression: in -> 100 -> 100 -> 1 with ReLU.
MLP_HIDDEN = (100, 100)

# CNN classification: three blocks of (conv 3x3 'same', batch norm, ReLU, 2x2 max
# pool), the textbook order, then fc 100, ReLU, dropout, fc 100, ReLU, fc classes.
# A convolution followed by batch norm has no bias: batch norm subtracts the batch
# mean, which removes any per-channel constant, and its shift (beta) takes the bias's
# place. (Pooling before the ReLU computes the same function faster: the two
# commute. That variant lives in each framework's fast.py.)
CNN_FILTERS = (32, 32, 32)
CNN_KERNEL = 3
CNN_POOL = 2
CNN_FC = (100, 100)
DROPOUT = 0.5


# Recurrent classification (run_rnn): one image row per time step, a recurrent layer
# (LSTM or GRU) reading the whole sequence, then fc from its final hidden state (the
# last layer's; forward and backward concatenated when bidirectional) to the logits.
RNN_CELLS = ("lstm", "gru")
RNN_GATES = {"lstm": 4, "gru": 3}  # weight rows per hidden unit: LSTM i, f, g, o; GRU r, z, n
RNN_HIDDEN = 64
RNN_LAYERS = 1
# Adam at 1e-3 was still improving after the 50 epochs on digits (torch LSTM: test
# accuracy 0.955, best epoch 48); at 2e-3 the four torch runs (LSTM, GRU x seeds 0, 1)
# gave 0.961-0.969 with best epochs 40-49. Hidden 128 did not help.
RNN_LEARNING_RATE = 2e-3


@dataclass(frozen=True)
class CNNShape:
    """Sizes of the CNN for one input shape (height, width, channels)."""

    input_shape: tuple
    num_classes: int

    @property
    def in_channels(self):
        return self.input_shape[2]

    def spatial_after_block(self, block):
        """(height, width) after `block` conv blocks (1-based); 'same' conv, floor pool."""
        h, w = self.input_shape[0], self.input_shape[1]
        for _ in range(block):
            h, w = h // CNN_POOL, w // CNN_POOL
        return h, w

    @property
    def flatten_chw(self):
        """(C, H, W) of the feature map that is flattened before fc1."""
        h, w = self.spatial_after_block(len(CNN_FILTERS))
        if h < 1 or w < 1:
            raise ValueError(f"input {self.input_shape} is too small for {len(CNN_FILTERS)} pooling blocks")
        return CNN_FILTERS[-1], h, w

    @property
    def flatten_features(self):
        c, h, w = self.flatten_chw
        return c * h * w


def cnn_parameter_shapes(input_shape, num_classes):
    """Shared-format tensor names and shapes (torch's state_dict, no num_batches_tracked;
    no conv biases: each convolution is followed by batch norm)."""
    shape = CNNShape(tuple(input_shape), num_classes)
    shapes = {}
    in_ch = shape.in_channels
    for i, out_ch in enumerate(CNN_FILTERS, start=1):
        shapes[f"conv{i}.weight"] = (out_ch, in_ch, CNN_KERNEL, CNN_KERNEL)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"bn{i}.{p}"] = (out_ch,)
        in_ch = out_ch
    sizes = [shape.flatten_features, *CNN_FC, num_classes]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes[f"fc{i}.weight"] = (n_out, n_in)
        shapes[f"fc{i}.bias"] = (n_out,)
    return shapes


def mlp_parameter_shapes(num_features):
    """Shared-format tensor names and shapes of the MLP regressor."""
    sizes = [num_features, *MLP_HIDDEN, 1]
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes[f"fc{i}.weight"] = (n_out, n_in)
        shapes[f"fc{i}.bias"] = (n_out,)
    return shapes


def rnn_parameter_shapes(num_features, num_classes, cell="lstm", bidirectional=False):
    """Shared-format tensor names and shapes of the recurrent classifier: torch's
    ``nn.LSTM``/``nn.GRU`` state_dict under ``rnn.`` (``_reverse`` for the backward
    direction), then ``fc``."""
    if cell not in RNN_GATES:
        raise ValueError(f"unknown recurrent cell {cell!r}; choose one of {', '.join(RNN_CELLS)}")
    rows = RNN_GATES[cell] * RNN_HIDDEN
    directions = ("", "_reverse") if bidirectional else ("",)
    shapes = {}
    for layer in range(RNN_LAYERS):
        n_in = num_features if layer == 0 else RNN_HIDDEN * len(directions)
        for suffix in directions:
            shapes[f"rnn.weight_ih_l{layer}{suffix}"] = (rows, n_in)
            shapes[f"rnn.weight_hh_l{layer}{suffix}"] = (rows, RNN_HIDDEN)
            shapes[f"rnn.bias_ih_l{layer}{suffix}"] = (rows,)
            shapes[f"rnn.bias_hh_l{layer}{suffix}"] = (rows,)
    shapes["fc.weight"] = (num_classes, RNN_HIDDEN * len(directions))
    shapes["fc.bias"] = (num_classes,)
    return shapes
