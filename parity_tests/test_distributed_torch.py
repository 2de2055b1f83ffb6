"""PyTorch data parallelism (``torch_impl/distributed.py``): torchrun with DDP computes what
one process computes, resumes with another N, and synchronises batch norm on the CPU.

The subprocesses start at once (``runs``) and share the cores while in-process tests go on.
torchrun's store listens on every interface (``ss``: ``*:port``): torchrun runs in a private
network namespace (``unshare -rn``), skipped where there is none; the batch-norm harness
(a file store, gloo on ``lo``) and the one-process groups use loopback only. Run alone,
this file is the harness's worker: ``python test_distributed_torch.py RANK STORE OUT``.
"""
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.numpy import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from common.datasets import batch_indices
from common.distributed import SINGLE, World, shard
from torch_impl import distributed
from torch_impl.distributed import AllReduceBatchNorm2d, shard_batches, sync_batch_norm
from torch_impl.models import build_cnn, build_mlp
from torch_impl.train import make_batches, make_loss, make_optimizer, train_one_epoch

REPO = Path(__file__).resolve().parent.parent
FLOOR = ["--dataset", "diabetes", "--batch-size", "27", "--deterministic", "--seed", "3"]
CUT_EPOCHS = 20  # long enough for the signal to land while the interrupted run trains
PRIVATE = bool(shutil.which("unshare") and shutil.which("ip")) and \
    subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
private_network = pytest.mark.skipif(not PRIVATE, reason="torchrun's store listens on every "
                                     "interface, and there is no private network namespace here")


def torchrun(out, epochs, *launcher):
    """torchrun x2 of run_nn in a private network namespace (exec all along: torchrun's PID)."""
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
            "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *launcher,
            "-m", "torch_impl.run_nn", *FLOOR, "--epochs", str(epochs), "--out", str(out)]


def max_diff(a, b):
    a, b = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    return max(float(np.abs(a[k] - b[k]).max()) for k in a) if a.keys() == b.keys() else 1.0


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory):
    """The module's subprocesses, all started at once, each logging to <out>/<name>.log."""
    runs = SimpleNamespace(out=tmp_path_factory.mktemp("ddp"), procs={})
    out, env = runs.out, {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    commands = {f"bn{rank}": [sys.executable, __file__, str(rank), str(out / "store"),
                              str(out / "bn.json")] for rank in (0, 1)}
    if PRIVATE:
        commands["cut"] = torchrun(out / "cut", CUT_EPOCHS, "--redirects", "3",
                                   "--log-dir", str(out / "ranks"))
        commands["two"] = torchrun(out / "two", 2)
    for name, command in commands.items():
        with open(out / f"{name}.log", "w") as log:
            runs.procs[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                                stderr=subprocess.STDOUT)
    yield runs
    for proc in runs.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(runs, *names):
    for name in names:
        assert runs.procs[name].wait(timeout=400) == 0, \
            (runs.out / f"{name}.log").read_text(errors="replace")[-3000:]


@private_network
def test_interrupted_ddp_run_resumes_in_one_process_to_the_uninterrupted_weights(runs):
    """SIGTERM to torchrun once epoch 1 is saved (the first test: the run is still training):
    the ranks stop at the same batch (the stop flag's all-reduce) without a traceback, and
    state.json names the last whole epoch; one process (here, in-process) resumes to the
    uninterrupted weights within 1e-6 (8.9e-8 measured, 20 epochs). torchrun itself exits 1
    after a signal, not 143."""
    from parity_tests.conftest import call, metrics, wait_for
    cut, full = runs.out / "cut", runs.out / "full"
    wait_for(cut / "checkpoint" / "state.json", "last_checkpoint", runs.procs["cut"], timeout=400)
    runs.procs["cut"].send_signal(signal.SIGTERM)
    assert call("torch_impl.run_nn", [*FLOOR, "--epochs", str(CUT_EPOCHS), "--out", str(full)]) == 0
    assert runs.procs["cut"].wait(timeout=400) == 1
    texts = [p.read_text(errors="replace") for p in (runs.out / "ranks").rglob("*.log")]
    assert len(texts) == 4 and not any("Traceback" in text for text in texts), texts
    assert "SIGTERM received during epoch" in (cut / "run.log").read_text()
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    done = len(state["history"])
    assert 1 <= done < CUT_EPOCHS and state["last_checkpoint"] == f"epoch{done:04d}"
    assert call("torch_impl.run_nn", ["--resume", str(cut)]) == 0
    resumed = metrics(cut)
    assert resumed["world_size"] == 1
    assert [e["epoch"] for e in resumed["epochs"]] == list(range(1, CUT_EPOCHS + 1))
    assert max_diff(full, cut) <= 1e-6


@private_network
def test_ddp_x2_equals_one_process_on_batches_that_split_unevenly(runs):
    """The acceptance floor's command: diabetes, batch 27 (14/13 rows a step, 7/6 the last),
    2 epochs of Adam, vs one process (here, in-process): weights within 1e-6 (3.0e-8
    measured); metrics.json records the world; the train and val losses are one process's
    (float32 sums added in another order: 1e-7 apart)."""
    from parity_tests.conftest import call, metrics
    assert call("torch_impl.run_nn", [*FLOOR, "--epochs", "2", "--out", str(runs.out / "one")]) == 0
    finished(runs, "two")
    assert max_diff(runs.out / "one", runs.out / "two") <= 1e-6
    one, two = metrics(runs.out / "one"), metrics(runs.out / "two")
    assert (two["world_size"], two["backend"], two["devices"]) == (2, "gloo", ["cpu", "cpu"])
    assert one["world_size"] == 1 and len(one["epochs"]) == len(two["epochs"]) == 2
    for a, b in zip(one["epochs"], two["epochs"]):
        assert (a["train_loss"], a["val_loss"]) == \
            pytest.approx((b["train_loss"], b["val_loss"]), rel=1e-6)


@pytest.fixture(scope="module")
def bn(runs):
    """The batch-norm harness's largest differences from one process (``_worker``)."""
    finished(runs, "bn0", "bn1")
    return json.loads((runs.out / "bn.json").read_text())


def test_sync_bn_equals_batch_norm_on_the_whole_batch_layer_and_cnn(bn):
    """2-process gloo group, float64. ``AllReduceBatchNorm2d`` on 4 and 3 rows vs
    ``BatchNorm2d`` on all 7 (outputs, input and parameter gradients, running mean and
    unbiased variance): within 1e-12 (3.1e-15 measured). The project CNN, dropout off (its
    masks differ per rank by design), ``sync_batch_norm`` then DDP, 3 Adam steps of
    ``train_one_epoch`` on 14/13-row shards vs one process: within 1e-9 (7.3e-13 measured)."""
    assert bn["synced_layer"] <= 1e-12 and bn["synced_cnn"] <= 1e-9, bn


def test_pitfall_unsynced_batch_norm_drifts_from_one_process(bn):
    """Library behaviour: DDP leaves ``BatchNorm2d`` alone, so each rank normalises with its
    own rows (the layer: 1.8 apart, gradients included), and the running statistics are rank
    0's (DDP broadcasts its buffers before every forward); the CNN: 1.4e-2 after 3 steps.
    Pairs with test_sync_bn_equals_batch_norm_on_the_whole_batch_layer_and_cnn."""
    assert bn["plain_layer"] > 1e-2 and bn["plain_cnn"] > 1e-3, bn


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    """A gloo group of this process alone (a file store; gloo on the loopback interface)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@private_network
def test_pitfall_ddp_state_dict_keys_carry_module_prefix(one_process_group, runs):
    """Library behaviour: ``DistributedDataParallel(model).state_dict()`` names each tensor
    ``module.<name>``, which no plain model loads. The entry points checkpoint the unwrapped
    model: the torchrun run's checkpoint has the model's own keys. Pairs with
    test_interrupted_ddp_run_resumes_in_one_process_to_the_uninterrupted_weights."""
    model = build_mlp(10)
    assert all(k.startswith("module.") for k in DistributedDataParallel(model).state_dict())
    finished(runs, "two")
    saved = torch.load(runs.out / "two" / "checkpoint" / "epoch0002.pt", weights_only=True)
    assert saved["model"].keys() == model.state_dict().keys()


def test_pitfall_sync_batch_norm_refuses_cpu_modules(one_process_group):
    """Library behaviour: ``nn.SyncBatchNorm`` is CUDA-only; DDP refuses a CPU module that
    holds one. Pairs with test_sync_bn_equals_batch_norm_on_the_whole_batch_layer_and_cnn."""
    cpu = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3),
                                                                nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        DistributedDataParallel(cpu)


def test_pitfall_distributed_sampler_repeats_rows_and_its_order():
    """Library behaviour: ``DistributedSampler`` pads the dataset by repeating rows until
    every rank gets as many (5 rows: rank 1 gets row 0 again), and draws the same order each
    epoch unless ``set_epoch`` is called. ``shard_batches`` cuts each shared batch: no row
    twice, a new order each epoch. Pairs with
    test_ddp_x2_equals_one_process_on_batches_that_split_unevenly."""
    assert [list(DistributedSampler(range(5), 2, r, shuffle=False)) for r in (0, 1)] == \
        [[0, 2, 4], [1, 3, 0]]
    sampler = DistributedSampler(range(10), 2, 0, seed=0)
    assert list(sampler) == list(sampler)

    def rows(epoch):
        loader = make_batches(torch.arange(5.0), torch.zeros(5), 3, seed=0, epoch=epoch)
        return [[int(v) for x, _ in shard_batches(loader, World(2, r)) for v in x] for r in (0, 1)]
    assert sorted(rows(1)[0] + rows(1)[1]) == [0, 1, 2, 3, 4] and rows(1) != rows(2)


def test_pitfall_mean_loss_on_an_uneven_split_is_not_the_batch_mean():
    """Library behaviour: DDP averages the ranks' gradients, so a mean loss per rank weights a
    3-row shard like a 2-row one: 6 SGD steps (165 rows, batch 32, the last 5 rows 3/2, DDP's
    average written out) end 1.8e-2 from one process; the local sum * world / global rows
    (``train.replica_loss``) 3.0e-8. Pairs with
    test_ddp_x2_equals_one_process_on_batches_that_split_unevenly."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(165, 10, generator=gen), torch.randn(165, 1, generator=gen)

    def train(size, scaled):
        torch.manual_seed(0)
        model = build_mlp(10)
        for index in batch_indices(165, 32, 0, 1):
            grads = []
            for rows in (shard(index, rank, size) for rank in range(size)):
                errors = (model(x[rows]) - y[rows]) ** 2
                loss = errors.sum() * size / len(index) if scaled else errors.mean()
                grads.append(torch.autograd.grad(loss, list(model.parameters())))
            with torch.no_grad():  # SGD on DDP's average of the gradients
                for p, *g in zip(model.parameters(), *grads):
                    p -= 0.1 * sum(g) / size
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    one = train(1, scaled=False)
    assert (train(2, scaled=False) - one).abs().max() > 3e-3
    assert (train(2, scaled=True) - one).abs().max() < 1e-6


def test_refusals_a_replica_without_rows_fast_under_torchrun_sync_bn_outside_the_cnn(
        monkeypatch, capsys, tmp_path):
    """Exit 2 with one sentence: a --batch-size that leaves a replica no rows (310 rows,
    batch 3: a last batch of 1), --fast under torchrun; run_nn has no --sync-bn."""
    from parity_tests.conftest import call, expect_exit
    argv = ["--dataset", "diabetes", "--epochs", "1", "--out", str(tmp_path)]

    @contextlib.contextmanager
    def two_ranks(args):  # rank 0 of 2, without a process group: it refuses before training
        yield World(2, 0, "gloo", ("cpu", "cpu")), torch.device("cpu")
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "process_group", two_ranks)
        expect_exit(capsys, "torch_impl.run_nn", [*argv, "--batch-size", "3"], 2,
                    "holds 1 row(s), fewer than the 2 replicas")
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    expect_exit(capsys, "torch_impl.run_cnn", ["--fast", "--out", str(tmp_path)], 2,
                "--fast under torchrun")
    assert call("torch_impl.run_nn", [*argv, "--sync-bn"]) == 2 and \
        "unrecognized arguments: --sync-bn" in capsys.readouterr().err


def _worker(rank, store, out):
    """One rank of the batch-norm harness: the largest differences from one process."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world, mine = World(2, rank, "gloo", ("cpu", "cpu")), slice(rank, None, 2)
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, up = torch.randn(7, 3, 5, 5, generator=gen) * 2 + 1, torch.randn(7, 3, 5, 5, generator=gen)

    def layer(bn, rows):  # output, input and parameter gradients, running statistics
        bn.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        inputs = x[rows].clone().requires_grad_()
        outputs = bn(inputs)
        grads = torch.autograd.grad((outputs * up[rows]).sum(), [inputs, bn.weight, bn.bias])
        params = torch.cat(grads[1:])
        if rows != slice(None):
            dist.all_reduce(params)  # the rows' gradients add up over the ranks
        return outputs.detach(), grads[0], params, bn.running_mean, bn.running_var

    def cnn(sync, trained_world, rows):
        torch.manual_seed(1)
        model = build_cnn((8, 8, 1), 10)
        model.dropout.p = 0.0
        if sync:
            sync_batch_norm(model, trained_world, logging.getLogger("harness"))
        trained = DistributedDataParallel(model) if trained_world.size > 1 else model
        optimizer, data = make_optimizer(model, 1e-3), torch.Generator().manual_seed(2)
        batches = [(torch.randn(27, 1, 8, 8, generator=data)[rows],
                    torch.randint(0, 10, (27,), generator=data)[rows]) for _ in range(3)]
        train_one_epoch(trained, batches, make_loss("classification"), optimizer,
                        "classification", world=trained_world)
        return list(model.state_dict().values())

    whole = layer(nn.BatchNorm2d(3), slice(None))
    want, one = (whole[0][mine], whole[1][mine], *whole[2:]), cnn(False, SINGLE, slice(None))
    diffs = torch.tensor([max(float((a - b).abs().max()) for a, b in zip(got, ref))
                          for got, ref in ((layer(AllReduceBatchNorm2d(3), mine), want),
                                           (layer(nn.BatchNorm2d(3), mine), want),
                                           (cnn(True, world, mine), one),
                                           (cnn(False, world, mine), one))])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps(dict(zip(
            ("synced_layer", "plain_layer", "synced_cnn", "plain_cnn"), diffs.tolist()))))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
