"""A numpy-backed Tensor with reverse-mode automatic differentiation (micrograd style).

Every operation returns a new ``Tensor`` that remembers its parents and a
``backward(g)`` closure mapping the gradient of the output to the gradients of
the parents (the vector-Jacobian product). ``Tensor.backward()`` visits the graph
in reverse topological order and adds the gradients of the leaves (tensors made
by the user) into their ``.grad``, as ``torch.Tensor.backward`` does: a scalar
output starts from 1, a non-scalar output needs the ``gradient`` of some scalar
with respect to it. Broadcasting is undone on the way back by summing the
gradient over the broadcast axes (``_unbroadcast``). Values are float64 unless a
dtype is given. Under ``with no_grad():`` nothing is recorded.
"""
import contextlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

_GRAD_ENABLED = [True]


@contextlib.contextmanager
def no_grad():
    """Record no graph inside the block (like ``torch.no_grad``); also a decorator."""
    previous, _GRAD_ENABLED[0] = _GRAD_ENABLED[0], False
    try:
        yield
    finally:
        _GRAD_ENABLED[0] = previous


def _unbroadcast(grad, shape):
    """Sum `grad` over the axes that broadcasting added or stretched to reach `shape`."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


class Tensor:
    """``data`` (a numpy array), ``grad`` (None until a backward pass reaches it)."""

    def __init__(self, data, requires_grad=True, dtype=np.float64, name=""):
        self.data = np.asarray(data.data if isinstance(data, Tensor) else data, dtype=dtype)
        self.requires_grad = requires_grad
        self.grad = None
        self.name = name
        self._parents, self._backward, self._op = (), None, ""

    # -- graph bookkeeping -----------------------------------------------------------------
    @staticmethod
    def _wrap(value, like):
        return value if isinstance(value, Tensor) else Tensor(value, False, like.data.dtype)

    def _result(self, data, parents, backward, op):
        """A new tensor; it joins the graph when some parent needs a gradient."""
        track = _GRAD_ENABLED[0] and any(p.requires_grad for p in parents)
        out = Tensor(data, requires_grad=track, dtype=np.asarray(data).dtype)
        if track:
            out._parents, out._backward, out._op = parents, backward, op
        return out

    def _topological_order(self):
        order, seen, stack = [], set(), [(self, False)]
        while stack:  # iterative depth-first search: deep graphs need no recursion limit
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
            elif id(node) not in seen:
                seen.add(id(node))
                stack.append((node, True))
                stack.extend((p, False) for p in node._parents if p.requires_grad)
        return order

    def backward(self, gradient=None):
        """Add d(output)/d(leaf), weighted by `gradient`, into every leaf's ``.grad``."""
        if not self.requires_grad:
            raise RuntimeError("this tensor does not require a gradient and has no graph")
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs; "
                                   "pass the gradient of the output")
            gradient = np.ones_like(self.data)
        gradient = np.asarray(gradient.data if isinstance(gradient, Tensor) else gradient)
        if gradient.shape != self.data.shape:
            raise ValueError(f"gradient shape {gradient.shape} != output shape {self.data.shape}")
        grads = {id(self): gradient.astype(self.data.dtype)}
        for node in reversed(self._topological_order()):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if not node._parents:
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if parent.requires_grad and pg is not None:
                    grads[id(parent)] = grads[id(parent)] + pg if id(parent) in grads else pg

    def zero_grad(self):
        """Forget the accumulated gradient (``grad = None``, as torch's set_to_none)."""
        self.grad = None

    def detach(self):
        return Tensor(self.data, requires_grad=False, dtype=self.data.dtype)

    # -- elementwise arithmetic ------------------------------------------------------------
    def __add__(self, other):
        other = self._wrap(other, self)
        return self._result(self.data + other.data, (self, other),
                            lambda g: (_unbroadcast(g, self.shape), _unbroadcast(g, other.shape)),
                            "+")

    def __mul__(self, other):
        other = self._wrap(other, self)
        return self._result(self.data * other.data, (self, other),
                            lambda g: (_unbroadcast(g * other.data, self.shape),
                                       _unbroadcast(g * self.data, other.shape)), "*")

    def __truediv__(self, other):
        other = self._wrap(other, self)
        out = self.data / other.data
        return self._result(out, (self, other),
                            lambda g: (_unbroadcast(g / other.data, self.shape),
                                       _unbroadcast(-g * out / other.data, other.shape)), "/")

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):
            out = self.data ** exponent.data
            return self._result(out, (self, exponent), lambda g: (
                _unbroadcast(g * exponent.data * self.data ** (exponent.data - 1), self.shape),
                _unbroadcast(g * out * np.log(self.data), exponent.shape)), "**")
        return self._result(self.data ** exponent, (self,),
                            lambda g: (g * exponent * self.data ** (exponent - 1),),
                            f"**{exponent:g}")

    def __neg__(self):
        return self._result(-self.data, (self,), lambda g: (-g,), "neg")

    def __sub__(self, other):
        return self + (-self._wrap(other, self))

    def __radd__(self, other):
        return self + other

    def __rsub__(self, other):
        return self._wrap(other, self) - self

    def __rmul__(self, other):
        return self * other

    def __rtruediv__(self, other):
        return self._wrap(other, self) / self

    def __rpow__(self, base):
        return self._wrap(base, self) ** self

    # -- matrix product (1-D operands as numpy/torch: promoted, then squeezed) -------------
    def __matmul__(self, other):
        other = self._wrap(other, self)
        a = self.data[None] if self.ndim == 1 else self.data
        b = other.data[:, None] if other.ndim == 1 else other.data
        full = np.matmul(a, b)

        def backward(g):
            g = g.reshape(full.shape)
            ga = _unbroadcast(g @ np.swapaxes(b, -1, -2), a.shape)
            gb = _unbroadcast(np.swapaxes(a, -1, -2) @ g, b.shape)
            return ga.reshape(self.shape), gb.reshape(other.shape)

        return self._result(np.matmul(self.data, other.data), (self, other), backward, "@")

    def __rmatmul__(self, other):
        return self._wrap(other, self) @ self

    # -- reductions and shape --------------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        def backward(g):
            if axis is not None and not keepdims:
                g = np.expand_dims(g, axis)
            return (np.broadcast_to(g, self.shape).copy(),)
        return self._result(self.data.sum(axis=axis, keepdims=keepdims), (self,), backward, "sum")

    def mean(self, axis=None, keepdims=False):
        axes = range(self.ndim) if axis is None else np.atleast_1d(axis)
        count = int(np.prod([self.shape[a] for a in axes]))
        return self.sum(axis=axis, keepdims=keepdims) / count

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._result(self.data.reshape(shape), (self,),
                            lambda g: (g.reshape(self.shape),), "reshape")

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = tuple(axes) or tuple(reversed(range(self.ndim)))
        return self._result(self.data.transpose(axes), (self,),
                            lambda g: (g.transpose(np.argsort(axes)),), "transpose")

    @property
    def T(self):
        return self.transpose()

    def __getitem__(self, index):
        index = index.data.astype(np.int64) if isinstance(index, Tensor) else index

        def backward(g):
            grad = np.zeros_like(self.data)
            np.add.at(grad, index, g)  # repeated indices add up
            return (grad,)
        return self._result(self.data[index], (self,), backward, "getitem")

    # -- elementwise functions -------------------------------------------------------------
    def exp(self):
        out = np.exp(self.data)
        return self._result(out, (self,), lambda g: (g * out,), "exp")

    def log(self):
        return self._result(np.log(self.data), (self,), lambda g: (g / self.data,), "log")

    def relu(self):
        return self._result(np.maximum(self.data, 0), (self,),
                            lambda g: (g * (self.data > 0),), "relu")

    # -- numpy-like conveniences -----------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    def __len__(self):
        return len(self.data)

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def __repr__(self):
        op = f", op={self._op!r}" if self._op else ""
        return f"Tensor({self.data!r}{op})"

    # -- the computation graph as graphviz DOT -----------------------------------------------
    def draw_graph(self, path=None):
        """The graph that produced this tensor as DOT text ("digraph ...").

        With `path`, the text is written there and, when graphviz's ``dot`` program
        is on PATH, rendered to a PNG beside it (``graph.dot`` -> ``graph.png``).
        """
        nodes = self._topological_order() if self.requires_grad else [self]
        lines = ["digraph autograd {", "  rankdir=LR;",
                 '  node [shape=record, fontname="Helvetica"];']
        for node in nodes:
            label = node.name or ("leaf" if not node._parents else node._op)
            lines.append(f'  t{id(node)} [label="{{{label} | shape {node.shape}}}"];')
            lines.extend(f"  t{id(p)} -> t{id(node)};" for p in node._parents if p.requires_grad)
        text = "\n".join(lines + ["}"]) + "\n"
        if path is not None:
            path = Path(path)
            path.write_text(text)
            if shutil.which("dot"):
                subprocess.run(["dot", "-Tpng", str(path), "-o", str(path.with_suffix(".png"))],
                               check=True)
            else:
                print(f"graphviz's dot is not installed: wrote the DOT text to {path} only")
        return text
