"""The shared weights format: ``weights.safetensors``.

float32 tensors named and shaped exactly like ``torch_impl``'s
``model.state_dict()`` without ``num_batches_tracked`` (``fc1.weight`` (out, in),
``conv1.weight`` (out, in, kh, kw), ``bn1.running_var``, ...; no ``convN.bias``:
a convolution followed by batch norm has none), the first dense
layer after the flatten in torch's (C, H, W) flatten order. The metadata holds
the task, dataset, input shape, number of classes, normalisation statistics and
the implementation that wrote the file (safetensors metadata is str -> str, so
every value is stored as JSON).
"""
import json
from pathlib import Path

import numpy as np

from common.config import cnn_parameter_shapes, mlp_parameter_shapes, rnn_parameter_shapes
from common.errors import WeightsError
from common.outputs import atomic_path


def expected_shapes(task, input_shape, num_classes=0, cell=None, bidirectional=False):
    """The tensors a shared weights file must hold for this model: the recurrent
    classifier when `cell` is given, else the CNN (classification) or the MLP."""
    if cell is not None:
        return rnn_parameter_shapes(input_shape[-1], num_classes, cell, bidirectional)
    if task == "classification":
        return cnn_parameter_shapes(input_shape, num_classes)
    return mlp_parameter_shapes(input_shape[-1])


def save_weights(path, tensors, metadata):
    """Write `tensors` (name -> array, torch layout) and `metadata` atomically."""
    from safetensors.numpy import save_file
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)


def read_weights(path):
    """(tensors, metadata) from a shared weights file, with one-sentence errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}); it may be "
                           f"truncated or corrupt: export it again") from None
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except json.JSONDecodeError:
        meta = dict(raw_meta)
    return tensors, meta


def check_tensors(path, tensors, expected):
    """Every expected tensor present with its shape, nothing extra."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise WeightsError(f"{path} lacks tensor {missing[0]!r} (shape {expected[missing[0]]}); "
                           f"it was written for another architecture")
    extra = [k for k in tensors if k not in expected]
    conv_bias = [k for k in extra if k.startswith("conv") and k.endswith(".bias")]
    if conv_bias:
        bn = conv_bias[0].replace("conv", "bn").replace(".bias", ".running_mean")
        raise WeightsError(f"{path} has tensor {conv_bias[0]!r}, a convolution bias before batch "
                           f"norm, which this format leaves out; subtract it from {bn!r} and "
                           f"drop it, or export the model again")
    if extra:
        raise WeightsError(f"{path} has unexpected tensor {extra[0]!r}; it was written for "
                           f"another architecture")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise WeightsError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                               f"expected {tuple(shape)}; it was written for another architecture "
                               f"or dataset")
        if not np.all(np.isfinite(tensors[name])):
            raise WeightsError(f"{path}: tensor {name!r} holds NaN or infinite values")


def load_weights(path, task, input_shape, num_classes=0, cell=None, bidirectional=False):
    """Read and validate a shared weights file for this model: (tensors, metadata)."""
    tensors, meta = read_weights(path)
    if cell is not None and meta.get("cell") not in (None, cell):
        raise WeightsError(f"{path} holds a {meta['cell']} model, this run builds a {cell}: "
                           f"pass --cell {meta['cell']}")
    expected = expected_shapes(task, input_shape, num_classes, cell, bidirectional)
    check_tensors(path, tensors, expected)
    if meta.get("task") not in (None, task):
        raise WeightsError(f"{path} holds a {meta.get('task')} model, this run trains a {task} model")
    return {k: tensors[k].astype(np.float32) for k in expected}, meta


def weights_metadata(dataset, implementation, model=None):
    """The file's metadata: the dataset's, the writer, and `model` (e.g. the cell)."""
    meta = dataset.metadata()
    meta.update(model or {})
    meta["implementation"] = implementation
    meta["format"] = "dl-rosetta shared weights v1 (torch state_dict names and layouts)"
    return meta



def model_options(args):
    """The architecture options of a run beyond the dataset (the recurrent program's cell
    and direction), as ``load_weights`` keywords and weights-file metadata."""
    if getattr(args, "kind", None) != "sequence":
        return {}
    return {"cell": args.cell, "bidirectional": args.bidirectional}
