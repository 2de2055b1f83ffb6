"""The compiled matrix products (``scratch/matmul.py``) against numpy, and their rows in
``benchmarks.ops``' ops.csv. Shapes are not multiples of the block sizes (MR 6, NR 2 vectors,
KC 256, MC 96, NC 2048, JB 512), so every edge path runs; skipped only without a compiler.
"""
import csv

import numpy as np
import pytest

from scratch.matmul import VARIANTS, compiled_matmuls

COMPILED, WHY = compiled_matmuls()
needs_compiler = pytest.mark.skipif(not COMPILED, reason=WHY or "")
SHAPES = [(33, 47, 29), (1, 1, 1), (100, 300, 70), (7, 3, 2100), (97, 257, 33),
          (401, 300, 403)]  # the last one is big enough for the threads


@needs_compiler
def test_all_steps_are_built():
    assert set(COMPILED) >= set(VARIANTS) - {"compiled threads"}
    assert all(name.startswith("compiled") for name in COMPILED)


@needs_compiler
@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_compiled_matmul_equals_numpy(name, dtype, tolerance):
    if name not in COMPILED:
        pytest.skip(f"{name} not built (no OpenMP)")
    rng = np.random.default_rng(3)
    for n, m, p in SHAPES:
        a, b = rng.standard_normal((n, m)).astype(dtype), rng.standard_normal((m, p)).astype(dtype)
        got = COMPILED[name](a, b)
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert got.shape == (n, p) and got.dtype == dtype
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want), (name, n, m, p)


@needs_compiler
def test_compiled_matmul_takes_views_and_rejects_bad_shapes():
    a = np.arange(60.0).reshape(6, 10)
    f = COMPILED["compiled vectorised"]
    np.testing.assert_allclose(f(a.T, a[:, ::2]), a.T @ a[:, ::2], rtol=1e-12)
    with pytest.raises(ValueError):
        f(a, a)


def test_compiled_matmul_reason_is_one_line():
    assert (WHY is None) == bool(COMPILED)
    assert WHY is None or "\n" not in WHY


def test_ops_quick_writes_csv_with_compiled_rows(tmp_path, monkeypatch):
    from benchmarks import ops
    matmul_only = lambda device: [b for b in ops.cpu_backends()  # noqa: E731
                                  if b.op == "matmul" and not b.name.startswith("python")]
    monkeypatch.setattr(ops, "collect_backends", matmul_only)
    ops.main(["--quick", "--budget", "0.002", "--out", str(tmp_path)])
    with open(tmp_path / "ops.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"op", "backend", "device", "size", "seconds", "gflops",
            "relative_error"} <= set(rows[0])
    compiled = {r["backend"] for r in rows if r["op"] == "matmul"
                and r["backend"].startswith("compiled")}
    assert compiled == set(COMPILED)
    assert all(r["correct"] == "True" and float(r["gflops"]) > 0 for r in rows)
