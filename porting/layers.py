"""Finding a model's layers on both sides, and tracing a torch model's forward pass.

Both ``porting.transfer`` and ``porting.compare`` name layers as these functions do:
torch's by attribute path (``named_modules``), Keras's by attribute path in a Subclassing
model and by ``name`` in a Functional or Sequential one, nested models joined with ``.``.
"""
import re

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

import keras  # after torch
from common.converters import REGISTRY

RECURRENT = ("LSTM", "GRU")
# torch layers that read (B, C, ...) where Keras reads (B, ..., C).
CHANNELS_FIRST = re.compile(r"(Lazy)?(Conv|ConvTranspose)[123]d|BatchNorm[123]d|InstanceNorm"
                            r"|GroupNorm|(Max|Avg|LP|AdaptiveMax|AdaptiveAvg)Pool[123]d"
                            r"|Upsample|PixelShuffle|(Zero|Reflection|Replication|Constant"
                            r"|Circular)Pad[123]d|Dropout[123]d")


# -- finding the layers ---------------------------------------------------------------------
def join(path, name):
    return f"{path}.{name}" if path else str(name)


def torch_layers(model):
    """{attribute path: module} of the torch model's layers: modules with a converter (their
    own submodules belong to them, as MultiheadAttention's out_proj), modules holding tensors
    of their own, and leaves; containers are walked into."""
    found, seen = {}, set()

    def visit(module, path):
        if id(module) in seen:
            return
        seen.add(id(module))
        children = list(module.named_children())
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if type(module).__name__ in REGISTRY or own or not children:
            found[path] = module
            return
        for name, child in children:
            visit(child, join(path, name))

    visit(model, "")
    return found


def _is_graph_model(layer):
    return any(c.__name__ in ("Functional", "Sequential") for c in type(layer).__mro__)


def _attribute_layers(items):
    """(path, layer) for the Keras layers among a Subclassing layer's public attributes,
    into lists and dicts (``blocks.0``, like a torch ModuleList)."""
    for name, value in items:
        if isinstance(value, keras.Layer):
            yield name, value
        elif isinstance(value, (list, tuple)):
            yield from _attribute_layers((f"{name}.{i}", v) for i, v in enumerate(value))
        elif isinstance(value, dict):
            yield from _attribute_layers((f"{name}.{k}", v) for k, v in value.items())


def _attributes(layer):
    """A Keras layer's attributes; on Keras's torch backend, layers are torch Modules and
    their sublayers live among the Module's children instead."""
    children = layer.named_children() if isinstance(layer, torch.nn.Module) else []
    return [*vars(layer).items(), *children]


def keras_layers(model):
    """{path: layer} of the Keras model's layers: names in Functional/Sequential models,
    attribute paths in Subclassing ones. A layer with a converter (or a Bidirectional) is one
    layer; so is one whose variables its public sublayers do not all hold."""
    found, seen = {}, set()

    def visit(layer, path):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if type(layer).__name__ in REGISTRY or type(layer).__name__ == "Bidirectional":
            found[path] = layer
            return
        start = len(found)
        children = ([(sub.name, sub) for sub in layer.layers] if _is_graph_model(layer) else
                    _attribute_layers((k, v) for k, v in _attributes(layer)
                                      if not k.startswith("_")))
        for name, child in children:
            visit(child, join(path, name))
        covered = {id(v) for sub in found.values() for v in sub.weights}
        if len(found) == start or any(id(v) not in covered for v in layer.weights):
            for key in list(found)[start:]:
                del found[key]
            found[path] = layer

    visit(model, "")
    return found


# -- what the converters read ---------------------------------------------------------------
def torch_config(module, flatten_chw=None):
    """The module's public non-callable attributes (hidden_size, kernel_size, groups, ...),
    and ``flatten_chw`` when given: the (C, H, W) map a Linear reads flattened."""
    config = {k: v for k, v in vars(module).items()
              if not k.startswith("_") and not callable(v) and not isinstance(v, torch.Tensor)}
    return config if flatten_chw is None else {**config, "flatten_chw": tuple(flatten_chw)}


def torch_tensors(module):
    """The module's state_dict (names without its prefix) as float numpy arrays (bfloat16,
    which numpy lacks, as float32); integer counters such as BatchNorm's num_batches_tracked
    have no Keras twin and stay behind."""
    return {k: v.detach().cpu().to(torch.float32 if v.dtype == torch.bfloat16 else v.dtype).numpy()
            for k, v in module.state_dict().items() if v.is_floating_point()}


def holds_weights(obj):
    """Whether a torch module or Keras layer (a Module too on Keras's torch backend) has
    weights to convert."""
    return bool(obj.weights) if isinstance(obj, keras.Layer) else bool(torch_tensors(obj))


# -- tracing the torch model ----------------------------------------------------------------
class _Stop(Exception):
    pass


class _Trace(TorchFunctionMode):
    """Follows tensors through one torch forward pass. A tag (kind, (C, H, W), from the input)
    marks the input and what ops that keep its shape make of it, the outputs of channels-first
    modules, and such maps flattened to (B, C*H*W): a 4-D map always counts as NCHW, a 3-D one
    only when a channels-first module (Conv1d, ...) made it.

    ``flat``: {path of a Linear: (C, H, W) of the flattened map it reads}; with ``probe``, the
    run stops at the first layer with weights or channels-first layer, and ``move`` says
    whether it reads the input channels-first (directly, or a 4-D input flattened)."""

    def __init__(self, model, x, probe=False):
        super().__init__()
        self.tags, self.keep, self.flat, self.move = {id(x): ("input", None, True)}, [x], {}, None
        self.hooks = []
        for path, module in torch_layers(model).items():
            self.hooks.append(module.register_forward_pre_hook(
                lambda m, args, path=path: self._enter(path, m, args, probe)))
            if CHANNELS_FIRST.fullmatch(type(module).__name__):
                self.hooks.append(module.register_forward_hook(
                    lambda m, args, out: self._tag(out, ("channels", None, False))))

    def _tag(self, tensor, tag):
        if isinstance(tensor, torch.Tensor):
            self.tags[id(tensor)] = tag
            self.keep.append(tensor)

    def _enter(self, path, module, args, probe):
        kind, chw, from_input = self.tags.get(id(args[0]) if args else None, (None, None, False))
        channels_first = CHANNELS_FIRST.fullmatch(type(module).__name__)
        if kind == "flat" and type(module).__name__ == "Linear":
            self.flat[path] = chw
        if probe and (channels_first or holds_weights(module)):
            self.move = from_input and bool(channels_first or kind == "flat")
            raise _Stop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None or not isinstance(out, torch.Tensor) or out is src:
            return out
        kind, _, from_input = tag = self.tags.get(id(src), (None, None, False))
        if kind and out.shape == src.shape:
            self._tag(out, tag)
        elif (out.dim() == 2 and src.dim() in (3, 4) and out.shape[0] == src.shape[0]
              and out.shape[1] == src[0].numel() and (src.dim() == 4 or kind == "channels")):
            c, *hw = src.shape[1:]
            self._tag(out, ("flat", (c, *([1] if len(hw) == 1 else []), *hw), from_input))
        return out

    def run(self, model, x):
        training = model.training
        try:
            with torch.no_grad(), self:
                model.eval()(x)
        except _Stop:
            pass
        finally:
            model.train(training)
            for hook in self.hooks:
                hook.remove()
        return self


def torch_input(model, x):
    """The Keras-layout array ``x`` as the torch model takes it: channels moved from last to
    second when the first layer to read the input reads it channels-first (a convolution,
    batch norm or pooling on the input, or a Linear on a flattened image), unchanged
    otherwise (a Linear, LSTM, Embedding, ... or a model that transposes its input itself).
    Found by a probe run stopped at that layer; 4-D inputs count as images when the model
    cannot run on the Keras layout."""
    x = np.asarray(x)
    like = next(iter(model.parameters()), torch.empty(0))
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(
        like.device, like.dtype if np.issubdtype(x.dtype, np.floating) else None)
    if x.ndim < 3:
        return tensor
    moved = tensor.movedim(-1, 1).contiguous()
    try:
        move = _Trace(model, tensor, probe=True).run(model, tensor).move
    except Exception:  # the model cannot even start on the Keras layout
        move = x.ndim == 4
    return moved if move else tensor


def keras_sample(model):
    """A zero batch of one in the Keras model's input shape, or None when it is unknown."""
    inputs = getattr(model, "inputs", None) if _is_graph_model(model) else None
    if inputs and len(inputs) == 1:
        shape, dtype = inputs[0].shape, inputs[0].dtype
    else:
        shapes = list((getattr(model, "_build_shapes_dict", None) or {}).values())
        if len(shapes) != 1:
            return None
        shape, dtype = shapes[0], "float32"
    if any(d is None for d in shape[1:]):
        return None
    return np.zeros((1, *shape[1:]), dtype=keras.backend.standardize_dtype(dtype))


def flatten_inputs(torch_model, sample):
    """{path of a Linear: (C, H, W)} for the Linears that read a flattened feature map, found
    by running the torch model on ``sample`` (Keras layout, see ``torch_input``)."""
    x = torch_input(torch_model, sample)
    return _Trace(torch_model, x).run(torch_model, x).flat


