"""TF2 data-parallel (``tf2_impl/distributed.py``) equals one process: weights within 1e-6 on the
floor's command (``../shared/acceptance/distributed``: 14/13 rows). Every --replicas run is a fresh
subprocess, as is this file as a script (``_measure``). Multi-worker: in ``unshare -rn`` only."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
HERE = ["-m", "parity_tests.test_distributed_tf2"]
FLOOR = "--dataset diabetes --batch-size 27 --epochs 2 --deterministic --seed 3".split()
ATOL = 1e-6  # weights after 24 Adam steps; measured 3.0e-8, tape and fit alike
# CNN, 3 SGD steps on 14/13 rows, dropout off, synchronised batch norm: measured 1.2e-7
CNN_ATOL = 1e-6  # (E[x^2] - E[x]^2 over the replicas vs two-pass moments); unsynchronised 0.04
PRIVATE = ("unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")


def _start(argv, log, prefix=()):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as out:
        return subprocess.Popen([*prefix, sys.executable, *argv], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait(proc, log, code=0):
    assert proc.wait(timeout=300) == code, Path(log).read_text()[-3000:]


def _max_diff(a, b):  # of two {name: array}, or of two runs' weights (output directories)
    a, b = (load_file(x / "weights.safetensors") if isinstance(x, Path) else x for x in (a, b))
    return max(float(np.abs(a[k] - b[k]).max()) for k in a.keys() | b.keys())


def _metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def _stop_at_epoch_2():
    """Runs in this context get SIGTERM as epoch 2 starts: exit 143, epoch 1's state on disk."""
    from common.runner import TrainingRun
    start = TrainingRun.start_epoch

    def start_then_stop(run, epoch):
        start(run, epoch)
        if epoch == 2:
            signal.raise_signal(signal.SIGTERM)
    return mock.patch.object(TrainingRun, "start_epoch", start_then_stop)


def _in_process(argv, code=0):
    """``tf2_impl.run_nn`` here; what --deterministic sets (op determinism, environment
    variables) is undone after it."""
    from tensorflow.python.framework import config as tf_config
    from parity_tests.conftest import call
    with mock.patch.dict(os.environ):
        try:
            assert call("tf2_impl.run_nn", argv) == code
        finally:
            tf_config.disable_op_determinism()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{run: output directory} (1, 2: replicas; cut1 / cut2: stopped after epoch 1, resumed
    with 2 / 1 replicas), and ``_measure``'s numbers."""
    root = tmp_path_factory.mktemp("tf2_distributed")
    out = {name: root / name for name in ("tape1", "fit1", "tape2", "fit2", "cut1", "cut2")}
    replicas = ["--replicas", "2", *FLOOR]
    procs = {name: _start(argv, root / f"{name}.log") for name, argv in {
        "tape2": ["-m", "tf2_impl.run_nn", *replicas, "--out", str(out["tape2"])],
        "fit2": ["-m", "tf2_impl.run_nn", "--loop", "fit", *replicas, "--out", str(out["fit2"])],
        "cut2": [*HERE, "cut", *replicas, "--out", str(out["cut2"])],
        "measure": [*HERE, "measure", str(root / "measured.json")]}.items()}
    try:
        with _stop_at_epoch_2():
            _in_process([*FLOOR, "--out", str(out["cut1"])], code=143)
        procs["resume2"] = _start(["-m", "tf2_impl.run_nn", "--resume", str(out["cut1"]),
                                   "--replicas", "2"], root / "resume2.log")
        _in_process([*FLOOR, "--out", str(out["tape1"])])  # meanwhile, in this process
        _in_process(["--loop", "fit", *FLOOR, "--out", str(out["fit1"])])
        for name, proc in procs.items():
            _wait(proc, root / f"{name}.log", 143 if name == "cut2" else 0)
        _in_process(["--resume", str(out["cut2"])])  # --replicas 1, the default
    finally:
        for proc in procs.values():
            proc.kill()  # nothing happens to those that ended
    return {**out, **json.loads((root / "measured.json").read_text())}


# -- the project's runs ----------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["tape", "fit"])
def test_two_replicas_equal_one_process_on_uneven_batches(runs, loop):
    """--replicas 2 (MirroredStrategy, 2 logical CPUs) vs one process: weights, each epoch's
    reported losses (over the global row count, both loops) and the world in metrics.json."""
    assert _max_diff(runs[f"{loop}1"], runs[f"{loop}2"]) <= ATOL
    one, two = _metrics(runs[f"{loop}1"]), _metrics(runs[f"{loop}2"])
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        for key in ("train_loss", "train_mse", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert (two["world_size"], two["backend"], two["devices"]) == (2, "mirrored", ["/cpu:0", "/cpu:1"])


@pytest.mark.parametrize("cut, replicas", [("cut2", 1), ("cut1", 2)])
def test_a_stopped_run_resumes_with_another_number_of_replicas(runs, cut, replicas):
    """Stopped after epoch 1, resumed with another number of replicas (one checkpoint)."""
    assert _metrics(runs[cut])["world_size"] == replicas
    assert _max_diff(runs["tape1"], runs[cut]) <= ATOL


def test_cnn_with_synchronised_batch_norm_equals_one_process(runs):
    """The CNN, dropout off (masks differ per replica by design), 3 steps on 14/13 rows: the
    --sync-bn layers, plain and --fast (fused defers to Keras), equal one process."""
    assert max(runs["cnn_sync"], runs["cnn_sync_fast"]) <= CNN_ATOL


def test_replicas_draw_their_own_dropout_masks_reproducibly(runs):
    """``reseed_dropout``: replica r draws from the epoch's seed + r, again on a resume."""
    assert runs["masks_reseeded_differ"] and runs["masks_reseeded_repeat"]


def test_fit_under_multi_worker_is_one_sentence(monkeypatch, capsys):
    """TF_CONFIG set (common.launch) with --loop fit: refused before any server starts."""
    from parity_tests.conftest import expect_exit
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    expect_exit(capsys, "tf2_impl.run_nn", ["--loop", "fit", "--device", "cpu"], 2,
                "keras-team/keras#20585", "--loop tape")


# -- the libraries' behaviour, each test paired with a project test above -------------------
def test_pitfall_keras_fit_crashes_when_the_first_batch_splits_unevenly(runs):
    """Keras 3.15 fit averages the first batch over the replicas to read its shapes: 14 and
    13 rows fail (keras#21069). Pairs with test_two_replicas_..._uneven_batches[fit]."""
    assert "AddN" in runs.get("fit_crash", "") and "[14,10] != input 1: [13,10]" in runs["fit_crash"]


def test_pitfall_keras_loss_is_a_mean_of_replica_means(runs):
    """Keras's loss, each replica's mean over the replica count, summed over 14/13 rows is not
    the batch mean. Pairs with test_two_replicas_..._uneven_batches[fit] (GlobalBatchLoss)."""
    assert runs["keras_mean"] > 1e-3 and runs["step_batch"] < 1e-6


def test_pitfall_a_constant_global_batch_size_is_wrong_for_the_last_batch(runs):
    """``compute_average_loss(global_batch_size=27)`` on the last batch's 13 rows is 13/27 of
    its mean; the step's own count is exact. Pairs with test_two_replicas_..._batches[tape]."""
    assert runs["constant_batch"] == pytest.approx(14 / 27, rel=1e-5) and runs["step_batch"] < 1e-6


def test_pitfall_unsynchronised_batch_norm_drifts(runs):
    """Keras's default batch norm normalises each replica with its own rows: the CNN drifts
    from one process. Pairs with test_cnn_with_synchronised_batch_norm_equals_one_process."""
    assert runs["cnn_unsynced"] > 1e-2


def test_pitfall_the_fused_batch_norm_kernel_sees_one_replica(runs):
    """``fused_batch_norm`` (--fast's kernel) gives each replica its own mean, Keras's synced
    moments the global one. Pairs with test_cnn_with_synchronised_batch_norm_equals_one_process."""
    assert runs["fused_mean"] > 1e-2 and runs["synced_mean"] < 1e-6


def test_pitfall_keras_dropout_draws_the_same_mask_on_every_replica(runs):
    """Keras 3's Dropout seed state is mirrored: both replicas draw one mask
    (keras-team/keras#20611). Pairs with test_replicas_draw_their_own_dropout_masks_reproducibly."""
    assert runs["masks_same"]


# -- multi-worker, in a private network namespace only ----------------------------------------
needs_namespace = pytest.mark.skipif(
    not (shutil.which("unshare") and shutil.which("ip")) or
    subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0,
    reason="no private network namespace (unshare -rn): TensorFlow's gRPC server listens widely")


@pytest.mark.slow
@needs_namespace
def test_two_workers_equal_one_process(tmp_path):
    """common.launch --workers 2 (MultiWorkerMirroredStrategy, tape loop) vs one process."""
    _in_process([*FLOOR, "--out", str(tmp_path / "one")])
    _wait(_start(["-m", "common.launch", "--workers", "2", "-m", "tf2_impl.run_nn", *FLOOR,
                  "--out", str(tmp_path / "mw")], tmp_path / "log", PRIVATE), tmp_path / "log")
    assert [_metrics(tmp_path / "mw")[k] for k in ("backend", "world_size")] == ["multiworker", 2]
    assert _max_diff(tmp_path / "one", tmp_path / "mw") <= ATOL


@pytest.mark.slow
@needs_namespace
def test_pitfall_the_grpc_server_listens_on_every_interface(tmp_path):
    """A worker of a cluster named 127.0.0.1:port listens on every address (0.0.0.0, [::]).
    Pairs with test_two_workers_equal_one_process (common.launch: private namespaces only)."""
    _wait(_start([*HERE, "grpc", str(tmp_path / "out.json")], tmp_path / "log", PRIVATE),
          tmp_path / "log")
    listening = json.loads((tmp_path / "out.json").read_text())
    assert listening and all(set(address) == {"0"} for address in listening), listening


# -- run as a script: a stopped run, the measurements (2 logical CPUs), a gRPC server ---------
def _measure():
    """{name: number or flag} of the Keras / TensorFlow behaviours the tests above state."""
    from argparse import Namespace
    from common.distributed import shard
    from tf2_impl import distributed, fast, models, train  # common, then tensorflow
    import keras
    import tensorflow as tf
    strategy, world = distributed.make_strategy(Namespace(replicas=2, loop="tape"), "cpu")
    single, local = tf.distribute.get_strategy(), strategy.experimental_local_results
    rng, out = np.random.default_rng(0), {}

    def split(*arrays):  # replica r: rows r::2
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tuple(shard(a, ctx.replica_id_in_sync_group, 2) for a in arrays))
    with strategy.scope():
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    try:
        model.fit(rng.normal(size=(27, 10)), rng.normal(size=(27, 1)), batch_size=27, verbose=0)
    except tf.errors.InvalidArgumentError as exc:
        out["fit_crash"] = str(exc).splitlines()[0]
    # The replicas' losses summed (what their summed gradients differentiate) vs the mean.
    mse, rows = keras.losses.MeanSquaredError(), distributed.per_example(keras.losses.MeanSquaredError())
    for name, n, size in (("keras_mean", 27, None), ("constant_batch", 13, 27), ("step_batch", 13, 13)):
        y, p = (rng.normal(size=(n, 1)).astype(np.float32) for _ in "yp")
        loss = mse if size is None else \
            (lambda t, q, size=size: tf.nn.compute_average_loss(rows(t, q), global_batch_size=size))
        summed = strategy.reduce("SUM", strategy.run(loss, args=split(y, p)), axis=None)
        out[name] = abs(float(summed) / float(mse(y, p)) - 1)
    # Its own generator: a ReLU input within rounding of 0 (some seeds) flips a gradient.
    cnn_rng = np.random.default_rng(1)
    images, labels = cnn_rng.normal(size=(81, 8, 8, 1)).astype(np.float32), cnn_rng.integers(0, 10, 81)

    def cnn(on, build=models.build_cnn, sync_bn=True):
        with on.scope():
            keras.utils.set_random_seed(0)
            net = build((8, 8, 1), 10, "functional", sync_bn)
            net.get_layer("dropout").rate = 0.0  # the replicas' masks differ by design
            # SGD: Adam's first steps move any weight whose gradient is ~0 by +-lr.
            optimizer = keras.optimizers.SGD(0.1)
            optimizer.build(net.trainable_variables)
        step = distributed.make_train_step(on, net, train.make_loss("classification"), optimizer)
        for b in range(3):
            step(images[27 * b:27 * (b + 1)], labels[27 * b:27 * (b + 1)])
        return {i: w.numpy() for i, w in enumerate(net.weights)}  # moving statistics too
    reference = cnn(single, sync_bn=False)
    out["cnn_sync"] = _max_diff(reference, cnn(strategy))
    out["cnn_sync_fast"] = _max_diff(reference, cnn(strategy, fast.build_cnn))
    out["cnn_unsynced"] = _max_diff(reference, cnn(strategy, sync_bn=False))
    maps = rng.normal(size=(27, 4, 4, 3)).astype(np.float32)

    def means(xr):  # the fused kernel's batch mean, and Keras's synchronised one
        _, fused, _ = tf.compat.v1.nn.fused_batch_norm(xr, tf.ones(3), tf.zeros(3), is_training=True)
        return fused, keras.ops.moments(xr, axes=[0, 1, 2], synchronized=True)[0]

    for name, mean in zip(("fused_mean", "synced_mean"), strategy.run(means, args=split(maps))):
        out[name] = max(float(np.abs(m - maps.mean(axis=(0, 1, 2))).max()) for m in local(mean))
    with strategy.scope():
        dropout = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5)])
    drop = tf.function(lambda x: dropout(x, training=True))

    def masks():
        return [t.numpy() for t in local(strategy.run(drop, args=(tf.ones((4, 64)),)))]
    out["masks_same"] = bool(np.array_equal(*masks()))
    distributed.reseed_dropout(strategy, world, dropout, 7)
    reseeded = masks()
    distributed.reseed_dropout(strategy, world, dropout, 7)  # the same epoch again
    out["masks_reseeded_differ"] = not np.array_equal(*reseeded)
    out["masks_reseeded_repeat"] = all(np.array_equal(a, b) for a, b in zip(reseeded, masks()))
    return out


def _listening(port=23456):
    """The addresses a TensorFlow worker for 127.0.0.1:port listens on (/proc/net/tcp*)."""
    import tensorflow as tf
    tf.distribute.Server(tf.train.ClusterSpec({"worker": [f"127.0.0.1:{port}"]}),
                         job_name="worker", task_index=0)
    fields = [line.split() for table in ("/proc/net/tcp", "/proc/net/tcp6")
              for line in Path(table).read_text().splitlines()[1:]]
    return [local.split(":")[0] for _, local, _, state, *_ in fields
            if int(local.split(":")[1], 16) == port and state == "0A"]  # 0A: LISTEN


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "cut":
        from common.runner import run_main
        from tf2_impl import run_nn
        with _stop_at_epoch_2():
            run_main(run_nn.main, args)
    else:
        Path(args[0]).write_text(json.dumps(_measure() if mode == "measure" else _listening()))
