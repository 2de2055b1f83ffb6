"""tf2_impl's four entry points: every task x API x loop trains and writes its outputs, the
defaults and ``--loop`` delegation, --eval-only, --seed; checkpoints, and resume after a
signal equal to the uninterrupted run; bad input (one sentence, the documented exit code).

Short runs (digits 5 epochs, friedman 10) in this process through ``conftest.call``;
a subprocess only where a real process matters (SIGINT, --deterministic across processes).
"""
import json
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from common.datasets import load_dataset
from common.errors import WeightsError
from common.runner import TrainingRun
from common.weights import save_weights
from parity_tests.conftest import call, expect_exit, metrics, random_shared_weights
from tf2_impl import train
from tf2_impl.models import APIS, build_cnn, build_mlp, export_weights, import_weights

TASKS = {
    "classification": {"modules": {"tape": "tf2_impl.run_cnn", "fit": "tf2_impl.run_cnn_keras"},
                       "argv": ["--dataset", "digits", "--epochs", "5"]},
    "regression": {"modules": {"tape": "tf2_impl.run_nn", "fit": "tf2_impl.run_nn_keras"},
                   "argv": ["--dataset", "friedman", "--epochs", "10", "--lr", "0.01"]},
}
DEFAULT_API = {"tf2_impl.run_cnn": "subclassing", "tf2_impl.run_cnn_keras": "functional",
               "tf2_impl.run_nn": "subclassing", "tf2_impl.run_nn_keras": "sequential"}
DIGITS = (8, 8, 1)
COMBOS = [(task, api, loop) for task in TASKS for api in APIS for loop in ("fit", "tape")]


def _command(task, api, loop):
    """The entry point whose default loop is `loop` when `api` is its default too; else
    the other entry point of the task with --loop and --api, which hands the run over."""
    modules = TASKS[task]["modules"]
    if DEFAULT_API[modules[loop]] == api:
        return modules[loop], []
    other = modules["fit" if loop == "tape" else "tape"]
    return other, ["--loop", loop, "--api", api]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{(task, api, loop): output directory} of twelve short in-process runs."""
    root = tmp_path_factory.mktemp("tf2_runs")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    outs = {}
    for task, api, loop in COMBOS:
        module, flags = _command(task, api, loop)
        out = root / f"{task}-{api}-{loop}"
        assert call(module, TASKS[task]["argv"] + flags + ["--out", str(out)]) == 0
        outs[task, api, loop] = out
    for s, handler in saved.items():
        signal.signal(s, handler)
    return outs


@pytest.mark.parametrize("task", list(TASKS))
def test_every_api_and_loop_learns_and_they_agree(task, trained):
    """Each of the six combinations learns; and since the same seed gives the same initial
    weights in every API and both loops train on the same batches, they end close together."""
    key = "accuracy" if task == "classification" else "r2"
    scores = {(api, loop): metrics(trained[task, api, loop])["test"][key]
              for api in APIS for loop in ("fit", "tape")}
    assert min(scores.values()) >= (0.90 if task == "classification" else 0.85), scores
    assert max(scores.values()) - min(scores.values()) <= 0.02, scores


@pytest.mark.parametrize("task", list(TASKS))
def test_fit_and_the_tape_loop_give_the_same_history(task, trained):
    """Same seed, same initial weights, same batches and dropout masks: the two loops agree
    to rounding for two epochs; after that float rounding differences grow with training."""
    api = DEFAULT_API[TASKS[task]["modules"]["fit"]]
    fit, tape = (metrics(trained[task, api, loop])["epochs"] for loop in ("fit", "tape"))
    for a, b in zip(fit, tape):
        rel = 1e-5 if a["epoch"] <= 2 else 3e-2
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=rel), (a["epoch"], key)


@pytest.mark.parametrize("task,api,loop", COMBOS)
def test_entry_points_write_their_outputs_and_honour_the_flags(task, api, loop, trained):
    out = trained[task, api, loop]
    for name in ("metrics.json", "predictions.csv", "curves.png", "run.log", "weights.safetensors",
                 "run_config.json", "checkpoint/state.json"):
        assert (out / name).is_file(), name
    result = metrics(out)
    assert result["implementation"] == "tf2" and result["variant"] == "plain"
    assert result["entry_point"] == TASKS[task]["modules"][loop]  # --loop hands the run over
    assert (result["api"], result["loop"]) == (api, loop)
    argv = TASKS[task]["argv"]
    epochs = int(argv[argv.index("--epochs") + 1])
    assert [e["epoch"] for e in result["epochs"]] == list(range(1, epochs + 1))
    kind = "cnn" if task == "classification" else "mlp"
    name = f"{kind}_{api}" if api != "subclassing" else \
        {"cnn": "cnn_classifier", "mlp": "mlp_regressor"}[kind]
    assert f"model {name} ({api} API" in (out / "run.log").read_text()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    kept = {state["last_checkpoint"], state["best_checkpoint"]}
    files = {p.name for p in (out / "checkpoint").iterdir()} - {"state.json"}
    assert files == {f"{k}{suffix}" for k in kept for suffix in (".index", ".data-00000-of-00001")}
    dataset = argv[argv.index("--dataset") + 1]
    n_test = len(load_dataset(dataset, "image" if kind == "cnn" else "tabular", seed=0).x_test)
    assert len((out / "predictions.csv").read_text().splitlines()) == n_test + 1


@pytest.mark.parametrize("task,loop", [("classification", "fit"), ("regression", "tape")])
def test_eval_only_reproduces_the_test_metrics_from_the_weights_file(task, loop, trained, tmp_path):
    module = TASKS[task]["modules"][loop]
    out = trained[task, DEFAULT_API[module], loop]
    argv = TASKS[task]["argv"][:2] + ["--eval-only", "--weights", str(out / "weights.safetensors")]
    assert call(module, argv + ["--out", str(tmp_path / "eval")]) == 0
    evaluated, original = metrics(tmp_path / "eval"), metrics(out)
    assert evaluated["epochs"] == []
    for key, value in original["test"].items():
        assert evaluated["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_seed_flag_changes_the_run(trained, tmp_path):
    argv = TASKS["classification"]["argv"] + ["--seed", "1", "--out", str(tmp_path / "seed1")]
    assert call("tf2_impl.run_cnn_keras", argv) == 0
    other = (tmp_path / "seed1" / "predictions.csv").read_text()
    assert other != (trained["classification", "functional", "fit"] / "predictions.csv").read_text()


# -- checkpoints and resume ----------------------------------------------------------------------
def test_checkpoint_restores_model_and_optimizer(tmp_path):
    tensors = random_shared_weights("classification", DIGITS)
    model = build_cnn(DIGITS, 10)
    import_weights(model, tensors)
    optimizer = train.make_optimizer(model, 1e-3)
    step = train.make_train_step(model, train.make_loss("classification"), optimizer)
    step(tf.ones((4, *DIGITS)), tf.constant([0, 1, 2, 3], tf.int64))
    train.save_checkpoint(tmp_path / "epoch0001", model, optimizer)
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["epoch0001"] * 2

    other = build_cnn(DIGITS, 10)
    other_optimizer = train.make_optimizer(other, 1e-3)
    train.load_checkpoint(tmp_path / "epoch0001", other, other_optimizer)
    for name, array in export_weights(model).items():
        np.testing.assert_array_equal(export_weights(other)[name], array, err_msg=name)
    assert int(other_optimizer.iterations) == 1
    for a, b in zip(optimizer.variables, other_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    train.load_checkpoint(tmp_path / "epoch0001", build_cnn(DIGITS, 10))  # weights only


def test_a_checkpoint_of_another_model_is_one_sentence(tmp_path):
    model = build_mlp(10)
    train.save_checkpoint(tmp_path / "mlp", model, train.make_optimizer(model, 1e-3))
    for path in (tmp_path / "mlp", tmp_path / "missing"):
        with pytest.raises(WeightsError) as error:
            train.load_checkpoint(path, build_cnn(DIGITS, 10))
        assert "\n" not in str(error.value) and "without --resume" in str(error.value)


@pytest.mark.parametrize("loop", ["fit", "tape"])
def test_interrupt_after_epoch_one_and_resume_equals_the_uninterrupted_run(loop, trained, tmp_path,
                                                                           monkeypatch):
    """A real SIGINT, sent to this process as epoch 1 ends, stops the run in epoch 2;
    --resume finishes it with the predictions of the run that was never stopped."""
    module = TASKS["classification"]["modules"][loop]
    straight = trained["classification", DEFAULT_API[module], loop]
    end_epoch = TrainingRun.end_epoch

    def end_epoch_then_sigint(self, epoch, *args):
        result = end_epoch(self, epoch, *args)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(TrainingRun, "end_epoch", end_epoch_then_sigint)
    stopped = tmp_path / "stopped"
    assert call(module, TASKS["classification"]["argv"] + ["--out", str(stopped)]) == 130
    state = json.loads((stopped / "checkpoint" / "state.json").read_text())
    assert len(state["history"]) == 1
    monkeypatch.setattr(TrainingRun, "end_epoch", end_epoch)

    assert call(module, ["--resume", str(stopped)]) == 0
    assert (stopped / "predictions.csv").read_text() == (straight / "predictions.csv").read_text()
    history, straight_history = metrics(stopped)["epochs"], metrics(straight)["epochs"]
    assert [e["epoch"] for e in history] == [e["epoch"] for e in straight_history]
    assert [e["val_loss"] for e in history] == [e["val_loss"] for e in straight_history]


def test_sigint_to_a_subprocess_then_resume_matches_an_uninterrupted_deterministic_run(tmp_path,
                                                                                      spawn):
    """The command line end to end: Ctrl-C in epoch 2 exits 130, --resume completes, and the
    predictions equal those of an uninterrupted run in another process, bit for bit
    (--deterministic)."""
    module = "tf2_impl.run_cnn_keras"
    args = ["--dataset", "digits", "--epochs", "5", "--deterministic"]
    logs = {name: open(tmp_path / f"{name}.log", "w")
            for name in ("straight", "stopped", "resumed")}
    straight = spawn(module, args + ["--out", str(tmp_path / "straight")], logs["straight"])
    stopped = spawn(module, args + ["--out", str(tmp_path / "stopped")], logs["stopped"])
    deadline = time.monotonic() + 300
    while "epoch 1/5:" not in (tmp_path / "stopped.log").read_text():  # epoch 2 starts now
        assert stopped.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    stopped.send_signal(signal.SIGINT)
    assert stopped.wait(timeout=300) == 130
    state = json.loads((tmp_path / "stopped" / "checkpoint" / "state.json").read_text())
    assert 1 <= len(state["history"]) < 5
    resumed = spawn(module, ["--resume", str(tmp_path / "stopped")], logs["resumed"])
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert "resuming" in (tmp_path / "resumed.log").read_text()
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-2000:]
    for log in logs.values():
        log.close()
    assert (tmp_path / "stopped" / "predictions.csv").read_text() == \
        (tmp_path / "straight" / "predictions.csv").read_text()


# -- bad input: one sentence, the documented exit code --------------------------------------------
def test_weights_of_another_model_or_not_weights_at_all_exit_2(tmp_path, capsys):
    mlp = tmp_path / "mlp.safetensors"
    save_weights(mlp, export_weights(build_mlp(10, "sequential")), {"task": "regression"})
    expect_exit(capsys, "tf2_impl.run_cnn", ["--dataset", "digits", "--eval-only", "--weights",
                                             str(mlp), "--out", str(tmp_path / "o1")],
                2, "mlp.safetensors")
    cifar_shaped = tmp_path / "cifar.safetensors"
    save_weights(cifar_shaped, export_weights(build_cnn((32, 32, 3), 10, "functional")),
                 {"task": "classification"})
    expect_exit(capsys, "tf2_impl.run_cnn_keras",
                ["--dataset", "digits", "--eval-only", "--weights", str(cifar_shaped),
                 "--out", str(tmp_path / "o2")], 2, "conv1.weight", "(32, 1, 3, 3)")
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("not a weights file")
    expect_exit(capsys, "tf2_impl.run_nn", ["--dataset", "diabetes", "--weights", str(foreign),
                                            "--out", str(tmp_path / "o3")], 2, "notes.safetensors")


def test_weights_with_a_conv_bias_before_batch_norm_exit_2(tmp_path, capsys):
    tensors = random_shared_weights("classification", (8, 8, 1))
    tensors["conv1.bias"] = tensors["bn1.bias"]
    old = tmp_path / "old.safetensors"
    save_weights(old, tensors, {"task": "classification"})
    expect_exit(capsys, "tf2_impl.run_cnn", ["--dataset", "digits", "--eval-only", "--weights",
                                             str(old), "--out", str(tmp_path / "o")],
                2, "conv1.bias")


def test_eval_only_without_weights_exits_2(tmp_path, capsys):
    expect_exit(capsys, "tf2_impl.run_nn_keras", ["--eval-only", "--out", str(tmp_path / "o")], 2,
                "--weights")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is present")
def test_device_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    expect_exit(capsys, "tf2_impl.run_cnn", ["--device", "cuda", "--out", str(tmp_path / "o")], 2,
                "--device cpu")


@pytest.mark.parametrize("module", ["tf2_impl.run_nn", "tf2_impl.run_nn_keras",
                                    "tf2_impl.run_cnn", "tf2_impl.run_cnn_keras"])
def test_huge_learning_rate_stops_with_exit_3(module, tmp_path, capsys):
    dataset = "digits" if "cnn" in module else "diabetes"
    assert call(module, ["--dataset", dataset, "--lr", "1e9", "--epochs", "2",
                         "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "loss became" in err and "--lr" in err
