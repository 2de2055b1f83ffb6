"""The framework-free data-parallel pieces: ``common/distributed.py`` (the shared rules),
``TrainingRun(world=...)`` (only the chief writes; every process keeps the same
history), ``StopSignal.until_stopped`` (all processes stop at the same batch) and
``common/launch.py`` (TF workers on loopback only). The frameworks' own data-parallel
tests are ``test_distributed_{torch,tf2,tf1}.py``.
"""
import json
import os
import signal
import threading

import numpy as np
import pytest

from common import cli, datasets, launch
from common.distributed import (World, check_split, replica_seed, shard, tf_config_env,
                                torchrun_env)
from common.errors import Interrupted, UserError
from common.runner import CHECKPOINTS, STATE, TrainingRun
from common.seed import epoch_seed
from common.signals import StopSignal


def test_shards_of_a_batch_are_disjoint_and_cover_it_also_when_uneven():
    index = np.array([9, 4, 7, 1, 0, 3, 8])
    parts = [shard(index, rank, 3) for rank in range(3)]
    assert [p.tolist() for p in parts] == [[9, 1, 8], [4, 0], [7, 3]]
    assert sorted(np.concatenate(parts).tolist()) == sorted(index.tolist())


def test_every_batch_of_the_floor_command_splits_unevenly():
    """diabetes, batch 27, 2 replicas: the case the acceptance floor checks (14/13 rows)."""
    dataset = datasets.load_dataset("diabetes", "tabular", seed=3)
    order = datasets.batch_indices(len(dataset.x_train), 27, 3, 1)
    sizes = {(len(shard(i, 0, 2)), len(shard(i, 1, 2))) for i in order}
    assert all(a != b for a, b in sizes), sizes


def test_replica_seeds_differ_per_replica_and_replica_0_is_the_single_process_seed():
    assert replica_seed(5, 2, 0) == epoch_seed(5, 2)
    assert len({replica_seed(5, 2, r) for r in range(4)}) == 4


@pytest.mark.parametrize("rows, batch, size, words", [
    (100, 1, 2, "--batch-size 1 is smaller than the 2 replicas"),
    (101, 20, 2, "holds 1 row(s), fewer than the 2 replicas"),
])
def test_a_batch_that_leaves_a_replica_empty_is_refused(rows, batch, size, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_split(rows, batch, size)


def test_batches_that_every_replica_can_share_are_accepted():
    check_split(100, 20, 2)   # no last batch
    check_split(102, 20, 2)   # a last batch of 2
    check_split(101, 20, 1)   # one replica takes anything


def test_torchrun_and_tf_config_environments_are_read():
    assert torchrun_env({}) is None
    assert torchrun_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert torchrun_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == (2, 1, 1)
    config = launch.tf_config([1234, 1235], 1)
    assert tf_config_env({"TF_CONFIG": config}) == (2, 1)
    assert tf_config_env({}) is None


@pytest.mark.parametrize("text, words", [
    ("{not json", "not a multi-worker configuration"),
    (json.dumps({"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}),
     "not a multi-worker configuration"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}),
     "names a 'chief' task"),
])
def test_a_tf_config_this_project_cannot_run_is_one_sentence(text, words):
    with pytest.raises(UserError, match=words):
        tf_config_env({"TF_CONFIG": text})


def test_world_details_are_what_metrics_json_records():
    world = World(size=2, rank=1, backend="gloo", devices=("cpu", "cpu"))
    assert not world.is_chief and World().is_chief
    assert world.details() == {"world_size": 2, "backend": "gloo", "devices": ["cpu", "cpu"]}


def test_replicas_are_chosen_again_when_a_run_resumes(tmp_path):
    """--resume restores the stored flags except --replicas: a run goes on with another N."""
    parser = cli.build_parser("tf2_impl.run_nn", "tabular", "test", replicas=True)
    out = tmp_path / "run"
    out.mkdir()
    stored = cli.parse_args(parser, ["--replicas", "2", "--lr", "0.01", "--out", str(out)])
    (out / cli.RUN_CONFIG).write_text(json.dumps(cli.saved_config(stored)))
    resumed = cli.parse_args(parser, ["--resume", str(out)])
    assert (resumed.replicas, resumed.lr) == (1, 0.01)
    assert cli.parse_args(parser, ["--resume", str(out), "--replicas", "3"]).replicas == 3


def train(tmp_path, world, losses, saved):
    """Two epochs of a TrainingRun as process `world.rank` of a data-parallel run."""
    args = cli.parse_args(cli.build_parser("torch_impl.run_nn", "tabular", "test"),
                          ["--epochs", "2", "--out", str(tmp_path / "run")])
    dataset = datasets.load_dataset("diabetes", "tabular", seed=0)
    run = TrainingRun(args, "test", dataset, "cpu", save=saved.append, load=saved.append,
                      world=world)
    try:
        for epoch in run.epochs():
            run.end_epoch(epoch, {"loss": 1.0, "mse": 1.0}, {"loss": losses[epoch], "mse": 1.0})
        run.load_best()
        return run, run.finish({"loss": 1.0, "mse": 1.0}, np.zeros((len(dataset.y_test), 1)),
                               {"w": np.zeros(1, np.float32)})
    finally:
        run.stop.uninstall()


def test_only_the_chief_writes_and_every_process_keeps_the_same_history(tmp_path):
    losses = {1: 0.5, 2: 0.7}
    saved = []
    other, nothing = train(tmp_path, World(size=2, rank=1, backend="gloo"), losses, saved)
    assert nothing is None and saved == [] and not (tmp_path / "run").exists()
    chief, metrics = train(tmp_path, World(size=2, rank=0, backend="gloo"), losses, saved)
    def without_times(run):
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in run.history]
    assert without_times(other) == without_times(chief)
    assert other.best_epoch == chief.best_epoch == 1
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"
    assert (tmp_path / "run" / CHECKPOINTS / STATE).is_file()
    assert len(saved) == 3  # two epochs, then the best one loaded


def all_reduce_max(size):
    """`size` functions, one per rank, that meet like an all-reduce of a flag: each waits
    for every rank's flag and returns whether any was set (threads stand in for processes)."""
    barrier, flags = threading.Barrier(size), [False] * size

    def reduce_for(rank):
        def reduce(flag):
            flags[rank] = flag
            barrier.wait()
            result = any(flags)
            barrier.wait()  # all have read before the next batch's flags are posted
            return result
        return reduce
    return [reduce_for(rank) for rank in range(size)]


def test_a_signal_in_one_process_stops_every_process_at_the_same_batch():
    """Rank 1 gets SIGTERM during batch 2; both ranks finish batch 2, agree, and stop."""
    stops = [StopSignal(lambda signum: f"stopped by {signal.Signals(signum).name}") for _ in range(2)]
    reducers = all_reduce_max(2)
    seen, raised = [[], []], [None, None]

    def rank_loop(rank):
        try:
            for batch in stops[rank].until_stopped(range(5), reducers[rank]):
                seen[rank].append(batch)
                if rank == 1 and batch == 2:
                    stops[1]._handle(signal.SIGTERM, None)  # held until the batch ends
        except Interrupted as exc:
            raised[rank] = exc

    threads = [threading.Thread(target=rank_loop, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen == [[0, 1, 2], [0, 1, 2]]
    assert [exc.exit_code for exc in raised] == [128 + signal.SIGTERM] * 2
    assert all("SIGTERM" in str(exc) for exc in raised)


def test_without_a_signal_every_batch_is_trained_and_signals_act_at_once_again():
    stop = StopSignal(lambda signum: "stopped")
    assert list(stop.until_stopped(range(3), lambda flag: flag)) == [0, 1, 2]
    with pytest.raises(Interrupted):
        stop._handle(signal.SIGINT, None)


def test_the_launcher_refuses_to_expose_workers_beyond_loopback(capsys):
    with pytest.raises(UserError, match="private network namespace"):
        launch.check_private_network(["lo", "eth0"])
    launch.check_private_network(["lo"])
    with pytest.raises(SystemExit) as exited:
        launch.main(["--workers", "1", "-m", "tf2_impl.run_nn"])
    assert exited.value.code == 2
    assert "needs at least 2" in capsys.readouterr().err


def test_the_launcher_gives_each_worker_its_place_in_one_loopback_cluster():
    ports = launch.free_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(launch.tf_config(ports, i)) for i in range(3)]
    assert {tuple(c["cluster"]["worker"]) for c in configs} == {
        tuple(f"127.0.0.1:{p}" for p in ports)}
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    args = launch.parse_args(["--workers", "3", "-m", "tf2_impl.run_nn", "--loop", "tape", "-m", "x"])
    assert (args.module, args.args) == ("tf2_impl.run_nn", ["--loop", "tape", "-m", "x"])


def test_the_launcher_passes_on_the_first_failing_worker_exit_code(tmp_path):
    """Two workers of a module that exits with its worker index + 3 when it is not the chief."""
    (tmp_path / "exit_by_index.py").write_text(
        "import json, os, sys\n"
        "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "sys.exit(index + 3 if index else 0)\n")
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env_path}"
    try:
        code = launch.launch(launch.parse_args(["--workers", "2", "-m", "exit_by_index"]))
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert code == 4


def test_a_process_of_several_holds_signals_until_a_batch_ends():
    """With several processes (hold), a signal during evaluation or a checkpoint write
    stops nothing by itself; the next training batch's end stops every process."""
    assert World(size=2, backend="gloo").multi_process and not World(size=2, backend="towers").multi_process
    stop = StopSignal(lambda signum: "stopped", hold=True)
    stop._handle(signal.SIGINT, None)  # e.g. during validation
    with stop.deferred():  # the chief's checkpoint write goes on, and nothing is raised
        pass
    batches = stop.until_stopped(range(3), lambda flag: flag)
    assert next(batches) == 0
    with pytest.raises(Interrupted) as stopped:
        next(batches)
    assert stopped.value.exit_code == 128 + signal.SIGINT


def test_a_replicas_share_of_an_augmented_batch_gets_the_rows_draws_in_the_whole_batch():
    """``augment_batch(share, ..., positions, rows)`` equals those rows of the whole batch's
    augmentation; torch's DDP loader (``shard_batches``) gives each rank exactly them."""
    import torch
    from torch_impl.distributed import shard_batches
    from torch_impl.train import make_batches
    from common.recipes import augment_batch
    x = np.random.default_rng(0).normal(size=(27, 8, 8, 1)).astype(np.float32)
    whole = augment_batch(x, 3, 2, 5, True)
    for rank in range(2):
        positions = np.arange(rank, 27, 2)
        share = augment_batch(x[positions], 3, 2, 5, True, positions, 27)
        np.testing.assert_array_equal(share, whole[positions])
    images = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    loader = make_batches(images, torch.zeros(27), 10, seed=3, epoch=2, augment=True, flip=True)
    one_process = [b for b, _ in loader]
    for rank in range(2):
        world = World(size=2, rank=rank, backend="gloo")
        for whole_batch, (part, _) in zip(one_process, shard_batches(loader, world)):
            torch.testing.assert_close(part, whole_batch[rank::2], rtol=0, atol=0)
