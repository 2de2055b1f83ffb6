"""tf1_compat/fast.py computes the plain graph's function: every variant against
tf1_compat/models.py from the same shared weights.

For each variant -- the fused batch norm, pool before ReLU, control-flow v2, and all three
together (``fast.build_cnn``, what ``--fast`` builds) -- both graphs get the same shared
weights (``conftest.random_shared_weights``) and the same batch, and must agree on the
logits in inference and in training mode (the same dropout mask: the same graph seed and
global step), on every gradient, on the weights after one Adam step and on the moving
statistics that step wrote. float32 throughout: the fused kernel has no float64 version on
CPU. Tolerances: outputs and moving statistics rtol 1e-4 / atol 1e-5 (summation order; the
fused kernel's eps is 1.001e-5, not 1e-5); gradients rtol 1e-3 / atol 1e-5; weights after
one Adam step atol 1e-5, 1% of the step: Adam's first step moves each weight by about
lr = 1e-3 in its gradient's sign, and for a gradient near Adam's eps scale a rounding
difference changes that step by a little (3e-6 measured).

This process runs TF2 behaviour, where control flow is v2 already; ``test_tf1_runs.py``
runs this file again under ``disable_v2_behavior``, where the plain graph's conds are v1
Switch/Merge ops and only the fast graph's are ``If`` ops.
"""
import numpy as np
import pytest
import tensorflow as tf

from parity_tests.conftest import call, metrics, random_shared_weights
from tf1_compat import fast, models
from tf1_compat.train import feed, make_loss, make_optimizer, make_train_step

v1 = tf.compat.v1
INPUT_SHAPE, CLASSES = (8, 8, 1), 10


def build_plain():
    return models.build_cnn(INPUT_SHAPE, CLASSES)


def build_variant(variant, monkeypatch):
    """The plain CNN with one speed variant swapped in, or all of them (fast.build_cnn)."""
    if variant == "fused batch norm":
        monkeypatch.setattr(models, "batch_norm", fast.batch_norm)  # in the textbook block
    elif variant == "pool before ReLU":
        monkeypatch.setattr(fast, "batch_norm", models.batch_norm)  # fast.conv_block, plain BN
        return models.build_cnn(INPUT_SHAPE, CLASSES, block=fast.conv_block)
    elif variant == "control-flow v2":
        with fast.control_flow_v2():
            return build_plain()
    elif variant == "fast.build_cnn":
        return fast.build_cnn(INPUT_SHAPE, CLASSES)
    return build_plain()


def one_step(build, weights, x, y):
    """Logits, gradients, and weights + moving statistics after one Adam step, by name."""
    with tf.Graph().as_default() as graph:
        v1.set_random_seed(0)
        model = build()
        loss = make_loss("classification", model)
        trainable = [v for v in model.variables.values() if v.trainable]
        gradients = tf.gradients(loss, trainable)
        train_step = make_train_step(make_optimizer(1e-3), loss)
        initialize = v1.global_variables_initializer()
    with v1.Session(graph=graph) as sess:
        sess.run(initialize)
        models.import_weights(sess, model, weights)
        results = {"inference logits": sess.run(model.outputs, feed(model, x))}
        logits, values = sess.run([model.outputs, gradients], feed(model, x, y, training=True))
        results["training logits"] = logits
        results.update({f"d loss / d {v.op.name}": g for v, g in zip(trainable, values)})
        sess.run(train_step, feed(model, x, y, training=True))
        results.update({f"{k} after a step": v for k, v in models.export_weights(sess, model).items()})
    return graph, results


def op_types(graph):
    """Every op type in the graph, the branches of v2 conds (functions) included."""
    graph_def = graph.as_graph_def()
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return {node.op for node in nodes}


def tolerance(name):
    if name.startswith("d loss"):
        return {"rtol": 1e-3, "atol": 1e-5}
    if name.endswith("after a step") and "running" not in name:
        return {"rtol": 0, "atol": 1e-5}
    return {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("variant", ["fused batch norm", "pool before ReLU", "control-flow v2",
                                     "fast.build_cnn"])
def test_fast_variant_computes_the_plain_function(variant, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, 16)
    weights = random_shared_weights("classification", INPUT_SHAPE, CLASSES, scale=0.3)
    v2_before = v1.control_flow_v2_enabled()
    plain_graph, expected = one_step(build_plain, weights, x, y)
    fast_graph, got = one_step(lambda: build_variant(variant, monkeypatch), weights, x, y)
    assert v1.control_flow_v2_enabled() == v2_before  # the setting is the caller's again
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, err_msg=f"{variant}: {name}", **tolerance(name))
    moved = expected["bn1.running_var after a step"] - weights["bn1.running_var"]
    assert np.all(np.abs(moved) > 1e-4)  # the step wrote the moving statistics
    ops = {graph: op_types(graph) for graph in (plain_graph, fast_graph)}
    if variant in ("control-flow v2", "fast.build_cnn"):
        assert "Switch" not in ops[fast_graph] and ops[fast_graph] & {"If", "StatelessIf"}
    if variant in ("fused batch norm", "fast.build_cnn"):
        assert "FusedBatchNormV3" in ops[fast_graph] and "FusedBatchNormV3" not in ops[plain_graph]
    assert ("Switch" in ops[plain_graph]) != v2_before  # v1 control flow only without v2


@pytest.mark.parametrize("module, argv", [
    ("tf1_compat.run_cnn", ["--epochs", "2"]),
    ("tf1_compat.run_nn", ["--epochs", "2", "--dataset", "diabetes"]),
])
def test_fast_runs_end_to_end_and_records_the_variant(module, argv, tmp_path):
    """--fast trains and writes "variant": "fast"; the TF1 MLP has no fast variant
    (nothing measured helped it), so its --fast graph is the plain one."""
    assert call(module, [*argv, "--fast", "--out", str(tmp_path / "fast")]) == 0
    m = metrics(tmp_path / "fast")
    assert m["variant"] == "fast" and m["config"]["fast"] is True
    assert ("fast_note" in m) == (module == "tf1_compat.run_nn")
    assert np.isfinite(m["test"]["loss"]) and len(m["epochs"]) == 2
