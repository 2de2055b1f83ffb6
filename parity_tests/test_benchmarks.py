"""The benchmarks: their arithmetic and checks in-process, then one smoke run of each
``--quick`` entry point in a subprocess. Nothing here is timed or asserts a speed:
the measurements are what ``python -m benchmarks.ops`` / ``benchmarks.training`` are for.
"""
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import flops, ops, training
from benchmarks.workers import ENTRIES

REPO = Path(__file__).resolve().parents[1]
CPU_OPS_BACKENDS = {("matmul", "python ijk"), ("matmul", "python ikj"), ("matmul", "numpy"),
                    ("matmul", "torch"), ("matmul", "tensorflow"), ("conv2d", "python loops"),
                    ("conv2d", "numpy"), ("conv2d", "torch"), ("conv2d", "tensorflow")}
RECORD_FIELDS = {"implementation", "task", "device", "items_per_second", "ratio_to_baseline",
                 "gflops"}


def _clean_env():
    """The environment a user's shell would give: no test-suite precision pins."""
    env = dict(os.environ)
    for key in ("TF_ENABLE_ONEDNN_OPTS", "TF_XLA_FLAGS", "CUBLAS_WORKSPACE_CONFIG"):
        env.pop(key, None)
    return env


# -- in-process: the pieces a wrong benchmark would get wrong -----------------------------
def test_pure_python_kernels_match_numpy():
    a, b = ops.make_inputs("matmul", 7)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    for kernel in (ops.matmul_ijk, ops.matmul_ikj):
        np.testing.assert_allclose(np.array(kernel(a.tolist(), b.tolist())), expected, rtol=1e-12)
    x, k = ops.make_inputs("conv2d", 9)
    from scipy.signal import correlate2d
    np.testing.assert_allclose(np.array(ops.conv2d_loops(x.tolist(), k.tolist())),
                               correlate2d(x.astype(np.float64), k.astype(np.float64), "valid"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["matmul", "conv2d"])
def test_checker_catches_a_fast_wrong_answer(op):
    inputs = ops.make_inputs(op, 64)
    checker = ops.Checker(op, inputs)
    if op == "matmul":
        right = inputs[0] @ inputs[1]
        wrong = [inputs[1] @ inputs[0], right.T, right[:, ::-1], right[:-1, :-1]]
    else:
        from scipy.signal import convolve2d, correlate2d
        right = correlate2d(*inputs, mode="valid")
        # true convolution flips the kernel: the classic framework mix-up
        wrong = [convolve2d(*inputs, mode="valid"), right.T, right * np.nan]
    assert checker.relative_error(right) < ops.TOLERANCE
    for w in wrong:
        assert not checker.relative_error(w) <= ops.TOLERANCE


def test_exponent_fit_recovers_a_power_law():
    rows = [{"size": n, "seconds": 1e-9 * n ** 3} for n in (64, 128, 256, 512)]
    exponent, used = ops.fit_exponent(rows)
    assert exponent == pytest.approx(3.0, abs=1e-9)
    # call overhead under 1 ms is left out of the fit
    rows = [{"size": n, "seconds": max(1e-4, 1e-8 * n ** 2)} for n in (16, 32, 64, 512, 1024, 2048)]
    assert ops.fit_exponent(rows)[0] == pytest.approx(2.0, abs=1e-9)


def test_model_flops_counted_from_config():
    # conv 32x32x32x(3*9) + 16x16x32x(32*9) + 8x8x32x(32*9), fc 512x100 + 100x100 + 100x10
    assert flops.cnn_forward_macs((32, 32, 3), 10) == 884736 + 2359296 + 589824 + 51200 + 10000 + 1000
    assert flops.mlp_forward_macs(10) == 10 * 100 + 100 * 100 + 100
    assert flops.training_flops_per_item("cnn", (32, 32, 3), 10) == 6 * 3896056


def test_record_names_carry_exactly_their_marker():
    """An automated check finds records by substring: torch / tape / fit / tf1."""
    expected = {"torch_eager": "torch", "torch_compile": "torch", "tf2_tape": "tape",
                "tf2_keras_fit": "fit", "tf1_session": "tf1"}
    for task, entries in ENTRIES.items():
        names = [e.name for e in entries]
        assert len(names) == len(set(names))
        for e in entries:
            found = [m for m in training.NAME_MARKERS if m in e.name]
            if e.kind == "implementation":
                assert found == [expected[e.name]], e.name
            else:
                assert found == [], f"{e.name} ({e.kind}) must carry no marker, has {found}"
        assert sum(e.kind == "baseline" for e in entries) == 1
        # the eager PyTorch record is the first one containing "torch"
        assert next(n for n in names if "torch" in n) == "torch_eager"


def test_ratios_are_against_the_same_runs_baseline():
    def record(name, kind, ips, device="cpu"):
        return {"implementation": name, "kind": kind, "task": "cnn", "device": device,
                "items_per_second": ips, "gflops": ips * 2e-2}
    records = training.finish_records(
        [record("baseline_manual_pil_dataloader", "baseline", 1000.0),
         record("torch_eager", "implementation", 2500.0),
         record("tf1_session", "implementation", 2000.0),
         record("baseline_manual_pil_dataloader", "baseline", 4000.0, "cuda"),
         record("torch_eager", "implementation", 8000.0, "cuda")],
        {"cpu": {"numpy": 100.0, "tensorflow": 200.0}})
    by = {(r["implementation"], r["device"]): r for r in records}
    assert by[("baseline_manual_pil_dataloader", "cpu")]["ratio_to_baseline"] == 1.0
    assert by[("torch_eager", "cpu")]["ratio_to_baseline"] == 2.5
    assert by[("torch_eager", "cpu")]["meets_target"] is True
    assert by[("tf1_session", "cpu")]["meets_target"] is False
    assert by[("torch_eager", "cuda")]["ratio_to_baseline"] == 2.0
    assert by[("torch_eager", "cpu")]["percent_of_peak"] == pytest.approx(100 * 50 / 200)


FAKE_WORKER = """
import json, sys, time
from benchmarks.timing import timed_epochs, use_turns, wait_for_turn
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
use_turns(sys.stdin, open(int(args["--turns-fd"]), "w"))
name, epochs, crash = args["--name"], int(args["--epochs"]), int(args["--crash-after"])

def epoch(i):
    if i > crash:
        sys.exit(1)
    with open(args["--trace"], "a") as trace:
        trace.write(f"{name} {i} start {time.time()}\\n")
    time.sleep(0.05)
    with open(args["--trace"], "a") as trace:
        trace.write(f"{name} {i} end {time.time()}\\n")

seconds = timed_epochs(epoch, epochs)
wait_for_turn()
with open(args["--result"], "w") as f:
    json.dump({"seconds": seconds}, f)
"""


def test_workers_take_turns_one_epoch_each_and_never_overlap(tmp_path):
    """benchmarks.training's schedule with stand-in workers: round after round, one
    epoch per worker per turn, no two epochs at the same time; a worker that dies
    midway is reported and does not hold up the others."""
    script, trace = tmp_path / "fake_worker.py", tmp_path / "trace.txt"
    script.write_text(FAKE_WORKER)
    jobs = []
    for name, crash in (("a", 99), ("b", 2), ("c", 99)):
        command = [sys.executable, str(script), "--name", name, "--epochs", "3",
                   "--crash-after", str(crash), "--trace", str(trace),
                   "--result", str(tmp_path / f"{name}.json")]
        jobs.append((command, "cpu", tmp_path / f"{name}.log"))
    outcomes = training.take_turns(jobs, timeout=60)

    events = [line.split() for line in trace.read_text().splitlines()]
    starts = [f"{name}{i}" for name, i, what, _ in events if what == "start"]
    assert starts == ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "c3"]
    for (name, i, what, _), (name2, i2, what2, _) in zip(events[::2], events[1::2]):
        assert (name, i, what) == (name2, i2, "start") and what2 == "end"  # never interleaved
    (a, a_error, _), (b, b_error, _), (c, c_error, _) = outcomes
    assert a_error is None and c_error is None and len(a["seconds"]) == len(c["seconds"]) == 3
    assert b is None and "status 1" in b_error


def test_timed_epochs_drop_what_the_epoch_returns_after_the_clock():
    """The manual's TF2 loop returns its tf.data iterator so that its teardown, which
    can wait seconds in TF 2.21 (benchmarks.baselines), is not timed."""
    from benchmarks.timing import timed_epochs

    class SlowTeardown:
        deleted = 0

        def __del__(self):
            time.sleep(0.3)
            SlowTeardown.deleted += 1

    seconds = timed_epochs(lambda epoch: SlowTeardown(), epochs=2)
    assert SlowTeardown.deleted == 2  # torn down, once per epoch
    assert max(seconds) < 0.3


# -- smoke runs -----------------------------------------------------------------------------
def test_ops_quick_smoke(tmp_path):
    out = tmp_path / "ops"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ops", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=REPO, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "ops.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seen = {(r["op"], r["backend"]) for r in rows if r["device"] == "cpu"}
    assert CPU_OPS_BACKENDS <= seen, f"missing backends: {CPU_OPS_BACKENDS - seen}"
    for r in rows:
        assert r["correct"] == "True", r
        assert float(r["relative_error"]) <= ops.TOLERANCE
        assert float(r["seconds"]) > 0 and float(r["gflops"]) > 0
    with open(out / "exponents.csv", newline="") as f:
        exponents = {(r["op"], r["backend"]): r for r in csv.DictReader(f)}
    # pure Python is all loop body: about 3 for the product, 2 for the convolution
    # (loose bounds: a shared CI machine is noisy)
    assert 2.3 < float(exponents[("matmul", "python ikj")]["exponent"]) < 3.7
    assert 1.5 < float(exponents[("conv2d", "python loops")]["exponent"]) < 2.5
    assert (out / "ops.png").stat().st_size > 10_000
    summary = json.loads((out / "ops.json").read_text())
    assert summary["machine"]["cores"] >= 1 and summary["summary"]


def test_training_quick_smoke(tmp_path):
    out, records_path = tmp_path / "training", tmp_path / "records.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--quick", "--device", "cpu",
                           "--out", str(out), "--json", str(records_path)], cwd=REPO,
                          env=_clean_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(records_path.read_text())
    assert isinstance(records, list)
    expected = {(task, e.name) for task in ENTRIES for e in ENTRIES[task]
                if e.name not in training.OPTIONAL}
    assert {(r["task"], r["implementation"]) for r in records} == expected
    for r in records:
        assert RECORD_FIELDS <= set(r)
        assert r["device"] == "cpu"
        assert math.isfinite(r["items_per_second"]) and r["items_per_second"] > 0
        assert math.isfinite(r["ratio_to_baseline"]) and r["gflops"] > 0
        if r["kind"] == "baseline":
            assert r["ratio_to_baseline"] == 1.0
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "training.txt").read_text().count("\n") > 10
    saved = json.loads((out / "training.json").read_text())
    assert saved["machine"]["cpu"] and saved["records"] == records
