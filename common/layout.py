"""Layout and weight conversions between PyTorch and TensorFlow, in numpy.

One small function per layer type, each one explicit permutation with its
shapes asserted. The shared weights format uses PyTorch's names and layouts
(``common.weights``); TF2 and TF1 convert through these functions on the way
in and out.

=================  =======================  =========================
what               PyTorch                  TensorFlow / Keras
=================  =======================  =========================
activations        NCHW                     NHWC
conv kernel        (out, in, kh, kw)        (kh, kw, in, out)
dense kernel       (out, in), y = x W^T     (in, out), y = x W
flatten order      (C, H, W)                (H, W, C)
batch norm         weight, bias,            gamma, beta,
                   running_mean/var         moving_mean/variance
bn momentum        0.1 on the new value     0.9 (=1-0.1) on the old value
bn eps             1e-5                     Keras default 1e-3: pass 1e-5
=================  =======================  =========================
"""
import numpy as np


def nhwc_to_nchw(x):
    """Activations (N, H, W, C) -> (N, C, H, W)."""
    assert x.ndim == 4, f"expected a 4-D NHWC array, got shape {x.shape}"
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nchw_to_nhwc(x):
    """Activations (N, C, H, W) -> (N, H, W, C)."""
    assert x.ndim == 4, f"expected a 4-D NCHW array, got shape {x.shape}"
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def conv_kernel_torch_to_tf(w):
    """Conv kernel (out, in, kh, kw) -> (kh, kw, in, out)."""
    assert w.ndim == 4, f"expected a (out, in, kh, kw) kernel, got shape {w.shape}"
    out = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    assert out.shape == (w.shape[2], w.shape[3], w.shape[1], w.shape[0])
    return out


def conv_kernel_tf_to_torch(w):
    """Conv kernel (kh, kw, in, out) -> (out, in, kh, kw)."""
    assert w.ndim == 4, f"expected a (kh, kw, in, out) kernel, got shape {w.shape}"
    out = np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    assert out.shape == (w.shape[3], w.shape[2], w.shape[0], w.shape[1])
    return out


def dense_torch_to_tf(w):
    """Dense weight (out, in) -> kernel (in, out): torch computes x W^T, TF x W."""
    assert w.ndim == 2, f"expected an (out, in) weight, got shape {w.shape}"
    return np.ascontiguousarray(w.T)


def dense_tf_to_torch(w):
    """Dense kernel (in, out) -> weight (out, in)."""
    assert w.ndim == 2, f"expected an (in, out) kernel, got shape {w.shape}"
    return np.ascontiguousarray(w.T)


def flatten_dense_torch_to_tf(w, chw):
    """First dense layer after a flatten: (out, C*H*W) -> kernel (H*W*C, out).

    torch flattens NCHW feature maps in (C, H, W) order, TF flattens NHWC maps
    in (H, W, C) order, so the kernel's input rows must be permuted as well as
    transposed. Without this the shapes still match and the outputs are wrong.
    """
    c, h, w_ = chw
    assert w.ndim == 2 and w.shape[1] == c * h * w_, \
        f"expected an (out, {c}*{h}*{w_}) weight, got shape {w.shape}"
    rows = w.reshape(w.shape[0], c, h, w_).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    return np.ascontiguousarray(rows.T)


def flatten_dense_tf_to_torch(w, chw):
    """First dense layer after a flatten: kernel (H*W*C, out) -> (out, C*H*W)."""
    c, h, w_ = chw
    assert w.ndim == 2 and w.shape[0] == c * h * w_, \
        f"expected a ({h}*{w_}*{c}, out) kernel, got shape {w.shape}"
    out = w.T.reshape(w.shape[1], h, w_, c).transpose(0, 3, 1, 2).reshape(w.shape[1], -1)
    return np.ascontiguousarray(out)


BN_TORCH_TO_TF = {"weight": "gamma", "bias": "beta",
                  "running_mean": "moving_mean", "running_var": "moving_variance"}
BN_TF_TO_TORCH = {v: k for k, v in BN_TORCH_TO_TF.items()}


def batchnorm_torch_to_tf(params):
    """{weight, bias, running_mean, running_var} -> {gamma, beta, moving_mean, moving_variance}.

    The values carry over unchanged: both sides normalise a training batch with
    its biased variance and use the stored statistics in inference. What
    differs is how the running statistics are updated (momentum convention,
    and torch folds the *unbiased* batch variance into running_var) and the
    default eps (``bn_momentum_torch_to_keras``, ``common.config.BN_EPS``).
    """
    assert set(params) == set(BN_TORCH_TO_TF), f"unexpected batch-norm tensors {sorted(params)}"
    shapes = {np.shape(v) for v in params.values()}
    assert len(shapes) == 1 and len(next(iter(shapes))) == 1, f"mismatched shapes {shapes}"
    return {BN_TORCH_TO_TF[k]: np.asarray(v, dtype=np.float32) for k, v in params.items()}


def batchnorm_tf_to_torch(params):
    """{gamma, beta, moving_mean, moving_variance} -> torch's batch-norm tensors."""
    assert set(params) == set(BN_TF_TO_TORCH), f"unexpected batch-norm tensors {sorted(params)}"
    return {BN_TF_TO_TORCH[k]: np.asarray(v, dtype=np.float32) for k, v in params.items()}


def bn_momentum_torch_to_keras(momentum):
    """torch: running = (1-m)*running + m*batch; Keras: moving = m'*moving + (1-m')*batch."""
    return 1.0 - momentum


def bn_momentum_keras_to_torch(momentum):
    return 1.0 - momentum
