"""TF1 variables named by scope <-> torch modules, through the converters ``transfer`` uses.

A TF1 graph written as ``tf1_compat/layers/`` and ``tf1_compat/models.py`` write one keeps
each layer's variables in one variable scope, with the Keras twin's names and layouts:
``scope/kernel``, ``scope/bias``, ``scope/gamma``, ...; a recurrent layer's under
``scope/layer{k}/{forward|backward}/`` (``tf1_compat.layers.recurrent.scope_name``). The
torch side is ``modules``, {scope: module}. ``keras_configs`` ({scope: config dict or Keras
layer}) states in Keras's words what the TF1 graph computes (units, use_bias, epsilon, ...):
the converter checks it against the torch module. ``flatten_shape`` ({scope: (C, H, W)})
marks the Linears that read a flattened map, whose rows the converter permutes.

* torch -> TF1: ``tf1_values(modules, keras_configs, variables)`` gives {variable name:
  array} for the graph's ``variables``; ``tf1_load(session, values)`` assigns them.
* TF1 -> torch: ``tf1_read(session)`` gives {variable name: array};
  ``torch_values(modules, keras_configs, values)`` gives {scope: {tensor name: array}}, each
  module's whole state dict; ``torch_load(modules, tensors)`` copies them in.

Each conversion checks everything before it returns: one ``TransferError`` lists every
scope that does not fit (no config, no converter, a refused configuration, a shape) and
every variable under a given scope that nothing converts; nothing is loaded then.
"""
import numpy as np

from common.converters import ConversionError, lookup
from common.converters.recurrent import DIRECTIONS, split_rnn_state_dict
from porting.layers import RECURRENT, torch_config, torch_tensors
from porting.transfer import TransferError, assign, expect_shapes, torch_state


def _scopes(modules, keras_configs, flatten_shape, problems):
    """(scope, module, converter, torch config, Keras config) for each module with a Keras
    config and a converter; the others are added to ``problems``."""
    for scope, module in modules.items():
        config = keras_configs.get(scope)
        config = config.get_config() if hasattr(config, "get_config") else config
        try:
            if config is None:
                raise ConversionError("no Keras config given for it")
            converter = lookup(type(module).__name__)
        except ConversionError as exc:
            problems.append(f"{scope}: {exc}")
            continue
        yield (scope, module, converter,
               torch_config(module, (flatten_shape or {}).get(scope)), config)


def _parts(scope, module):
    """{part: its variable scope}: {None: scope}, or one recurrent layer and direction each
    ((k, "forward"): "scope/layer{k}/forward", ...), in ``split_rnn_state_dict``'s order."""
    if type(module).__name__ not in RECURRENT:
        return {None: scope}
    return {(k, d): f"{scope}/layer{k}/{d}" for k in range(module.num_layers)
            for d in DIRECTIONS[:1 + module.bidirectional]}


def _under(names, scopes):
    return [n for n in names if any(n.startswith(f"{s}/") for s in scopes)]


# -- torch -> TF1 ---------------------------------------------------------------------------
def tf1_values(modules, keras_configs, variables, flatten_shape=None):
    """{TF1 variable name: array}: the torch ``modules`` converted for the TF1 ``variables``
    (``tf.compat.v1.global_variables()``). Every variable under a scope must be filled."""
    shapes = {v.name.split(":")[0]: tuple(v.shape) for v in variables}
    values, problems = {}, []
    for scope, module, converter, t_config, k_config in _scopes(modules, keras_configs,
                                                                 flatten_shape, problems):
        try:
            tensors, scopes = torch_tensors(module), _parts(scope, module)
            parts = {None: tensors} if None in scopes else split_rnn_state_dict(tensors)
            for part, name in scopes.items():
                arrays = converter.to_keras(parts[part], t_config, k_config)
                names = [f"{name}/{n}" for n in converter.keras_names if f"{name}/{n}" in shapes]
                expect_shapes("TF1", [np.shape(a) for a in arrays], [shapes[n] for n in names])
                values.update(zip(names, arrays))
        except (ConversionError, AssertionError) as exc:
            problems.append(f"{scope}: {exc}")
    problems += [f"{n}: a TF1 variable under a given scope that no converted tensor fills"
                 for n in _under(shapes, modules) if n not in values]
    if problems:
        raise TransferError(problems, "porting.tf1_values")
    return values


def _global_variables(session):
    import tensorflow as tf  # here: the rest of porting runs on any Keras backend

    variables = session.graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    return {v.name.split(":")[0]: v for v in variables}


def tf1_load(session, values):
    """Load {TF1 variable name: array} into the session graph's global variables."""
    variables = _global_variables(session)
    missing = [f"{name}: no such TF1 variable" for name in values if name not in variables]
    if missing:
        raise TransferError(missing, "porting.tf1_load")
    for name, value in values.items():
        variables[name].load(value, session)


# -- TF1 -> torch ---------------------------------------------------------------------------
def tf1_read(session):
    """{TF1 variable name: array}: the values of the session graph's global variables."""
    return session.run(_global_variables(session))


def torch_values(modules, keras_configs, values, flatten_shape=None):
    """{scope: {tensor name: array}}: the TF1 variable ``values`` ({name: array}, as
    ``tf1_read`` gives them) converted for the torch ``modules``, each module's whole state
    dict (its float tensors), names and shapes checked against its own. The inverse of
    ``tf1_values``; every variable under a scope must be taken."""
    tensors, problems, taken = {}, [], set()
    for scope, module, converter, t_config, k_config in _scopes(modules, keras_configs,
                                                                 flatten_shape, problems):
        parts, failed = {}, len(problems)
        for part, name in _parts(scope, module).items():
            names = [f"{name}/{n}" for n in converter.keras_names if f"{name}/{n}" in values]
            taken.update(names)
            try:
                if not names:
                    raise ConversionError(f"no TF1 variable {name}/"
                                          f"{{{', '.join(converter.keras_names)}}}")
                out = converter.to_torch([np.asarray(values[n]) for n in names], t_config,
                                         k_config)
                parts.update({part: out} if part else out)
            except (ConversionError, AssertionError) as exc:
                problems.append(f"{name}: {exc}")
        if len(problems) == failed:
            tensors[scope] = torch_state(scope, module, parts, problems)
    problems += [f"{n}: a TF1 variable under a given scope that no torch tensor takes"
                 for n in _under(values, modules) if n not in taken]
    if problems:
        raise TransferError(problems, "porting.torch_values")
    return tensors


def torch_load(modules, tensors):
    """Copy {scope: {tensor name: array}} (as ``torch_values`` gives) into the torch
    ``modules`` ({scope: module}); every name and shape is checked before anything is."""
    problems = []
    for scope, state in tensors.items():
        own = modules[scope].state_dict() if scope in modules else None
        if own is None:
            problems.append(f"{scope}: no such module")
            continue
        problems += [f"{scope}.{name}: {np.shape(a)} does not fit the module's "
                     f"{tuple(own[name].shape) if name in own else 'nothing'}"
                     for name, a in state.items()
                     if name not in own or tuple(own[name].shape) != np.shape(a)]
    if problems:
        raise TransferError(problems, "porting.torch_load")
    assign([], [(modules[scope], state) for scope, state in tensors.items()])
