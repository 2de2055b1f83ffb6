"""The benchmarks' code: which pipelines are measured against which reference, the
records and the JSON they are written to, one tiny epoch of every pipeline, the turns
of the benchmark processes, and the operation-scaling benchmark's checks. Nothing here
is timed or asserts a speed: measuring is what ``python -m benchmarks.training`` and
``python -m benchmarks.ops`` are for.
"""
import contextlib
import json
import math
import sys
import types

import numpy as np
import pytest

from benchmarks import ops, training
from benchmarks.data import benchmark_data
from benchmarks.pipelines import Parts, pipelines, set_up
from scratch.matmul import compiled_matmuls

REFERENCES = {"torch_impl": "manual torch DataLoader pipeline",
              "tf2_impl.run_cnn": "manual TF2 GradientTape loop",
              "tf2_impl.run_cnn_keras": "manual Keras fit", "tf1_compat": "manual TF1 graph"}
SCHEMA = {"name": str, "variant": str, "task": str, "device": str, "items_per_second": float,
          "ratio_to_baseline": float}


def settings(task="cnn", items=200, epochs=1, quick=False):
    return {"task": task, "device": "cpu", "items": items, "warmup": 1, "epochs": epochs,
            "quick": quick}


def fake_results(task, rates, items=200):
    """What `training.measure` returns, for pipelines training at `rates` {(name, variant):
    items/s} (warm-up epoch twice as slow); the others failed."""
    results = {}
    for p in pipelines(task):
        rate = rates.get((p.name, p.variant))
        seconds = [2 * items / rate, items / rate, items / rate] if rate else []
        results[p] = {"epoch_seconds": seconds, "error": None if rate else "RuntimeError: boom"}
    return results


def test_every_entry_point_plain_and_fast_against_its_frameworks_reference():
    for task, entry in (("cnn", "run_cnn"), ("mlp", "run_nn"), ("rnn", "run_rnn")):
        found = pipelines(task)
        manual = {p.name for p in found if p.variant == "manual"}
        assert manual == (set() if task == "rnn" else set(REFERENCES.values()))  # no manual RNN
        assert len({(p.name, p.variant) for p in found}) == len(found) == 8 + len(manual)
        names = {p.name for p in found if p.variant != "manual"}
        assert names == {f"torch_impl.{entry}", f"tf2_impl.{entry}", f"tf2_impl.{entry}_keras",
                         f"tf1_compat.{entry}"}
        for name in names:
            assert {p.variant for p in found if p.name == name} == {"plain", "fast"}
    for p in pipelines("cnn"):
        key = p.name if p.name.startswith("tf2_impl") else p.package
        assert p.reference == (p.name if p.variant == "manual" else REFERENCES[key])
    assert all(p.reference is None for p in pipelines("rnn"))


def test_rnn_rows_stand_without_a_manual_reference(tmp_path, monkeypatch, capsys):
    rates = {(p.name, p.variant): 100.0 + i for i, p in enumerate(pipelines("rnn"))}
    monkeypatch.setattr(training, "ask", lambda code: "None")  # TensorFlow can run here
    monkeypatch.setattr(training, "measure",
                        lambda groups, config, logs: fake_results("rnn", rates, config["items"]))
    training.main(["--task", "rnn", "--device", "cpu", "--items", "500", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "training.json").read_text())["records"]
    assert len(records) == 8 and {r["unit"] for r in records} == {"sequences/s"}
    assert all(r["reference"] is None and r["ratio_to_baseline"] is None for r in records)
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("tf1_compat.run_rnn"))
    assert row.split()[1:] == ["106", "107", "1.01x", "-", "-", "-", "-"]


def test_ratios_divide_by_the_same_frameworks_reference_in_the_same_run():
    rates = {("manual torch DataLoader pipeline", "manual"): 100.0,
             ("torch_impl.run_cnn", "plain"): 200.0, ("torch_impl.run_cnn", "fast"): 400.0,
             ("manual TF2 GradientTape loop", "manual"): 50.0, ("tf2_impl.run_cnn", "fast"): 75.0,
             ("manual Keras fit", "manual"): 80.0, ("tf2_impl.run_cnn_keras", "plain"): 40.0,
             ("tf1_compat.run_cnn", "fast"): 300.0}  # its reference failed
    records, failures = training.make_records(fake_results("cnn", rates), settings(),
                                              {"cpu": "test cpu", "cores": 2, "gpus": []})
    ratio = {(r["name"], r["variant"]): r["ratio_to_baseline"] for r in records}
    assert ratio == pytest.approx({("manual torch DataLoader pipeline", "manual"): 1.0,
                                   ("torch_impl.run_cnn", "plain"): 2.0,
                                   ("torch_impl.run_cnn", "fast"): 4.0,
                                   ("manual TF2 GradientTape loop", "manual"): 1.0,
                                   ("tf2_impl.run_cnn", "fast"): 1.5,
                                   ("manual Keras fit", "manual"): 1.0,
                                   ("tf2_impl.run_cnn_keras", "plain"): 0.5,
                                   ("tf1_compat.run_cnn", "fast"): None})
    speed = {(r["name"], r["variant"]): r["items_per_second"] for r in records}
    assert speed[("torch_impl.run_cnn", "fast")] == pytest.approx(400.0)  # warm-up left out
    assert len(failures) == 12 - len(rates) and all("boom" in f for f in failures)
    assert any(f.startswith("manual TF1 graph (manual)") for f in failures)


@pytest.mark.parametrize("broken", [False, True])
def test_main_writes_the_records_as_a_json_list(tmp_path, monkeypatch, capsys, broken):
    rates = {(p.name, p.variant): 100.0 + i for i, p in enumerate(pipelines("mlp"))}
    if broken:
        del rates[("tf2_impl.run_nn_keras", "fast")]
    monkeypatch.setattr(training, "measure",
                        lambda groups, config, logs: fake_results("mlp", rates, config["items"]))
    path, out = tmp_path / "records.json", tmp_path / "out"
    argv = ["--task", "mlp", "--device", "cpu", "--items", "500", "--json", str(path),
            "--out", str(out)]
    with pytest.raises(SystemExit) if broken else contextlib.nullcontext() as stopped:
        training.main(argv)
    records = json.loads(path.read_text())
    assert isinstance(records, list) and len(records) == len(rates)
    for r in records:
        for field, kind in SCHEMA.items():
            assert isinstance(r[field], kind), (field, r)
        assert (r["task"], r["device"], r["unit"], r["items_per_epoch"]) == ("mlp", "cpu",
                                                                           "rows/s", 500)
        assert math.isfinite(r["items_per_second"]) and r["cpu"]
    saved = json.loads((out / "training.json").read_text())
    assert saved["records"] == records and saved["machine"]["cores"] >= 1
    report = capsys.readouterr()
    assert (out / "training.txt").read_text().strip() in report.out
    row = next(line for line in report.out.splitlines() if line.startswith("torch_impl.run_nn"))
    assert row.split()[1:4] == ["101", "102", "1.01x"]  # plain, fast, fast/plain
    if broken:
        assert stopped.value.code == 1 and "1 of 12 pipelines failed" in report.err
        assert "FAILED tf2_impl.run_nn_keras (fast): RuntimeError: boom" in report.out


NO_GPU = "tensorflow 2.21.0 sees no GPU (it needs the CUDA 12 libraries of `uv sync --extra gpu`)"


def fake_probe(tensorflow_answer):
    """`training.ask` answering as a machine where torch sees a GPU and TensorFlow says
    `tensorflow_answer` ("None": it can run there)."""
    def ask(code):
        return "True" if "torch.cuda" in code else tensorflow_answer
    return ask


@pytest.mark.parametrize("why", ["None", NO_GPU, "tensorflow is not installed (simulated)"])
def test_tensorflow_pipelines_are_skipped_with_the_reason_where_tensorflow_cannot_run(
        tmp_path, monkeypatch, capsys, why):
    monkeypatch.setattr(training, "ask", fake_probe(why))
    monkeypatch.setattr(training.machine, "may_have_cuda", lambda: True)
    measured, skipped = training.select("cnn", "cuda")
    tensorflow = [p for p in pipelines("cnn") if p.package != "torch_impl"]
    if why == "None":
        assert (measured, skipped) == (pipelines("cnn"), [])
        return
    assert measured == [p for p in pipelines("cnn") if p.package == "torch_impl"]
    assert skipped == [f"{p.name} ({p.variant}): {why}" for p in tensorflow]
    started = []

    def measure(groups, settings, logs):  # the torch pipelines train; nothing else starts
        started.extend(p for group in groups for p in group)
        rates = {(p.name, p.variant): 100.0 for p in started}
        return {p: r for p, r in fake_results("cnn", rates, settings["items"]).items()
                if p in started}
    monkeypatch.setattr(training, "measure", measure)
    training.main(["--device", "auto", "--items", "300", "--out", str(tmp_path)])  # no exit 1
    assert started == measured
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["settings"]["device"] == "cuda" and saved["settings"]["tf32"] == training.TF32
    assert (saved["skipped"], saved["failures"]) == (skipped, [])
    assert {r["name"] for r in saved["records"]} == {p.name for p in measured}
    out = capsys.readouterr().out
    assert all(f"SKIPPED {line}" in out for line in skipped) and "FAILED" not in out
    assert "TF32 framework defaults" in out


def test_fast_functions_replace_the_plain_ones_of_the_same_name():
    from torch_impl import fast, models, train
    quick, plain = Parts("torch_impl", True), Parts("torch_impl", False)
    assert quick.build_cnn is fast.build_cnn and plain.build_cnn is models.build_cnn
    assert quick.make_batches is fast.make_batches and plain.make_batches is train.make_batches
    assert quick.make_loss is plain.make_loss is train.make_loss
    with pytest.raises(AttributeError, match="torch_impl defines no no_such_function"):
        quick.no_such_function


@pytest.mark.parametrize("task", ["cnn", "mlp", "rnn"])
def test_torch_and_tf2_pipelines_train_one_epoch(task):
    """In this process (torch and TF2 are imported already); TF1 needs its own (below)."""
    data = benchmark_data(task, 100)
    if task == "rnn":  # the CNN's images, one row (32 x 3 features) per time step
        np.testing.assert_array_equal(data.x, benchmark_data("cnn", 100).x.reshape(100, 32, 96))
    for p in pipelines(task):
        if p.package != "tf1_compat":
            assert set_up(p, task, data, "cpu")(1) > 0, p


@pytest.mark.parametrize("task", ["cnn", "rnn"])
def test_tf1_pipelines_take_turns_in_their_own_process(tmp_path, task):
    group = [p for p in pipelines(task) if p.package == "tf1_compat"]
    results = training.measure([group], settings(task, items=100), tmp_path)
    for p in group:
        assert results[p]["error"] is None and len(results[p]["epoch_seconds"]) == 2, results[p]
    assert (tmp_path / "1-tf1_compat.log").is_file()


# -- benchmarks.ops ---------------------------------------------------------------------------
def test_pure_python_kernels_match_numpy():
    a, b = ops.make_inputs("matmul", 7)
    for kernel in (ops.matmul_ijk, ops.matmul_ikj):
        assert ops.relative_error("matmul", (a, b), kernel(a.tolist(), b.tolist())) < 1e-6
    x, k = ops.make_inputs("conv2d", 9)
    assert ops.relative_error("conv2d", (x, k), ops.conv2d_loops(x.tolist(), k.tolist())) < 1e-6


@pytest.mark.parametrize("op", ["matmul", "conv2d"])
def test_the_check_catches_a_fast_wrong_answer(op):
    inputs = ops.make_inputs(op, 64)
    if op == "matmul":
        right = inputs[0] @ inputs[1]
        wrong = [inputs[1] @ inputs[0], right.T, right[:, ::-1], right[:-1, :-1]]
    else:
        from scipy.signal import convolve2d, correlate2d
        right = correlate2d(*inputs, mode="valid")
        # a true convolution flips the kernel: the classic framework mix-up
        wrong = [convolve2d(*inputs, mode="valid"), right.T, right * np.nan]
    assert ops.relative_error(op, inputs, right) < ops.TOLERANCE
    for w in wrong:
        assert not ops.relative_error(op, inputs, w) <= ops.TOLERANCE


def test_exponent_fit_leaves_call_overhead_out():
    rows = [{"size": n, "seconds": 1e-9 * n ** 3} for n in (64, 128, 256, 512)]
    assert ops.fit_exponent(rows) == pytest.approx(3.0)
    rows = [{"size": n, "seconds": max(1e-4, 1e-8 * n ** 2)} for n in (16, 32, 64, 512, 1024, 2048)]
    assert ops.fit_exponent(rows) == pytest.approx(2.0)


def test_ops_quick_smoke(tmp_path, capsys):
    ops.main(["--quick", "--device", "cpu", "--budget", "0.005", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "ops.json").read_text())
    seen = {(r["op"], r["backend"]) for r in saved["rows"]}
    compiled = {("matmul", name) for name in compiled_matmuls()[0]}  # scratch/matmul.py
    assert seen == {("matmul", "python ijk"), ("matmul", "python ikj"), ("matmul", "numpy"),
                    ("matmul", "torch"), ("matmul", "tensorflow"), ("conv2d", "python loops"),
                    ("conv2d", "scipy"), ("conv2d", "torch"), ("conv2d", "tensorflow")} | compiled
    assert all(r["correct"] and r["seconds"] > 0 for r in saved["rows"])
    assert len(saved["summary"]) == 9 + len(compiled) and saved["machine"]["cpu"]


def test_ops_reports_tensorflow_skipped_and_runs_the_others(monkeypatch):
    why = "tensorflow is not installed (simulated)"
    monkeypatch.setattr(ops.machine, "tensorflow_problem", lambda device: why)
    backends = ops.collect_backends("cpu")
    assert [b for b in backends if b.name == "tensorflow"] == [
        ops.Backend("tensorflow", None, "cpu", why=why)]
    assert {b.name for b in backends if not b.why} >= {"numpy", "scipy", "torch"}


def test_ops_records_what_was_skipped_tf32_and_cupys_own_version(tmp_path, monkeypatch, capsys):
    skip = ops.Backend("tensorflow", None, "cuda", why=NO_GPU)
    monkeypatch.setattr(ops, "collect_backends",
                        lambda device: [ops.Backend("numpy", "matmul", "cpu", np.matmul), skip])
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="14.2.0"))
    ops.main(["--quick", "--budget", "0.002", "--out", str(tmp_path)])  # no exit 1
    saved = json.loads((tmp_path / "ops.json").read_text())
    assert saved["skipped"] == [f"tensorflow (cuda): {NO_GPU}"] and saved["tf32"] == "off"
    assert {r["backend"] for r in saved["rows"]} == {"numpy"}
    assert saved["machine"]["versions"]["cupy"] == "14.2.0"
    out = capsys.readouterr().out
    assert "cupy 14.2.0" in out and "TF32 off" in out
    assert f"skipped tensorflow (cuda): {NO_GPU}" in out
