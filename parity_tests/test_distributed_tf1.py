"""TF1 in-graph towers (``--replicas N``, ``tf1_compat/distributed.py``) against one device.

One subprocess runs the entry points in TF1 mode (``disable_v2_behavior`` is process-wide):
it starts with this module and its last two tests wait for it. The rest runs in this pytest
process, whose TF2 behaviour the graph code supports: the entry points through
``conftest.call`` (diabetes, batch 27: every step splits 14/13) and the graph functions
themselves. Two towers need two CPU devices, which ``train.session_config`` asks the Session
for (``ConfigProto(device_count={"CPU": 2})``): nothing process-wide.

Tolerances: the MLP's weights within 1e-6, the acceptance criterion (3.0e-8 measured: a
tower's part of the loss is its mean times its rows / the step's rows, one rounding more than
the plain mean). The CNN with synchronised batch norm: see ``test_sync_batch_norm_...``.
"""
import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file

from common import config
from common.datasets import batch_indices, load_dataset
from common.distributed import SINGLE, World
from parity_tests.conftest import REPO, call, expect_exit, metrics, random_shared_weights
from tf1_compat import models
from tf1_compat.distributed import build_sync_cnn, build_towers
from tf1_compat.train import feed, make_loss, make_optimizer, make_train_step, session_config

v1 = tf.compat.v1
MLP = ["--dataset", "diabetes", "--batch-size", "27", "--deterministic", "--seed", "3",
       "--device", "cpu", "--epochs", "2"]
TWO = World(size=2, rank=0, backend="towers", devices=("/cpu:0", "/cpu:1"))
INPUT_SHAPE, CLASSES = (8, 8, 1), 10


def weights(run):
    """A run directory's weights.safetensors, or a dict of arrays as it is."""
    return run if isinstance(run, dict) else load_file(run / "weights.safetensors")


def max_diff(a, b):
    """The largest absolute difference between two sets of shared-format weights."""
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# Both entry points' main() in one TF1-mode process, as ``python -m`` runs each (after
# use_tf1_behavior): one TensorFlow import instead of two.
TF1_MODE = """import json, sys
from tf1_compat.train import use_tf1_behavior
use_tf1_behavior()
from tf1_compat import run_cnn, run_nn
run_nn.main(json.loads(sys.argv[1]))
run_cnn.main(json.loads(sys.argv[2]))
"""


@pytest.fixture(scope="module", autouse=True)
def tf1_mode_runs(tmp_path_factory):
    """``run_nn --replicas 2`` and ``run_cnn --replicas 2 --sync-bn`` in a TF1-mode subprocess
    (v1 control flow and variables), started before the first test: (process, outputs)."""
    out = tmp_path_factory.mktemp("tf1_mode")
    nn = [*MLP, "--replicas", "2", "--out", str(out / "nn")]
    cnn = ["--replicas", "2", "--sync-bn", "--epochs", "2", "--device", "cpu",
           "--out", str(out / "cnn")]
    with open(out / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", TF1_MODE, json.dumps(nn), json.dumps(cnn)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-device run the comparisons use (in-process)."""
    out = tmp_path_factory.mktemp("tf1_single")
    assert call("tf1_compat.run_nn", [*MLP, "--out", str(out)]) == 0
    return out


# -- one replica: the plain graph ----------------------------------------------------------
def graph_nodes(build, task, world=None):
    """(name, op, inputs) of each node of model + loss + train step, built as the runners did
    before towers (`world` None) or through ``build_towers(world)``."""
    with tf.Graph().as_default() as graph:
        v1.set_random_seed(0)
        if world is None:
            loss = make_loss(task, build())
        else:
            loss = build_towers(world, build, lambda model: make_loss(task, model))
        make_train_step(make_optimizer(1e-3), loss)
    return [(node.name, node.op, list(node.input)) for node in graph.as_graph_def().node]


def test_one_replica_builds_the_plain_graph():
    """--replicas 1 (the default) builds the graph of before, node for node; --sync-bn too."""
    mlp = graph_nodes(lambda: models.build_mlp(10), "regression")
    assert graph_nodes(lambda: models.build_mlp(10), "regression", SINGLE) == mlp
    cnn = graph_nodes(lambda: models.build_cnn(INPUT_SHAPE, CLASSES), "classification")
    sync = graph_nodes(lambda: build_sync_cnn(INPUT_SHAPE, CLASSES), "classification", SINGLE)
    assert sync == cnn


# -- the MLP through the entry point --------------------------------------------------------
@pytest.mark.parametrize("cut, resume", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_replicas(cut, resume, single, tmp_path, monkeypatch,
                                                signal_in_epoch):
    """Stopped by SIGINT as epoch 2 starts with `cut` replicas, resumed with `resume`: one
    Saver over the shared variables, so the checkpoint fits either graph; the result is the
    uninterrupted one-device run's (1e-6) and metrics.json records the resumed world."""
    signal_in_epoch(2)
    assert call("tf1_compat.run_nn", [*MLP, "--replicas", str(cut), "--out", str(tmp_path)]) == 130
    monkeypatch.undo()
    assert call("tf1_compat.run_nn", ["--resume", str(tmp_path), "--replicas", str(resume)]) == 0
    assert max_diff(tmp_path, single) <= 1e-6
    assert metrics(tmp_path)["world_size"] == resume
    assert [e["epoch"] for e in metrics(tmp_path)["epochs"]] == [1, 2]


def test_recipes_work_with_towers(tmp_path):
    """Clipping (of the summed gradients' global norm), AdamW's decay and the cosine schedule
    (one global step per batch) with two towers: the one-device weights within 1e-6. bf16
    runs too (its roundings differ with the split: 1.7e-4 apart, against 4e-3 from float32)."""
    recipes = ["--clip-grad-norm", "50", "--weight-decay", "0.01", "--lr-schedule", "cosine"]
    runs = {}
    for name, extra in {"one": recipes, "two": [*recipes, "--replicas", "2"],
                        "bf16": ["--mixed-precision", "bf16"],
                        "bf16-two": ["--mixed-precision", "bf16", "--replicas", "2"]}.items():
        runs[name] = tmp_path / name
        assert call("tf1_compat.run_nn", [*MLP, *extra, "--out", str(runs[name])]) == 0
    assert max_diff(runs["one"], runs["two"]) <= 1e-6
    assert max_diff(runs["bf16"], runs["bf16-two"]) <= 1e-3


def test_run_rnn_towers_equal_one_process(tmp_path):
    """The LSTM classifier (no batch norm, no dropout) on two towers: the one-device weights
    within 1e-6 after one epoch of digits, 40 Adam steps of 27 rows (3.3e-7 measured)."""
    argv = ["--dataset", "digits", "--batch-size", "27", "--epochs", "1", "--deterministic",
            "--device", "cpu"]
    for name, extra in {"one": [], "two": ["--replicas", "2"]}.items():
        assert call("tf1_compat.run_rnn", [*argv, *extra, "--out", str(tmp_path / name)]) == 0
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-6


def test_bad_replica_requests_are_one_sentence_and_exit_2(tmp_path, capsys):
    expect_exit(capsys, "tf1_compat.run_nn", [*MLP, "--replicas", "2", "--batch-size", "1",
                                              "--out", str(tmp_path / "a")], 2, "--batch-size")
    expect_exit(capsys, "tf1_compat.run_cnn", ["--replicas", "2", "--sync-bn", "--fast",
                                               "--out", str(tmp_path / "b")], 2, "--fast")


# -- the CNN: batch norm and dropout across towers ------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """135 digits images: five batches of 27, each split 14/13 by two towers."""
    data = load_dataset("digits", "image", str(REPO / "data"), 0, False)
    return data.x_train[:135], data.y_train[:135]


@contextlib.contextmanager
def cnn_towers(world, build, start):
    """(Session, Towers, train step) of the CNN built by ``build_towers(world, build)``, its
    weights set to the shared-format `start`; one Adam step (lr 1e-3) per run of the step."""
    with tf.Graph().as_default() as graph:
        v1.set_random_seed(0)
        towers = build_towers(world, lambda: build(INPUT_SHAPE, CLASSES),
                              lambda model: make_loss("classification", model))
        train_step = make_train_step(make_optimizer(1e-3), towers)
        initialize = v1.global_variables_initializer()
    with v1.Session(graph=graph, config=session_config("cpu", world.size)) as sess:
        sess.run(initialize)
        models.import_weights(sess, towers.models[0], start)
        yield sess, towers, train_step


@pytest.fixture(scope="module")
def cnn_runs(digits):
    """The CNN's shared-format weights (moving statistics included) after 5 Adam steps on
    batches of 27 (14 + 13 on two towers), dropout off, from the same weights: "one" device,
    two towers with --sync-bn ("sync") and without ("local")."""
    x, y = digits
    start = random_shared_weights("classification", INPUT_SHAPE)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DROPOUT", 0.0)
        for name, world, build in [("one", SINGLE, models.build_cnn), ("sync", TWO, build_sync_cnn),
                                   ("local", TWO, models.build_cnn)]:
            with cnn_towers(world, build, start) as (sess, towers, train_step):
                for index in batch_indices(len(x), 27, 0, 1):
                    sess.run(train_step, feed(towers, x[index], y[index], training=True))
                runs[name] = models.export_weights(sess, towers.models[0])
    return runs


def test_sync_batch_norm_towers_equal_one_process(cnn_runs):
    """--sync-bn: the moments all-reduced over the towers (14 + 13 rows) are the batch's, and
    so is the all-reduced gradient through them: after 5 Adam steps the weights and tower 0's
    moving statistics are the one-device ones within 2e-5 (2.1e-6 measured, on fc1: float32,
    as batch norm computes in float32 whatever the layers' dtype, and Adam's first steps move
    a weight by about lr whatever its gradient's size, so roundings of small gradients show)."""
    assert max_diff(cnn_runs["sync"], cnn_runs["one"]) <= 2e-5


def test_pitfall_unsynced_batch_norm_drifts_across_towers(cnn_runs):
    """Without --sync-bn each tower normalises its own 14 or 13 rows (DDP's and Keras's default,
    and the classic TF1 towers'): not the one-device model any more (0.073 apart after 5 steps,
    on bn3's moving variance: tower 0's rows alone). Pairs with
    ``test_sync_batch_norm_towers_equal_one_process``."""
    assert max_diff(cnn_runs["local"], cnn_runs["one"]) > 1e-2


def test_towers_draw_their_own_dropout_masks(digits):
    """Tower r is built with graph seed + r, which ``models.dropout`` keys its masks on: fed the
    same rows, tower 0 draws the one-device masks and tower 1 others (two replicas drawing one
    mask would drop the same units twice)."""
    x, y = digits[0][:27], digits[1][:27]
    start = random_shared_weights("classification", INPUT_SHAPE)
    logits = []
    for world in (SINGLE, TWO):
        with cnn_towers(world, models.build_cnn, start) as (sess, towers, _):
            logits += [sess.run(model.outputs, feed(model, x, y, training=True))
                       for model in towers.models]
    one, tower0, tower1 = logits
    np.testing.assert_allclose(tower0, one, atol=1e-6)
    assert np.abs(tower1 - one).max() > 1e-2


# -- the v1 library ------------------------------------------------------------------------
def sgd_under_mirrored_strategy(replicas, divide):
    """The weights of a linear model after 5 SGD steps (lr 0.1) of
    ``tf.compat.v1.train.GradientDescentOptimizer.minimize`` run by the v1 MirroredStrategy
    on `replicas` CPU devices, each replica's loss the mean over its rows of a 32-row batch
    (divided by the replica count when `divide`), in a Session."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 10)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32)
    with tf.Graph().as_default() as graph:
        strategy = v1.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
        with strategy.scope():
            w = v1.get_variable("w", initializer=rng.normal(size=(10, 1)).astype(np.float32))
            optimizer = v1.train.GradientDescentOptimizer(0.1)

            def step():
                rows = tf.range(tf.distribute.get_replica_context().replica_id_in_sync_group,
                                len(x), replicas)
                error = tf.matmul(tf.gather(x, rows), w) - tf.gather(y, rows)
                loss = tf.reduce_mean(tf.square(error))
                return optimizer.minimize(loss / replicas if divide else loss)
            train = strategy.group(strategy.extended.call_for_each_replica(step))
        initialize = v1.global_variables_initializer()
    with v1.Session(graph=graph, config=session_config("cpu", replicas)) as sess:
        sess.run(initialize)
        for _ in range(5):
            sess.run(train)
        return sess.run(w)


def test_pitfall_v1_optimizer_sums_the_replicas_gradients():
    """A ``tf.compat.v1`` optimizer scales the loss by 1/replicas only inside an Estimator
    (``_scale_loss_for_estimator``), which TF 2.21 no longer has: Session code ported to the v1
    MirroredStrategy with each replica's mean loss sums 2 gradients, twice the step (0.34
    apart after 5 steps here); dividing by the replica count restores the mean (equal split).
    Pairs with ``test_replicas_2_equal_one_process``: the towers' parts are sum / the step's
    rows, exact also for 14/13."""
    one = sgd_under_mirrored_strategy(1, divide=False)
    assert np.abs(sgd_under_mirrored_strategy(2, divide=False) - one).max() > 1e-2
    assert np.abs(sgd_under_mirrored_strategy(2, divide=True) - one).max() <= 1e-6


# -- last: the TF1-mode subprocess -----------------------------------------------------------
@pytest.fixture(scope="module")
def tf1_mode(tf1_mode_runs):
    proc, out = tf1_mode_runs
    assert proc.wait(timeout=300) == 0, (out / "log").read_text()[-3000:]
    return out


def test_replicas_2_equal_one_process(tf1_mode, single):
    """``run_nn --replicas 2`` in TF1 mode (two CPU towers) ends with the weights of the
    one-device run (in-process, TF2 behaviour) within 1e-6, 3.0e-8 measured (TF1 mode against
    TF1 mode, as the acceptance script compares: 3.0e-8 too), and records its world."""
    assert max_diff(tf1_mode / "nn", single) <= 1e-6
    m = metrics(tf1_mode / "nn")
    assert (m["world_size"], m["backend"], m["devices"]) == (2, "towers", ["/cpu:0", "/cpu:1"])


def test_run_cnn_sync_bn_in_tf1_mode(tf1_mode):
    """``run_cnn --replicas 2 --sync-bn`` with v1 control flow: the collectives inside the
    Switch/Merge conds of batch norm run, and the CNN learns (digits, two epochs: 0.71)."""
    m = metrics(tf1_mode / "cnn")
    assert (m["world_size"], m["backend"]) == (2, "towers")
    assert m["test"]["accuracy"] > 0.5
