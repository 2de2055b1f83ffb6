"""Layers, the Adam optimizer and the project's two models on scratch ``Tensor``s.

A ``Module`` finds its parameters (``Tensor`` attributes), buffers (numpy arrays such as
batch norm's running statistics) and sub-modules by attribute name, in the order they
were assigned, so ``state_dict()`` names are torch's (``conv1.weight``,
``bn1.running_var``, ``fc3.bias``). The models mirror ``torch_impl/models.py`` layer
for layer; ``export_weights`` / ``import_weights`` speak the shared weights format
(``common/weights.py``). Initialisation follows torch's defaults (uniform in
+-1/sqrt(fan_in)), drawn from ``scratch.functional``'s generator.
"""
import numpy as np

from common import config
from common.config import CNNShape
from common.errors import WeightsError
from scratch import functional as F
from scratch.tensor import Tensor


class Module:
    training = True

    def __call__(self, *args):
        return self.forward(*args)

    def named_children(self):
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def state_dict(self, prefix=""):
        """Parameters and buffers by torch's names (arrays, not copies)."""
        state = {}
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                state[prefix + name] = value.data
            elif isinstance(value, np.ndarray):
                state[prefix + name] = value
            elif isinstance(value, Module):
                state.update(value.state_dict(f"{prefix}{name}."))
        return state

    def train(self, mode=True):
        self.training = mode
        for _, child in self.named_children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()


def _uniform(shape, fan_in):
    bound = fan_in ** -0.5
    return Tensor(F.generator().uniform(-bound, bound, size=shape))


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True):
        self.weight = _uniform((out_features, in_features), in_features)
        self.bias = _uniform((out_features,), in_features) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True):
        kh, kw = F.pair(kernel_size)
        fan_in = in_channels // groups * kh * kw
        self.weight = _uniform((out_channels, in_channels // groups, kh, kw), fan_in)
        self.bias = _uniform((out_channels,), fan_in) if bias else None
        self.options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, **self.options)


class BatchNorm2d(Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.weight = Tensor(np.ones(num_features))
        self.bias = Tensor(np.zeros(num_features))
        self.running_mean = np.zeros(num_features)
        self.running_var = np.ones(num_features)
        self.eps, self.momentum = eps, momentum

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None):
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class Dropout(Module):
    def __init__(self, p=0.5):
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class Flatten(Module):
    def forward(self, x):
        return F.flatten(x)


class Adam:
    """torch.optim.Adam (no weight decay, no amsgrad): the same update, in the same order."""

    def __init__(self, params, lr=config.LEARNING_RATE, betas=(config.ADAM_BETA1, config.ADAM_BETA2),
                 eps=config.ADAM_EPS):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.step_count = 0
        self.exp_avg = [np.zeros_like(p.data) for p in self.params]
        self.exp_avg_sq = [np.zeros_like(p.data) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.zero_grad()

    def step(self):
        self.step_count += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1 ** self.step_count
        correction2_sqrt = (1 - beta2 ** self.step_count) ** 0.5
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            m += (1 - beta1) * (p.grad - m)  # torch's lerp: m = beta1 m + (1 - beta1) g
            v *= beta2
            v += (1 - beta2) * p.grad * p.grad
            denom = np.sqrt(v) / correction2_sqrt + self.eps
            p.data -= (self.lr / correction1) * m / denom

    def state_dict(self):
        state = {"step": np.array(self.step_count)}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            state[f"exp_avg.{i}"], state[f"exp_avg_sq.{i}"] = m, v
        return state

    def load_state_dict(self, state):
        self.step_count = int(state["step"])
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            m[...], v[...] = state[f"exp_avg.{i}"], state[f"exp_avg_sq.{i}"]


class MLPRegressor(Module):
    """features -> fc1 100 -> ReLU -> fc2 100 -> ReLU -> fc3 1, as torch_impl's."""

    def __init__(self, num_features):
        hidden1, hidden2 = config.MLP_HIDDEN
        self.fc1 = Linear(num_features, hidden1)
        self.fc2 = Linear(hidden1, hidden2)
        self.fc3 = Linear(hidden2, 1)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNNClassifier(Module):
    """Three blocks conv 3x3 'same' (no bias) -> batch norm -> ReLU -> 2x2 max pool, then
    fc1 -> ReLU -> dropout -> fc2 -> ReLU -> fc3, as torch_impl's. Input (N, C, H, W)."""

    def __init__(self, input_shape, num_classes):
        shape = CNNShape(tuple(input_shape), num_classes)
        k, pad = config.CNN_KERNEL, config.CNN_KERNEL // 2
        in_ch = shape.in_channels
        for i, out_ch in enumerate(config.CNN_FILTERS, start=1):
            setattr(self, f"conv{i}", Conv2d(in_ch, out_ch, k, padding=pad, bias=False))
            setattr(self, f"bn{i}", BatchNorm2d(out_ch, config.BN_EPS, config.BN_MOMENTUM))
            in_ch = out_ch
        self.pool = MaxPool2d(config.CNN_POOL)
        self.flatten = Flatten()
        fc1, fc2 = config.CNN_FC
        self.fc1 = Linear(shape.flatten_features, fc1)
        self.dropout = Dropout(config.DROPOUT)
        self.fc2 = Linear(fc1, fc2)
        self.fc3 = Linear(fc2, num_classes)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.pool(F.relu(bn(conv(x))))
        x = self.flatten(x)  # (C, H, W) order, as torch's
        x = self.dropout(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_mlp(num_features):
    return MLPRegressor(num_features)


def build_cnn(input_shape, num_classes):
    return CNNClassifier(input_shape, num_classes)


def export_weights(model):
    """The shared weights format: every parameter and buffer as float32 numpy arrays."""
    return {name: np.asarray(value, dtype=np.float32) for name, value in model.state_dict().items()}


def import_weights(model, tensors):
    """Copy shared-format tensors into the model (float64 inside), names checked."""
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise WeightsError(f"the weights do not fit {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    for name, array in state.items():
        array[...] = np.asarray(tensors[name], dtype=array.dtype).reshape(array.shape)
    return model
