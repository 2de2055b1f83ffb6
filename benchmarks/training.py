"""Training throughput of every implementation: ``python -m benchmarks.training``.

Images per second (CNN, CIFAR-shaped synthetic images) and rows per second
(MLP, make_friedman1 rows) for

* the implementations, through their own ``train_one_epoch``: ``torch_eager``
  and ``torch_compile`` (torch_impl, the second on ``torch.compile(model)``, kept
  only when it works), ``tf2_tape`` and ``tf2_keras_fit`` (tf2_impl's two
  loops), ``tf1_session`` (tf1_compat);
* the baseline, the course manual's PyTorch pipeline reproduced faithfully
  (``benchmarks.baselines``): ``baseline_manual_pil_dataloader`` for the CNN (a
  PIL image per sample, ``ToTensor`` + ``Normalize`` in a ``DataLoader`` with
  batch 100 and the default ``num_workers=0``), ``baseline_manual_tensordataset_loader``
  for the MLP; every record's ``ratio_to_baseline`` divides by the baseline
  measured in the same run, on the same device;
* the course manual's TF versions as reference records, so the report shows
  the TF figures the implementations were asked to beat:
  ``manual_tf2_gradient_loop``, ``manual_keras_tfdata``, ``manual_tf_graph_session``.

Method: every entry runs in its own process (``benchmarks.workers``: clean
state, the import-order rule, ``CUDA_VISIBLE_DEVICES=""`` on CPU), on the CPU
and on CUDA when present; batch 100; one warm-up epoch (allocations, graph
tracing, ``torch.compile``) is excluded, and the median of the timed epochs is
reported with their spread (min and max). The processes of one task and device
take turns (``take_turns``): one computes at a time, one epoch per turn, round
after round, so every implementation's epochs are spread over the same minutes
and a slow spell of a shared machine does not land on one implementation alone.
Next to each figure: the model's training FLOPs per item counted analytically
(``benchmarks.flops``), the achieved GFLOP/s, and that as a percentage of the
machine's float32 matrix-product peak (measured by the workers with
``benchmarks.ops``'s code, or read from an ``ops.csv`` given with ``--ops-csv``).

Record names carry one marker each, so a script can find them: "torch" (the
PyTorch implementation; the eager record comes first), "tape", "fit", "tf1";
baselines and references carry none of the four (``NAME_MARKERS``).

Outputs: the table on stdout and in ``--out``/training.txt, a bar chart
(training.png), training.json (machine, versions, records, failures) and, with
``--json PATH``, the list of records alone. ``--quick`` is a smoke run (tiny
data, one timed epoch, no torch.compile, one process per framework family
instead of per entry, the processes running at the same time): its numbers are
not measurements.
"""
import argparse
import csv
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (installs the torch/tensorflow import-order guard first)

from common.cli import positive_int
from common.errors import UserError
from common.outputs import atomic_path, atomic_write_text, write_json
from benchmarks import machine
from benchmarks.data import FRIEDMAN_FEATURES, IMAGE_SHAPE, NUM_CLASSES
from benchmarks.flops import training_flops_per_item
from benchmarks.workers import ENTRIES

ROOT = Path(__file__).resolve().parent.parent
NAME_MARKERS = ("torch", "tape", "fit", "tf1")
# Implementation targets, as ratios to the manual's PyTorch pipeline (CNN, CPU).
TARGETS = {"torch": 2.0, "tape": 2.73, "fit": 2.68, "tf1": 2.91}
# The course manual's own figures on its 2-core CPU (images/s), for the reader.
COURSE_FIGURES = {"baseline_manual_pil_dataloader": 1900, "manual_tf2_gradient_loop": 3900,
                  "manual_keras_tfdata": 3800, "manual_tf_graph_session": 5400}
OPTIONAL = {"torch_compile"}  # reported when it fails, never fatal
DEFAULT_IMAGES = 10000
DEFAULT_ROWS = 50000
QUICK_IMAGES = 300
QUICK_ROWS = 2000
WORKER_TIMEOUT = 900
QUICK_WORKER_TIMEOUT = 240


def marker(name):
    """The one marker substring of a record name, or None."""
    found = [m for m in NAME_MARKERS if m in name]
    return found[0] if len(found) == 1 else None


def target_ratio(task, device, entry):
    if task != "cnn" or device != "cpu" or entry.kind != "implementation":
        return None
    return TARGETS.get(marker(entry.name))


# -- planning and running the worker processes ---------------------------------------------
def cuda_available():
    if not machine.may_have_cuda():
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, cwd=ROOT)
    return probe.stdout.strip().endswith("True")


def resolve_devices(name):
    has_cuda = name != "cpu" and cuda_available()
    if name == "cuda" and not has_cuda:
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu or auto")
    return {"auto": ["cpu"] + (["cuda"] if has_cuda else []), "cpu": ["cpu"], "cuda": ["cuda"]}[name]


def plan(tasks, device, quick, skip):
    """The processes to start: lists of (task, entry), one list per process.

    One entry per process; with --quick one process per framework family, both
    tasks in it, because start-up (about 5 s per TensorFlow process on 2 cores)
    would otherwise be most of a smoke run."""
    jobs = [(task, e) for task in tasks for e in ENTRIES[task] if e.name not in skip]
    if not quick:
        return [[job] for job in jobs]
    jobs = [(task, e) for task, e in jobs if e.name not in OPTIONAL]
    families = []
    for _, e in jobs:
        if e.family not in families:
            families.append(e.family)
    return [[(t, e) for t, e in jobs if e.family == f] for f in families]


def worker_command(group, device, epochs, sizes, quick, peak, result):
    command = [sys.executable, "-m", "benchmarks.workers",
               "--jobs", ",".join(f"{task}:{e.name}" for task, e in group), "--device", device,
               "--epochs", str(epochs), "--images", str(sizes["cnn"]), "--rows", str(sizes["mlp"]),
               "--result", str(result)]
    if peak:
        command += ["--peak", ",".join(peak)]
    if quick:
        command.append("--quick")
    return command


def worker_env(device):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # no framework can put work on a GPU
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def read_result(command, returncode, log_path):
    """(parsed result or None, one-line error or None) of a finished worker."""
    result_path = Path(command[command.index("--result") + 1])
    if returncode != 0 or not result_path.is_file():
        return None, f"worker exited with status {returncode} (log: {log_path})"
    return json.loads(result_path.read_text()), None


def run_worker(command, device, log_path, timeout):
    """Run one worker to its end: (parsed result or None, one-line error or None)."""
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(command, cwd=ROOT, env=worker_env(device), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout} s (log: {log_path})"
    return read_result(command, proc.returncode, log_path)


class TurnTaker:
    """A worker started with ``--turns-fd``: it computes only between our "go" on its
    stdin and its next "ready" on the pipe (``benchmarks.timing.wait_for_turn``)."""

    def __init__(self, command, device, log_path, timeout):
        self.command, self.log_path, self.timeout = command, log_path, timeout
        self.error = None
        self.started = time.perf_counter()
        self.log = open(log_path, "w", encoding="utf-8")
        ready_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                command + ["--turns-fd", str(write_fd)], cwd=ROOT, env=worker_env(device),
                stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), text=True)
        finally:
            os.close(write_fd)  # the worker holds the only write end: EOF when it exits
        self.ready_fd = ready_fd

    @property
    def alive(self):
        return self.ready_fd is not None

    def wait_until_ready(self):
        """Block until the worker is ready for its next turn, or has exited."""
        readable, _, _ = select.select([self.ready_fd], [], [], self.timeout)
        if not readable:
            self.proc.kill()
            self.error = f"timed out after {self.timeout} s in one turn (log: {self.log_path})"
        elif os.read(self.ready_fd, 64):  # "ready\n": one line per "go", so one read
            return
        os.close(self.ready_fd)
        self.ready_fd = None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # a "go" it did not live to read
        self.proc.wait()
        self.log.close()

    def take_turn(self):
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has exited; the next read sees the end of its pipe
        self.wait_until_ready()

    def outcome(self):
        if self.error:
            return None, self.error, time.perf_counter() - self.started
        result, error = read_result(self.command, self.proc.returncode, self.log_path)
        return result, error, time.perf_counter() - self.started


def take_turns(jobs, timeout):
    """Run the workers of `jobs` ((command, device, log path) each) so that one computes
    at a time and their epochs interleave; [(result, error, seconds)] in `jobs` order.

    The workers start one after the other, each finishing its set-up (imports, data,
    model) before the next starts. Then rounds: every live worker in turn runs one epoch
    (warm-up epochs first, as they come), until each has run its last turn (its
    matrix-product measurement and result file) and exited. A slow spell of the
    machine then spreads over every implementation's epochs, and the median of each
    one's epochs leaves it out, instead of one implementation running through it.
    """
    workers = []
    for command, device, log_path in jobs:
        worker = TurnTaker(command, device, log_path, timeout)
        worker.wait_until_ready()
        workers.append(worker)
    rounds = 0
    while any(w.alive for w in workers):
        rounds += 1
        for worker in workers:
            if worker.alive:
                worker.take_turn()
        print(f"      round {rounds}: {sum(w.alive for w in workers)} of {len(workers)} "
              f"processes still running", flush=True)
    return [w.outcome() for w in workers]


def peak_requests(processes, devices):
    """{process index: frameworks whose matrix-product peak it measures}: numpy and torch
    in the first torch process of each device, tensorflow in the first TF2 one."""
    wanted = {}
    for device in devices:
        for framework, family in (("numpy", "torch"), ("torch", "torch"), ("tensorflow", "tf2")):
            index = next((i for i, (d, group) in enumerate(processes)
                          if d == device and group[0][1].family == family), None)
            if index is not None:
                wanted.setdefault(index, []).append(framework)
    return wanted


def run_processes(processes, warmup, epochs, sizes, quick, out, wanted_peaks, peaks):
    """Run the workers and turn their results into (records, failures); measured peaks
    are added to `peaks`. The processes of one task and device take turns
    (``take_turns``), one task and device after the other; with --quick all start at
    once."""
    timeout = QUICK_WORKER_TIMEOUT if quick else WORKER_TIMEOUT

    def job(i):
        device, group = processes[i]
        task0, entry0 = group[0]
        stem = f"{device}-{task0}-{entry0.name}" if len(group) == 1 else f"{device}-{entry0.family}"
        command = worker_command(group, device, warmup + epochs, sizes, quick,
                                 wanted_peaks.get(i), out / "workers" / f"{stem}.json")
        return command, device, out / "workers" / f"{stem}.log"

    def launch(i):
        t0 = time.perf_counter()
        result, error = run_worker(*job(i), timeout)
        return result, error, time.perf_counter() - t0

    records, failures = [], []

    def collect(i, result, error, seconds):
        device, group = processes[i]
        results = {(r["task"], r["name"]): r for r in result["results"]} if result else {}
        for framework, value in (result or {}).get("peaks", {}).items():
            if value:
                peaks.setdefault(device, {})[framework] = value
        for task, e in group:
            r = results.get((task, e.name))
            message = error or (r["error"] if r else "no result")
            if r and not r["error"] and r["epoch_seconds"]:
                record = make_record(task, device, e, r, warmup)
                records.append(record)
                line = f"{record['items_per_second']:,.0f} {record['unit']}"
            else:
                failures.append({"implementation": e.name, "task": task, "device": device,
                                 "error": message, "optional": e.name in OPTIONAL})
                line = f"FAILED: {message}"
            print(f"[{i + 1}/{len(processes)}] {task} {device} {e.name}: {line}", flush=True)
        print(f"      (process {i + 1}: {seconds:.0f} s from its start to its end)", flush=True)

    if quick:
        # A smoke run: its few processes start together, so framework start-up overlaps.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=len(processes)) as pool:
            outcomes = list(pool.map(launch, range(len(processes))))
        for i, outcome in enumerate(outcomes):
            collect(i, *outcome)
    else:
        sets = {}
        for i, (device, group) in enumerate(processes):
            sets.setdefault((device, group[0][0]), []).append(i)
        for (device, task), indices in sets.items():
            print(f"{task} on {device}: {len(indices)} processes taking turns", flush=True)
            outcomes = take_turns([job(i) for i in indices], timeout)
            for i, outcome in zip(indices, outcomes):
                collect(i, *outcome)
    return records, failures


# -- records --------------------------------------------------------------------------------
def flops_per_item(task):
    if task == "cnn":
        return training_flops_per_item("cnn", IMAGE_SHAPE, NUM_CLASSES)
    return training_flops_per_item("mlp", (FRIEDMAN_FEATURES,))


def make_record(task, device, entry, result, warmup):
    timed = result["epoch_seconds"][warmup:] or result["epoch_seconds"]
    items = result["items"]
    per_epoch = [items / s for s in timed]
    ips = items / statistics.median(timed)
    fpi = flops_per_item(task)
    return {
        "implementation": entry.name, "task": task, "device": device,
        "items_per_second": ips, "ratio_to_baseline": None, "gflops": ips * fpi / 1e9,
        "kind": entry.kind, "family": entry.family, "description": entry.description,
        "items_per_second_min": min(per_epoch), "items_per_second_max": max(per_epoch),
        "spread_percent": 100.0 * (max(per_epoch) - min(per_epoch)) / ips,
        "epoch_seconds": result["epoch_seconds"], "warmup_epochs": warmup,
        "timed_epochs": len(timed), "items_per_epoch": items,
        "unit": "images/s" if task == "cnn" else "rows/s", "flops_per_item": fpi,
        "peak_gflops": None, "percent_of_peak": None,
        "target_ratio": None, "meets_target": None,
        "course_figure": COURSE_FIGURES.get(entry.name) if task == "cnn" and device == "cpu" else None,
    }


def order_records(records, tasks, devices):
    """Task, then device, then the ENTRIES order (implementations before look-alikes)."""
    rank = {(t, e.name): i for t in ENTRIES for i, e in enumerate(ENTRIES[t])}
    return sorted(records, key=lambda r: (tasks.index(r["task"]), devices.index(r["device"]),
                                          rank[(r["task"], r["implementation"])]))


def finish_records(records, peaks):
    """Fill in ratios to the same run's baseline, peaks and targets."""
    for r in records:
        base = next((b for b in records if b["kind"] == "baseline" and b["task"] == r["task"]
                     and b["device"] == r["device"]), None)
        if base is not None:
            r["ratio_to_baseline"] = r["items_per_second"] / base["items_per_second"]
        peak = max(peaks.get(r["device"], {}).values(), default=0.0)
        if peak > 0:
            r["peak_gflops"] = peak
            r["percent_of_peak"] = 100.0 * r["gflops"] / peak
        entry = next(e for e in ENTRIES[r["task"]] if e.name == r["implementation"])
        r["target_ratio"] = target_ratio(r["task"], r["device"], entry)
        if r["target_ratio"] is not None and r["ratio_to_baseline"] is not None:
            r["meets_target"] = r["ratio_to_baseline"] >= r["target_ratio"]
    return records


def peaks_from_ops_csv(path):
    """{device: {backend: best matmul GFLOP/s}} from benchmarks.ops's ops.csv."""
    peaks = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["op"] == "matmul" and row["correct"] == "True":
                d = peaks.setdefault(row["device"], {})
                d[row["backend"]] = max(d.get(row["backend"], 0.0), float(row["gflops"]))
    return peaks


# -- report ---------------------------------------------------------------------------------
def format_table(records, failures, peaks, info, settings):
    lines = [f"benchmarks.training on {machine.describe(info)}",
             f"batch 100, {settings['warmup']} warm-up epoch excluded, median of "
             f"{settings['epochs']} timed epochs; CNN {settings['images']} images, MLP "
             f"{settings['rows']} rows" + ("; --quick: smoke run, not a measurement"
                                           if settings["quick"] else "")]
    load = info.get("load_average_1_5_15min")
    if load and load[0] > 0.5 * info["cores"]:
        lines.append(f"warning: the machine was busy when this started (load average {load[0]:.1f} "
                     f"on {info['cores']} cores, {info.get('load_average_after', ['?'])[0]} at the "
                     f"end): the figures are lower and noisier than on an idle machine, "
                     f"PyTorch's most of all (its OpenMP threads wait for each other at every op "
                     f"when the cores are shared)")
    for task in ("cnn", "mlp"):
        mine = [r for r in records if r["task"] == task]
        if not mine:
            continue
        unit = mine[0]["unit"]
        lines.append("")
        lines.append(f"{task.upper()}: {unit}, training FLOPs per item "
                     f"{mine[0]['flops_per_item'] / 1e6:.3f} M "
                     f"({'conv + dense' if task == 'cnn' else 'dense'} MACs x 2 x 3)")
        lines.append(f"{'device':6s} {'implementation':38s} {unit:>10s} {'min-max':>15s} "
                     f"{'ratio':>6s} {'target':>8s} {'GFLOP/s':>8s} {'% peak':>7s}  note")
        for r in mine:
            target = ""
            if r["target_ratio"] is not None:
                target = f">={r['target_ratio']:.2f}" + (" ok" if r["meets_target"] else " NO")
            ratio = f"{r['ratio_to_baseline']:.2f}" if r["ratio_to_baseline"] is not None else "-"
            peak = f"{r['percent_of_peak']:.1f}" if r["percent_of_peak"] is not None else "-"
            note = r["kind"]
            if r["course_figure"]:
                note += f"; course manual {r['course_figure']:,}/s"
            lines.append(f"{r['device']:6s} {r['implementation']:38s} {r['items_per_second']:10,.0f} "
                         f"{r['items_per_second_min']:7,.0f}-{r['items_per_second_max']:<7,.0f} "
                         f"{ratio:>6s} {target:>8s} {r['gflops']:8.2f} {peak:>7s}  {note}")
    for device, found in peaks.items():
        if found:
            lines.append(f"\nmatrix-product peak ({device}): " + ", ".join(
                f"{k} {v:.0f} GFLOP/s" for k, v in sorted(found.items(), key=lambda kv: -kv[1])))
    for f in failures:
        lines.append(f"FAILED {f['task']} {f['device']} {f['implementation']}: {f['error']}")
    return "\n".join(lines)


def plot(path, records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for r in records:
        if (r["task"], r["device"]) not in panels:
            panels.append((r["task"], r["device"]))
    if not panels:
        return
    colors = {"baseline": "tab:gray", "implementation": "tab:blue", "reference": "tab:orange"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (task, device) in zip(axes[:, 0], panels):
        mine = [r for r in records if r["task"] == task and r["device"] == device]
        names = [r["implementation"] for r in mine]
        values = [r["items_per_second"] for r in mine]
        errors = [[r["items_per_second"] - r["items_per_second_min"] for r in mine],
                  [r["items_per_second_max"] - r["items_per_second"] for r in mine]]
        y = range(len(mine))
        ax.barh(y, values, xerr=errors, color=[colors[r["kind"]] for r in mine])
        base = next((r for r in mine if r["kind"] == "baseline"), None)
        for i, r in enumerate(mine):
            if r["ratio_to_baseline"] is not None:
                ax.text(r["items_per_second_max"], i, f"  {r['ratio_to_baseline']:.2f}x", va="center",
                        fontsize=8)
            if r["target_ratio"] is not None and base is not None:
                ax.plot([r["target_ratio"] * base["items_per_second"]] * 2, [i - 0.4, i + 0.4],
                        color="red", linewidth=2)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(mine[0]["unit"] + " (median, bars: min-max; red: target)")
        ax.set_title(f"{task.upper()} training throughput on {device}")
        ax.margins(x=0.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training",
        description="Training throughput of every implementation against the course manual's "
                    "PyTorch pipeline, each in its own process.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the CPU, and CUDA as well when a GPU is visible")
    parser.add_argument("--task", default="all", choices=("cnn", "mlp", "all"))
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="timed epochs (default 5), after one warm-up epoch")
    parser.add_argument("--images", type=positive_int, default=None,
                        help=f"CNN training images (default {DEFAULT_IMAGES})")
    parser.add_argument("--rows", type=positive_int, default=None,
                        help=f"MLP training rows (default {DEFAULT_ROWS})")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the list of records to PATH")
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/benchmarks-training-<time>)")
    parser.add_argument("--ops-csv", default=None, metavar="PATH",
                        help="read the matrix-product peak from benchmarks.ops's ops.csv "
                             "instead of measuring it")
    parser.add_argument("--skip", default="", metavar="NAMES",
                        help="comma-separated entries to leave out (e.g. torch_compile)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny data, one timed epoch, no torch.compile")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    tasks = ["cnn", "mlp"] if args.task == "all" else [args.task]
    skip = {s for s in args.skip.split(",") if s}
    known = {e.name for t in ENTRIES for e in ENTRIES[t]}
    if skip - known:
        raise UserError(f"--skip names no entry {sorted(skip - known)[0]!r}; entries are "
                        f"{', '.join(sorted(known))}")
    if args.ops_csv and not Path(args.ops_csv).is_file():
        raise UserError(f"--ops-csv {args.ops_csv} does not exist; run python -m benchmarks.ops first")
    devices = resolve_devices(args.device)
    warmup = 1
    epochs = 1 if args.quick else args.epochs
    sizes = {"cnn": args.images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES),
             "mlp": args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)}
    out = Path(args.out or Path("runs") / f"benchmarks-training-{time.strftime('%Y%m%d-%H%M%S')}")
    (out / "workers").mkdir(parents=True, exist_ok=True)
    info = machine.machine_info()
    started = time.perf_counter()

    processes = [(device, group) for device in devices
                 for group in plan(tasks, device, args.quick, skip)]
    peaks = peaks_from_ops_csv(args.ops_csv) if args.ops_csv else {}
    print(f"benchmarks.training on {machine.describe(info)}; {len(processes)} processes", flush=True)
    records, failures = run_processes(processes, warmup, epochs, sizes, args.quick, out,
                                      peak_requests(processes, devices) if not args.ops_csv else {},
                                      peaks)
    records = order_records(records, tasks, devices)
    finish_records(records, peaks)
    info["load_average_after"] = machine.load_average()
    settings = {"epochs": epochs, "warmup": warmup, "images": sizes["cnn"], "rows": sizes["mlp"],
                "quick": args.quick, "batch_size": 100,
                "seconds_total": time.perf_counter() - started}
    table = format_table(records, failures, peaks, info, settings)
    print("\n" + table)
    atomic_write_text(out / "training.txt", table + "\n")
    plot(out / "training.png", records)
    write_json(out / "training.json", {"machine": info, "settings": settings, "peaks": peaks,
                                       "records": records, "failures": failures})
    if args.json:
        write_json(Path(args.json), records)
    print(f"\nwrote {out / 'training.txt'}, {out / 'training.png'}, {out / 'training.json'}"
          + (f", {args.json}" if args.json else "")
          + f" in {time.perf_counter() - started:.0f} s")
    fatal = [f for f in failures if not f["optional"]]
    if fatal:
        print("error: " + "; ".join(f"{f['implementation']} ({f['task']}, {f['device']}) failed"
                                    for f in fatal), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from common.runner import run_main
    run_main(main)
