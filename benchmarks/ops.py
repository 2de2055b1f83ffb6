"""How two operations scale with size, in every framework: ``python -m benchmarks.ops``.

A square matrix product ``C = A @ B`` (n x n, 2 n^3 FLOPs) and a 2-D 3x3
'valid' convolution of one n x n single-channel image (cross-correlation, as
deep-learning frameworks and the course define it: 18 (n-2)^2 FLOPs), in

* pure Python lists: the matrix product in i-j-k and in i-k-j loop order (same
  loop body, only the order differs), the convolution with plain loops;
* numpy: ``np.matmul``; ``scipy.signal.correlate2d(mode="valid")``;
* PyTorch: ``torch.matmul``; ``F.conv2d`` on a 1x1xNxN (NCHW) tensor;
* TensorFlow: ``tf.linalg.matmul``; ``tf.nn.conv2d`` on a 1xNxNx1 (NHWC) tensor;
* cupy, when it is installed: ``cp.matmul``; ``cupyx.scipy.signal.correlate2d``;

PyTorch and TensorFlow on the CPU and on a GPU when one is visible.

How it measures (``benchmarks.timing``): every backend gets the same float32
inputs (seeded per size); a warm-up call precedes the timing; the median of
several repeats is reported; GPU work is synchronised before the clock stops,
and the host-to-device copy of the inputs is timed separately (``copy_seconds``).
TensorFloat-32 is switched off in torch and TensorFlow so GPU figures are
float32 figures. Every result is checked with numpy in float64: the convolution
element by element, the matrix product by Freivalds' projection
(``C v == A (B v)`` for random vectors v, O(n^2), so checking never costs more
than the product itself); a relative error above ``TOLERANCE`` marks the result
wrong, stops that backend's sweep and makes the command exit 1.

Sizes double from 16; each backend runs its whole sweep before the next. A
backend stops growing once one size takes longer than ``--budget`` seconds
(default 3: past a minute nothing new is learnt), or when the next size,
extrapolated from this one, would take more than ``PREDICTED_LIMIT`` budgets,
or when it fails (out of memory, say: reported, not fatal).

Outputs in ``--out`` (default runs/benchmarks-ops-<time>): ``ops.csv`` (one row
per backend and size), ``exponents.csv`` (the fitted scaling exponent per
backend: pure Python reads about 3 for the product and 2 for the convolution),
``ops.png`` (log-log time against size, one line per backend) and ``ops.json``
(all of it plus the machine and versions).
"""
import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (installs the torch/tensorflow import-order guard first)
import numpy as np

from common.errors import UserError
from common.outputs import atomic_path, write_json
from benchmarks import machine
from benchmarks.timing import median, spread, time_call

OPS = ("matmul", "conv2d")
TOLERANCE = 1e-3
FIRST_SIZE = 16
MAX_SIZE = {"matmul": 16384, "conv2d": 8192}
QUICK_MAX_SIZE = {"matmul": 512, "conv2d": 1024}
PREDICTED_LIMIT = 4.0
QUICK_BUDGET = 0.1
DEFAULT_BUDGET = 3.0


def flops(op, n):
    """Floating-point operations (multiply and add counted separately)."""
    if op == "matmul":
        return 2.0 * n ** 3
    return 2.0 * 9 * (n - 2) ** 2


@dataclass
class Backend:
    """One way of computing one op on one device."""

    name: str
    op: str
    device: str
    function: str
    run: callable                # run(*prepared) -> result, the timed call
    prepare: callable            # prepare(*numpy inputs) -> backend inputs
    to_numpy: callable = np.asarray
    sync: callable = None        # blocks until queued device work is done
    max_size: int = None                # --quick's cap

    @property
    def label(self):
        return f"{self.name} ({self.device})"


# -- pure Python ---------------------------------------------------------------------------
def matmul_ijk(a, b):
    n = len(a)
    c = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            for k in range(n):
                c[i][j] += a[i][k] * b[k][j]
    return c


def matmul_ikj(a, b):
    # The same body as matmul_ijk; with k outside j the innermost loop walks
    # along rows of b and c instead of down a column of b.
    n = len(a)
    c = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for k in range(n):
            for j in range(n):
                c[i][j] += a[i][k] * b[k][j]
    return c


def conv2d_loops(image, kernel):
    """'valid' 2-D cross-correlation: out[i][j] = sum_uv image[i+u][j+v] * kernel[u][v]."""
    n, m = len(image), len(kernel)
    out = [[0.0] * (n - m + 1) for _ in range(n - m + 1)]
    for i in range(n - m + 1):
        for j in range(n - m + 1):
            s = 0.0
            for u in range(m):
                for v in range(m):
                    s += image[i + u][j + v] * kernel[u][v]
            out[i][j] = s
    return out


def _to_lists(*arrays):
    return tuple(a.tolist() for a in arrays)


def python_backends():
    return [
        Backend("python ijk", "matmul", "cpu", "lists, i-j-k loops", matmul_ijk, _to_lists),
        Backend("python ikj", "matmul", "cpu", "lists, i-k-j loops", matmul_ikj, _to_lists),
        Backend("python loops", "conv2d", "cpu", "lists, 4 nested loops", conv2d_loops, _to_lists),
    ]


# -- numpy / scipy ------------------------------------------------------------------------
def numpy_backends():
    from scipy.signal import correlate2d

    def identity(*arrays):
        return arrays

    return [
        Backend("numpy", "matmul", "cpu", "np.matmul", np.matmul, identity),
        Backend("numpy", "conv2d", "cpu", "scipy.signal.correlate2d",
                lambda x, k: correlate2d(x, k, mode="valid"), identity),
    ]


# -- PyTorch ------------------------------------------------------------------------------
def torch_backends(device):
    import torch
    import torch.nn.functional as F
    dev = torch.device(device)
    sync = None
    if device == "cuda":
        # Ampere+ GPUs would otherwise run convolutions in TensorFloat-32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        sync = torch.cuda.synchronize

    def prepare_matmul(a, b):
        return torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)

    def prepare_conv(x, k):
        # NCHW: batch 1, channel 1; weight (out 1, in 1, 3, 3).
        return (torch.from_numpy(x).reshape(1, 1, *x.shape).to(dev),
                torch.from_numpy(k).reshape(1, 1, *k.shape).to(dev))

    def to_numpy(y):
        return y.detach().cpu().numpy()

    return [
        Backend("torch", "matmul", device, "torch.matmul", torch.matmul, prepare_matmul,
                to_numpy, sync),
        Backend("torch", "conv2d", device, "F.conv2d (NCHW 1x1xNxN)", F.conv2d, prepare_conv,
                lambda y: to_numpy(y)[0, 0], sync),
    ]


def torch_cuda_available():
    if not machine.may_have_cuda():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# -- TensorFlow ---------------------------------------------------------------------------
def tf_backends(device):
    import tensorflow as tf
    tf.config.experimental.enable_tensor_float_32_execution(False)
    for gpu in tf.config.list_physical_devices("GPU"):
        try:  # TF takes all GPU memory at its first op otherwise, and cupy runs after it
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # devices already initialised (the CPU backends ran first)
            pass
    # Eager TF places an op on the GPU whenever one exists, wherever its inputs
    # live, so the CPU run needs an explicit device scope around every call.
    name = "/GPU:0" if device == "cuda" else "/CPU:0"
    sync = tf.test.experimental.sync_devices if device == "cuda" else None

    def prepare_matmul(a, b):
        with tf.device(name):
            return tf.identity(tf.convert_to_tensor(a)), tf.identity(tf.convert_to_tensor(b))

    def prepare_conv(x, k):
        # NHWC: batch 1, channel last; filter (kh, kw, in 1, out 1).
        with tf.device(name):
            return (tf.identity(tf.convert_to_tensor(x.reshape(1, *x.shape, 1))),
                    tf.identity(tf.convert_to_tensor(k.reshape(*k.shape, 1, 1))))

    def matmul(a, b):
        with tf.device(name):
            return tf.linalg.matmul(a, b)

    def conv(x, k):
        with tf.device(name):
            return tf.nn.conv2d(x, k, strides=1, padding="VALID")

    return [
        Backend("tensorflow", "matmul", device, "tf.linalg.matmul", matmul, prepare_matmul,
                lambda y: y.numpy(), sync),
        Backend("tensorflow", "conv2d", device, "tf.nn.conv2d (NHWC 1xNxNx1)", conv, prepare_conv,
                lambda y: y.numpy()[0, :, :, 0], sync),
    ]


def tf_gpu_available():
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


# -- cupy ---------------------------------------------------------------------------------
def cupy_backends():
    import cupy as cp

    def prepare(*arrays):
        return tuple(cp.asarray(a) for a in arrays)

    sync = cp.cuda.Device().synchronize
    backends = [Backend("cupy", "matmul", "cuda", "cp.matmul", cp.matmul, prepare, cp.asnumpy, sync)]
    try:
        from cupyx.scipy.signal import correlate2d
    except ImportError:  # older cupy: no scipy.signal twin
        return backends
    return backends + [Backend("cupy", "conv2d", "cuda", "cupyx.scipy.signal.correlate2d",
                               lambda x, k: correlate2d(x, k, mode="valid"), prepare, cp.asnumpy,
                               sync)]


def cupy_available():
    import importlib.util
    if importlib.util.find_spec("cupy") is None or not machine.may_have_cuda():
        return False
    try:
        import cupy as cp
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # cupy installed without a usable CUDA runtime
        return False


def installed(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def collect_backends(device, quick):
    """(backends, skipped notes) for --device; torch is imported before tensorflow."""
    want_cpu = device in ("auto", "cpu")
    want_gpu = device in ("auto", "cuda")
    backends, skipped = [], []
    if want_cpu:
        backends += python_backends() + numpy_backends()
    has_torch, has_tf = installed("torch"), installed("tensorflow")
    torch_gpu = has_torch and want_gpu and torch_cuda_available()
    if has_torch:
        if want_cpu:
            backends += torch_backends("cpu")
        if torch_gpu:
            backends += torch_backends("cuda")
        elif want_gpu:
            skipped.append("torch (cuda): no GPU visible to torch")
    else:
        skipped.append("torch: not installed")
    if has_tf:
        tf_gpu = want_gpu and machine.may_have_cuda() and tf_gpu_available()
        if want_cpu:
            backends += tf_backends("cpu")
        if tf_gpu:
            backends += tf_backends("cuda")
        elif want_gpu:
            skipped.append("tensorflow (cuda): no GPU visible to tensorflow")
    else:
        skipped.append("tensorflow: not installed")
    if want_gpu:
        if cupy_available():
            backends += cupy_backends()
        else:
            skipped.append("cupy: not installed or no GPU")
    if device == "cuda" and not any(b.device == "cuda" for b in backends):
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu or auto")
    if quick:
        for b in backends:
            b.max_size = QUICK_MAX_SIZE[b.op]
    return backends, skipped


# -- inputs and the numpy check -----------------------------------------------------------
def make_inputs(op, n, seed=0):
    """The float32 inputs every backend gets for (op, n)."""
    rng = np.random.default_rng([seed, n, OPS.index(op)])
    if op == "matmul":
        return (rng.standard_normal((n, n), dtype=np.float32),
                rng.standard_normal((n, n), dtype=np.float32))
    return (rng.standard_normal((n, n), dtype=np.float32),
            rng.standard_normal((3, 3), dtype=np.float32))


def _matvecs(m, v):
    """m @ v without BLAS: numpy's BLAS threads would keep spinning after the check
    and slow down the next timed call of another framework."""
    return np.einsum("ij,jk->ik", m, v, optimize=False)


class Checker:
    """The numpy float64 reference for one (op, n), against which a result is checked."""

    def __init__(self, op, inputs, seed=0):
        self.op = op
        if op == "matmul":
            a, b = (x.astype(np.float64) for x in inputs)
            self.vectors = np.random.default_rng(seed).standard_normal((a.shape[1], 3))
            self.expected = _matvecs(a, _matvecs(b, self.vectors))
        else:
            x, k = (v.astype(np.float64) for v in inputs)
            m = x.shape[0] - k.shape[0] + 1
            self.expected = sum(k[u, v] * x[u:u + m, v:v + m]
                                for u in range(k.shape[0]) for v in range(k.shape[1]))

    def relative_error(self, result):
        result = np.asarray(result, dtype=np.float64)
        if self.op == "matmul":
            if result.shape != (self.vectors.shape[0],) * 2:
                return math.inf
            got = _matvecs(result, self.vectors)
        else:
            if result.shape != self.expected.shape:
                return math.inf
            got = result
        if not np.all(np.isfinite(got)):
            return math.inf
        return float(np.linalg.norm(got - self.expected) / np.linalg.norm(self.expected))


# -- the sweep ----------------------------------------------------------------------------
def sizes(op, limit):
    n = FIRST_SIZE
    while n <= limit:
        yield n
        n *= 2


def measure(backend, n, inputs, settings):
    """One row of ops.csv: time first, then check the result against numpy."""
    copy_seconds = None
    if backend.device == "cuda":
        copies, prepared, _ = time_call(lambda: backend.prepare(*inputs), backend.sync,
                                        repeats=settings.repeats, min_repeat_seconds=0.0)
        copy_seconds = median(copies)
    else:
        prepared = backend.prepare(*inputs)
    seconds, result, number = time_call(lambda: backend.run(*prepared), backend.sync,
                                        repeats=settings.repeats,
                                        min_repeat_seconds=settings.min_repeat_seconds,
                                        budget=settings.budget)
    error = Checker(backend.op, inputs).relative_error(backend.to_numpy(result))
    t = median(seconds)
    lo, hi = spread(seconds)
    return {
        "op": backend.op, "backend": backend.name, "device": backend.device,
        "function": backend.function, "size": n, "seconds": t, "min_seconds": lo,
        "max_seconds": hi, "repeats": len(seconds), "calls_per_repeat": number,
        "gflops": flops(backend.op, n) / t / 1e9, "copy_seconds": copy_seconds,
        "relative_error": error, "correct": bool(error <= TOLERANCE),
    }


def sweep(backends, settings, log):
    """Each backend runs its whole sweep before the next starts, with a pause in
    between: a framework's worker threads keep spinning for a moment after their
    last op, and on a small machine they would steal cores from the next one."""
    rows, stops = [], {}
    for b in backends:
        limit = b.max_size or MAX_SIZE[b.op]
        previous = None
        time.sleep(settings.pause)
        for n in sizes(b.op, limit):
            if previous is not None:
                predicted = previous["seconds"] * flops(b.op, n) / flops(b.op, previous["size"])
                if predicted > PREDICTED_LIMIT * settings.budget:
                    stops[b.label + b.op] = (f"size {n} would take ~{predicted:.1f} s "
                                             f"(> {PREDICTED_LIMIT:g} x budget)")
                    break
            inputs = make_inputs(b.op, n)
            try:
                row = measure(b, n, inputs, settings)
            except Exception as exc:  # e.g. out of GPU memory: the sweep of this backend ends
                text = str(exc).strip().splitlines()
                stops[b.label + b.op] = f"failed at size {n}: {type(exc).__name__} {text[0] if text else ''}"
                log(f"  {b.op:6s} {b.label:22s} n={n:6d} {stops[b.label + b.op]}")
                break
            rows.append(row)
            previous = row
            flag = "ok" if row["correct"] else f"WRONG (relative error {row['relative_error']:.2g})"
            log(f"  {b.op:6s} {b.label:22s} n={n:6d} {row['seconds']:.3e} s "
                f"{row['gflops']:9.3f} GFLOP/s  {flag}")
            if not row["correct"]:
                stops[b.label + b.op] = "wrong result"
                break
            if row["seconds"] > settings.budget:
                stops[b.label + b.op] = f"size {n} took longer than the {settings.budget:g} s budget"
                break
        else:
            stops[b.label + b.op] = f"largest size {limit}" + (" (--quick)" if b.max_size else "")
    return rows, stops


def fit_exponent(rows):
    """Slope of log(seconds) against log(size) over the sizes where the work, not
    the call overhead, dominates: times >= 1 ms, or else the three largest sizes."""
    rows = sorted(rows, key=lambda r: r["size"])
    use = [r for r in rows if r["seconds"] >= 1e-3]
    if len(use) < 3:
        use = rows[-3:]
    if len(use) < 2:
        return None, use
    x = np.log([r["size"] for r in use])
    y = np.log([r["seconds"] for r in use])
    return float(np.polyfit(x, y, 1)[0]), use


def summarise(rows, backends, stops):
    summary = []
    for b in backends:
        mine = [r for r in rows if r["op"] == b.op and r["backend"] == b.name and r["device"] == b.device]
        if not mine:
            continue
        exponent, used = fit_exponent(mine)
        best = max(mine, key=lambda r: r["gflops"])
        summary.append({
            "op": b.op, "backend": b.name, "device": b.device, "function": b.function,
            "exponent": exponent, "fit_sizes": f"{used[0]['size']}-{used[-1]['size']}",
            "largest_size": max(r["size"] for r in mine), "peak_gflops": best["gflops"],
            "peak_at_size": best["size"], "all_correct": all(r["correct"] for r in mine),
            "stopped": stops.get(b.label + b.op, ""),
        })
    return summary


# -- outputs ------------------------------------------------------------------------------
ROW_FIELDS = ["op", "backend", "device", "function", "size", "seconds", "min_seconds",
              "max_seconds", "repeats", "calls_per_repeat", "gflops", "copy_seconds",
              "relative_error", "correct"]
SUMMARY_FIELDS = ["op", "backend", "device", "function", "exponent", "fit_sizes",
                  "largest_size", "peak_gflops", "peak_at_size", "all_correct", "stopped"]


def write_csv(path, rows, fields):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k) for k in fields})


def plot(path, rows, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, op in zip(axes, OPS):
        for s in summary:
            if s["op"] != op:
                continue
            mine = sorted((r for r in rows if r["op"] == op and r["backend"] == s["backend"]
                           and r["device"] == s["device"]), key=lambda r: r["size"])
            slope = f", slope {s['exponent']:.2f}" if s["exponent"] is not None else ""
            ax.loglog([r["size"] for r in mine], [r["seconds"] for r in mine], marker="o",
                      label=f"{s['backend']} ({s['device']}){slope}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title("square matrix product" if op == "matmul" else "3x3 'valid' convolution")
        ax.set_xlabel("n (matrix n x n, image n x n)")
        ax.set_ylabel("seconds per call (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def format_table(rows, summary):
    lines = []
    for op in OPS:
        lines.append(f"\n{op}: size, median seconds, GFLOP/s")
        lines.append(f"{'backend':24s} {'size':>6s} {'seconds':>11s} {'GFLOP/s':>10s} "
                     f"{'copy s':>10s} {'rel.err':>8s} check")
        for r in rows:
            if r["op"] != op:
                continue
            copy = f"{r['copy_seconds']:.3e}" if r["copy_seconds"] is not None else "-"
            lines.append(f"{r['backend'] + ' (' + r['device'] + ')':24s} {r['size']:6d} "
                         f"{r['seconds']:11.3e} {r['gflops']:10.3f} {copy:>10s} "
                         f"{r['relative_error']:8.1e} {'ok' if r['correct'] else 'WRONG'}")
    lines.append("\nscaling exponent (slope of log time against log n) and peak GFLOP/s")
    lines.append(f"{'op':7s} {'backend':24s} {'exponent':>8s} {'fit sizes':>11s} "
                 f"{'peak GFLOP/s':>12s} {'at n':>6s}  stopped because")
    for s in summary:
        exp = f"{s['exponent']:.2f}" if s["exponent"] is not None else "-"
        lines.append(f"{s['op']:7s} {s['backend'] + ' (' + s['device'] + ')':24s} {exp:>8s} "
                     f"{s['fit_sizes']:>11s} {s['peak_gflops']:12.3f} {s['peak_at_size']:6d}  "
                     f"{s['stopped']}")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------
@dataclass
class Settings:
    budget: float
    repeats: int
    min_repeat_seconds: float
    pause: float


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ops",
        description="Time a square matrix product and a 3x3 convolution over growing sizes "
                    "in pure Python, numpy, PyTorch, TensorFlow (and cupy); fit the scaling "
                    "exponents.")
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/benchmarks-ops-<time>)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and a short budget: a smoke run of under 30 s")
    parser.add_argument("--budget", type=_positive_float, default=None,
                        help=f"seconds one size may take before a backend stops growing "
                             f"(default {DEFAULT_BUDGET:g}, {QUICK_BUDGET:g} with --quick)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CPU backends plus GPU ones when a GPU is visible")
    return parser


def _positive_float(text):
    from common.cli import positive_float
    return positive_float(text)


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    budget = args.budget or (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    settings = Settings(budget=budget, repeats=3 if args.quick else 5,
                        min_repeat_seconds=0.005 if args.quick else 0.02,
                        pause=0.25 if args.quick else 0.5)
    out = Path(args.out or Path("runs") / f"benchmarks-ops-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    backends, skipped = collect_backends(args.device, args.quick)
    info = machine.machine_info()
    print(f"benchmarks.ops on {machine.describe(info)}")
    print(f"budget {budget:g} s per size, {settings.repeats} repeats, median reported; "
          f"{len(backends)} backends" + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
    rows, stops = sweep(backends, settings, print)
    summary = summarise(rows, backends, stops)
    write_csv(out / "ops.csv", rows, ROW_FIELDS)
    write_csv(out / "exponents.csv", summary, SUMMARY_FIELDS)
    plot(out / "ops.png", rows, summary)
    write_json(out / "ops.json", {
        "machine": info, "budget_seconds": budget, "repeats": settings.repeats,
        "tolerance": TOLERANCE, "quick": args.quick, "skipped": skipped,
        "summary": summary, "rows": rows,
        "seconds_total": time.perf_counter() - started})
    print(format_table(rows, summary))
    print(f"\nwrote {out / 'ops.csv'}, {out / 'exponents.csv'}, {out / 'ops.png'}, "
          f"{out / 'ops.json'} in {time.perf_counter() - started:.1f} s")
    wrong = [s for s in summary if not s["all_correct"]]
    if wrong:
        print("error: wrong results from " + ", ".join(f"{s['op']} {s['backend']} ({s['device']})"
                                                        for s in wrong), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from common.runner import run_main
    run_main(main)
