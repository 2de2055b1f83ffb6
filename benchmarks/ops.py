"""How two operations scale with size, in every framework: ``python -m benchmarks.ops``.

A square matrix product (2 n^3 FLOPs) and a 3x3 'valid' convolution (cross-correlation, as
the frameworks define it: 18 (n-2)^2 FLOPs) in pure Python (the product in i-j-k and i-k-j
order), numpy / scipy, C compiled at run time in steps towards BLAS (``scratch.matmul``),
PyTorch and TensorFlow on the CPU and on a GPU torch sees, and cupy there; TF32 off. What
cannot run is reported skipped, with why. All get the same float32 inputs: a warm-up call,
then the median of repeats of at least 20 ms (GPU work synchronised). Each result is checked
in float64 (the product by Freivalds' projection); an error above ``TOLERANCE`` stops the
backend and makes the command exit 1. Sizes double from 16 until one takes longer than
``--budget`` seconds or the next would take four budgets. ``--out`` gets ops.json (rows,
each backend's fitted scaling exponent: pure Python's is about 3 and 2), ops.csv, ops.png.
"""
import argparse
import csv
import math
import os
import statistics
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

from common.cli import positive_float  # importing common installs the import-order guard
from common.outputs import atomic_path, plot_gflops, write_json
from benchmarks import machine
from scratch.matmul import compiled_matmuls

OPS = ("matmul", "conv2d")
TOLERANCE = 1e-3
MAX_SIZE = {"matmul": 16384, "conv2d": 8192}
QUICK_MAX_SIZE = {"matmul": 512, "conv2d": 1024}


def flops(op, n):
    return 2.0 * n ** 3 if op == "matmul" else 18.0 * (n - 2) ** 2


# run(*prepared) is timed; prepare(*numpy inputs) is not; sync() waits for the device's queue.
# A backend that cannot run here (op None: neither) has only `why`, to be reported skipped.
Backend = namedtuple("Backend", "name op device run prepare sync why", defaults=(None,) * 4)


def matmul_ijk(a, b):
    n = len(a)
    c = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            for k in range(n):
                c[i][j] += a[i][k] * b[k][j]
    return c


def matmul_ikj(a, b):
    # matmul_ijk's body; with k outside j the inner loop walks along rows of b and c.
    n = len(a)
    c = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for k in range(n):
            for j in range(n):
                c[i][j] += a[i][k] * b[k][j]
    return c


def conv2d_loops(image, kernel):
    """'valid' cross-correlation: out[i][j] = sum_uv image[i+u][j+v] * kernel[u][v]."""
    m = len(image) - len(kernel) + 1
    return [[sum(image[i + u][j + v] * kernel[u][v] for u in range(len(kernel))
                 for v in range(len(kernel))) for j in range(m)] for i in range(m)]


def cpu_backends():
    from scipy.signal import correlate2d
    lists = lambda *arrays: [a.tolist() for a in arrays]  # noqa: E731
    compiled, why = compiled_matmuls()
    return [Backend("python ijk", "matmul", "cpu", matmul_ijk, lists),
            Backend("python ikj", "matmul", "cpu", matmul_ikj, lists),
            Backend("python loops", "conv2d", "cpu", conv2d_loops, lists),
            Backend("numpy", "matmul", "cpu", np.matmul),
            *(Backend(name, "matmul", "cpu", fn) for name, fn in compiled.items()),
            *([Backend("compiled C", "matmul", "cpu", why=why)] if why else []),
            Backend("scipy", "conv2d", "cpu", lambda x, k: correlate2d(x, k, mode="valid"))]


def torch_backends(device):
    import torch
    import torch.nn.functional as F
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device == "cuda" else None
    return [Backend("torch", "matmul", device, torch.matmul,
                    lambda *a: [torch.from_numpy(x).to(device) for x in a], sync),
            Backend("torch", "conv2d", device, F.conv2d,  # NCHW image, OIHW kernel
                    lambda *a: [torch.from_numpy(x)[None, None].to(device) for x in a], sync)]


def tf_backends(device):
    import tensorflow as tf
    tf.config.experimental.enable_tensor_float_32_execution(False)
    # Eager TF puts an op on a GPU whenever there is one: the CPU needs its own scope.
    name = "/GPU:0" if device == "cuda" else "/CPU:0"
    sync = tf.test.experimental.sync_devices if device == "cuda" else None

    def on(fn):
        def run(*args):
            with tf.device(name):
                return fn(*args)
        return run

    conv = lambda x, k: tf.nn.conv2d(x, k, strides=1, padding="VALID")  # noqa: E731
    return [Backend("tensorflow", "matmul", device, on(tf.linalg.matmul),
                    on(lambda *a: [tf.identity(x) for x in a]), sync),
            Backend("tensorflow", "conv2d", device, on(conv),  # NHWC image, HWIO kernel
                    on(lambda x, k: [tf.identity(x[None, :, :, None]),
                                     tf.identity(k[:, :, None, None])]), sync)]


def cupy_backends():
    os.environ["CUPY_TF32"] = "0"  # cupy's default (read at the first matmul), as elsewhere
    import cupy
    from cupyx.scipy.signal import correlate2d
    prepare, sync = lambda *a: [cupy.asarray(x) for x in a], cupy.cuda.Device().synchronize
    return [Backend("cupy", "matmul", "cuda", cupy.matmul, prepare, sync),
            Backend("cupy", "conv2d", "cuda", lambda x, k: correlate2d(x, k, mode="valid"),
                    prepare, sync)]


def collect_backends(device):
    """The backends for --device, those that cannot run included; torch is imported before
    tensorflow. A GPU is one torch sees."""
    import torch
    cpu = device in ("auto", "cpu")
    gpu = machine.resolve_device(device, torch.cuda.is_available) == "cuda"
    backends = (cpu_backends() + torch_backends("cpu") if cpu else []) + (
        torch_backends("cuda") if gpu else [])
    for d in ["cpu"] * cpu + ["cuda"] * gpu:
        why = machine.tensorflow_problem(d)
        backends += [Backend("tensorflow", None, d, why=why)] if why else tf_backends(d)
    try:
        backends += cupy_backends() if gpu else []
    except Exception as exc:  # not installed, or without a CUDA runtime it can use
        backends.append(Backend("cupy", None, "cuda", why=f"cupy does not load ({exc})"))
    return backends


def make_inputs(op, n, seed=0):
    rng = np.random.default_rng([seed, n, OPS.index(op)])
    other = (n, n) if op == "matmul" else (3, 3)
    return (rng.standard_normal((n, n), dtype=np.float32),
            rng.standard_normal(other, dtype=np.float32))


def relative_error(op, inputs, result):
    """The result's error against numpy in float64 (Freivalds' projection for matmul; einsum,
    not BLAS, whose threads would keep spinning into the next timed call)."""
    a, b = (x.astype(np.float64) for x in inputs)
    mv = lambda m, x: np.einsum("ij,jk->ik", m, x, optimize=False)  # noqa: E731
    result = result.get() if type(result).__module__.startswith("cupy") else result
    result = result.cpu() if hasattr(result, "detach") else result  # a torch tensor
    result = np.squeeze(np.asarray(result, np.float64))
    if op == "matmul":
        v = np.random.default_rng(0).standard_normal((len(a), 3))
        want, got = mv(a, mv(b, v)), (mv(result, v) if result.shape == a.shape else None)
    else:
        m = len(a) - len(b) + 1
        want = sum(b[u, v] * a[u:u + m, v:v + m] for u in range(3) for v in range(3))
        got = result if result.shape == want.shape else None
    if got is None or not np.all(np.isfinite(got)):
        return math.inf
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def time_call(fn, sync, repeats, budget):
    """Median seconds per call of fn() and its last result: a warm-up call, then `repeats`
    repeats of as many calls as fill 20 ms (one call each once a call is slow)."""
    sync = sync or (lambda: None)
    start = time.perf_counter()
    result = fn()
    sync()
    number = max(1, math.ceil(0.02 / max(time.perf_counter() - start, 1e-9)))
    repeats = min(repeats, 2) if time.perf_counter() - start > budget else repeats
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            result = fn()
        sync()
        seconds.append((time.perf_counter() - start) / number)
    return statistics.median(seconds), result


def sweep(backend, limit, budget, repeats):
    """Rows of ops.json for one backend, doubling the size; and why it stopped."""
    rows, n = [], 16
    while n <= limit:
        growth = flops(backend.op, n) / flops(backend.op, n // 2)
        if rows and rows[-1]["seconds"] * growth > 4 * budget:
            return rows, f"size {n} would take more than 4 budgets"
        inputs = make_inputs(backend.op, n)
        try:
            prepared = backend.prepare(*inputs) if backend.prepare else inputs
            seconds, result = time_call(lambda: backend.run(*prepared), backend.sync, repeats,
                                        budget)
        except Exception as exc:  # out of GPU memory, say: this backend's sweep ends
            return rows, f"failed at size {n}: {type(exc).__name__}"
        error = relative_error(backend.op, inputs, result)
        rows.append({"op": backend.op, "backend": backend.name, "device": backend.device,
                     "size": n, "seconds": seconds, "gflops": flops(backend.op, n) / seconds / 1e9,
                     "relative_error": error, "correct": error <= TOLERANCE})
        print(f"  {backend.op:6s} {backend.name:12s} {backend.device:4s} n={n:5d} {seconds:.3e} s "
              f"{rows[-1]['gflops']:8.2f} GFLOP/s {'ok' if error <= TOLERANCE else 'WRONG'}",
              flush=True)
        if error > TOLERANCE:
            return rows, "wrong result"
        if seconds > budget:
            return rows, f"size {n} took more than the budget"
        n *= 2
    return rows, f"largest size {limit}"


def fit_exponent(rows):
    """Slope of log time against log size where the work dominates (>= 1 ms, or the last 3)."""
    use = [r for r in rows if r["seconds"] >= 1e-3]
    use = use if len(use) >= 3 else rows[-3:]
    if len(use) < 2:
        return None
    sizes, seconds = np.log([r["size"] for r in use]), np.log([r["seconds"] for r in use])
    return float(np.polyfit(sizes, seconds, 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ops",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output directory (default runs/benchmarks-ops-<time>)")
    parser.add_argument("--quick", action="store_true", help="small sizes, short budget: smoke run")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="seconds one size may take before a backend stops (3; --quick 0.1)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    budget = args.budget or (0.1 if args.quick else 3.0)
    out = Path(args.out or f"runs/benchmarks-ops-{time.strftime('%Y%m%d-%H%M%S')}")
    info, backends = machine.machine_info(), collect_backends(args.device)
    skipped = [f"{b.name} ({b.device}): {b.why}" for b in backends if b.why]
    if "cupy" in sys.modules:  # its dist is cupy-cuda13x, cupy-cuda12x...: ask the module
        info["versions"]["cupy"] = sys.modules["cupy"].__version__
    print(f"benchmarks.ops on {machine.describe(info)}; budget {budget:g} s per size; TF32 off")
    print("".join(f"  skipped {line}\n" for line in skipped), end="")
    rows, summary = [], []
    for backend in (b for b in backends if not b.why):
        time.sleep(0.3)  # the previous framework's worker threads stop spinning
        mine, stopped = sweep(backend, (QUICK_MAX_SIZE if args.quick else MAX_SIZE)[backend.op],
                              budget, 3 if args.quick else 5)
        rows += mine
        summary.append({"op": backend.op, "backend": backend.name, "device": backend.device,
                        "exponent": fit_exponent(mine), "stopped": stopped,
                        "all_correct": all(r["correct"] for r in mine),
                        "peak_gflops": max((r["gflops"] for r in mine), default=None)})
        print(f"  {backend.op} {backend.name} ({backend.device}): scaling exponent "
              f"{summary[-1]['exponent'] or float('nan'):.2f}; stopped: {stopped}", flush=True)
    write_json(out / "ops.json", {"machine": info, "budget_seconds": budget, "tf32": "off",
                                  "summary": summary, "skipped": skipped, "rows": rows})
    with atomic_path(out / "ops.csv") as tmp, open(tmp, "w", newline="") as f:
        (w := csv.DictWriter(f, list(rows[0]))).writeheader(), w.writerows(rows)
    plot_gflops(out / "ops.png", rows)
    print(f"wrote {out / 'ops.json'}, ops.csv and ops.png (GFLOP/s against n)")
    wrong = [f"{s['op']} {s['backend']} ({s['device']})" for s in summary if not s["all_correct"]]
    if wrong:
        print("error: wrong results from " + ", ".join(wrong), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from common.runner import run_main
    run_main(main)
