"""The layers' functions on ``Tensor``s, with torch.nn.functional's names and argument order.

``conv2d`` and ``max_pool2d`` are single graph nodes with an explicit numpy backward;
everything else is composed from ``Tensor`` operations and differentiated by the
autograd. Layouts are torch's: NCHW activations, (out, in/groups, kh, kw) kernels,
(out, in) dense weights with y = x W^T + b.

The convolution is **im2col**: every receptive field (Cg * kh * kw numbers for one
output position of one group) is copied into a row of a matrix, so the convolution
becomes one matrix product per group, rows (N * OH * OW, Cg * kh * kw) times the
kernel (Cg * kh * kw, out/groups). Its backward is two more products: the kernel
gradient is cols^T @ g, the gradient of the rows is g @ W^T, and **col2im** adds each
row's gradient back onto the input positions it was copied from (a loop over the kh * kw
kernel offsets, each a strided slice of the padded input).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from scratch.tensor import Tensor

_RNG = [np.random.default_rng(0)]


def manual_seed(seed):
    """Reseed the generator of dropout masks and layer initialisation."""
    _RNG[0] = np.random.default_rng(seed)


def generator():
    return _RNG[0]


def pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def _windows(x, kernel, stride, dilation):
    """(N, C, OH, OW, kh, kw) read-only view of every receptive field of padded `x`."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    view = sliding_window_view(x, span, axis=(2, 3))
    return view[:, :, ::sh, ::sw, ::dh, ::dw]


def _col2im(grad_windows, shape, stride, dilation):
    """Add (N, C, OH, OW, kh, kw) receptive-field gradients back onto an input of `shape`."""
    out = np.zeros(shape, dtype=grad_windows.dtype)
    _, _, oh, ow, kh, kw = grad_windows.shape
    (sh, sw), (dh, dw) = stride, dilation
    for i in range(kh):
        for j in range(kw):
            out[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                j * dw:j * dw + sw * (ow - 1) + 1:sw] += grad_windows[:, :, :, :, i, j]
    return out


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation as torch.nn.functional.conv2d (im2col; see the module doc)."""
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    n, c, _, _ = x.shape
    out_ch, cg, kh, kw = weight.shape
    if c != cg * groups or out_ch % groups:
        raise ValueError(f"conv2d: input has {c} channels, weight {weight.shape}, groups {groups}")
    og = out_ch // groups
    pad = ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2)
    xp = np.pad(x.data, pad)
    windows = _windows(xp, (kh, kw), stride, dilation)
    oh, ow = windows.shape[2:4]
    # rows: (groups, N*OH*OW, Cg*kh*kw); kernel: (groups, Cg*kh*kw, out/groups)
    cols = (windows.reshape(n, groups, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
            .reshape(groups, n * oh * ow, cg * kh * kw))
    kernel = weight.data.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1)
    out = (cols @ kernel).reshape(groups, n, oh, ow, og).transpose(1, 0, 4, 2, 3)
    out = out.reshape(n, out_ch, oh, ow)
    parents = (x, weight)
    if bias is not None:
        out = out + bias.data.reshape(1, -1, 1, 1)
        parents = (x, weight, bias)

    def backward(g):
        gm = g.reshape(n, groups, og, oh, ow).transpose(1, 0, 3, 4, 2).reshape(groups, -1, og)
        grad_w = (cols.transpose(0, 2, 1) @ gm).transpose(0, 2, 1).reshape(weight.shape)
        grad_x = None
        if x.requires_grad:
            grad_cols = (gm @ kernel.transpose(0, 2, 1)).reshape(groups, n, oh, ow, cg, kh, kw)
            grad_windows = grad_cols.transpose(1, 0, 4, 2, 3, 5, 6).reshape(n, c, oh, ow, kh, kw)
            grad_xp = _col2im(grad_windows, xp.shape, stride, dilation)
            grad_x = grad_xp[:, :, padding[0]:padding[0] + x.shape[2],
                             padding[1]:padding[1] + x.shape[3]]
        return (grad_x, grad_w, g.sum(axis=(0, 2, 3)))[:len(parents)]

    return x._result(out, parents, backward, "conv2d")


def max_pool2d(x, kernel_size, stride=None):
    """Maximum over each kernel_size window (floor mode, no padding), as torch's.

    The gradient goes to the first maximum of each window, as torch's does.
    """
    kernel = pair(kernel_size)
    stride = pair(stride if stride is not None else kernel_size)
    windows = _windows(x.data, kernel, stride, (1, 1))
    n, c, oh, ow, kh, kw = windows.shape
    flat = windows.reshape(n, c, oh, ow, kh * kw)
    arg = flat.argmax(axis=-1)
    out = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]

    def backward(g):
        rows = np.arange(oh)[:, None] * stride[0] + arg // kw
        cols = np.arange(ow)[None, :] * stride[1] + arg % kw
        grad = np.zeros_like(x.data)
        np.add.at(grad, (np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                         rows, cols), g)
        return (grad,)

    return x._result(out, (x,), backward, "max_pool2d")


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm over the channel axis 1 of (N, C) or (N, C, H, W).

    Training normalises with the batch's mean and biased variance and updates the
    running statistics in place: new = (1 - momentum) * old + momentum * batch, with
    the unbiased variance (n / (n - 1)). Evaluation normalises with the running ones.
    """
    axes = (0,) + tuple(range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    if training:
        mean = x.mean(axis=axes, keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(axis=axes, keepdims=True)
        if running_mean is not None:
            count = x.data.size // x.shape[1]
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean.data.reshape(-1)
            running_var[...] = ((1 - momentum) * running_var
                                + momentum * var.data.reshape(-1) * count / (count - 1))
    else:
        centred = x - np.asarray(running_mean).reshape(shape)
        var = Tensor(np.asarray(running_var).reshape(shape), requires_grad=False, dtype=x.dtype)
    out = centred / (var + eps) ** 0.5
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def dropout(x, p=0.5, training=True):
    """Zero each value with probability p and scale the rest by 1 / (1 - p) (training only)."""
    if not training or p == 0:
        return x
    keep = (generator().random(x.shape) >= p).astype(x.dtype)
    return x * (keep / (1 - p))


def relu(x):
    return x.relu()


def flatten(x, start_dim=1):
    return x.reshape(*x.shape[:start_dim], -1)


def linear(x, weight, bias=None):
    """y = x W^T + b with W (out, in)."""
    out = x @ weight.T
    return out + bias if bias is not None else out


def log_softmax(logits, axis=-1):
    """logits - log(sum(exp(logits))), shifted by the (constant) row maximum first."""
    shifted = logits - logits.data.max(axis=axis, keepdims=True)
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def cross_entropy(logits, targets):
    """Mean softmax cross-entropy of (N, classes) logits against int class indices."""
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets, dtype=np.int64)
    return -log_softmax(logits, axis=1)[np.arange(len(targets)), targets].mean()


def mse_loss(prediction, target):
    """Mean squared error (shapes must match: no silent (N, 1) vs (N,) broadcasting)."""
    target = target if isinstance(target, Tensor) else Tensor(target, False, prediction.dtype)
    if prediction.shape != target.shape:
        raise ValueError(f"mse_loss: prediction {prediction.shape} vs target {target.shape}")
    diff = prediction - target
    return (diff * diff).mean()
