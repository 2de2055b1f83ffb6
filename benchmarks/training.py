"""Training throughput of every pipeline of one task: ``python -m benchmarks.training``.

The CNN (CIFAR-shaped synthetic images) or the MLP (make_friedman1 rows) through
every entry point, ``plain`` and ``fast``, and the course manual's references
(``benchmarks.pipelines``). Each pipeline runs in a freshly spawned process
(only its framework imported, ``CUDA_VISIBLE_DEVICES=""`` on the CPU). The
processes take turns, one epoch each per round, so a slow spell of a shared
machine spreads over all of them. A figure is the median of the timed epochs
after one warm-up epoch; its ratio divides it by its framework's manual
reference in the same run. ``--quick`` is a smoke run (small data, one timed
epoch, one process per framework, no turns): not a measurement.
"""
import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (installs the torch/tensorflow import-order guard first)

from common.cli import positive_int
from common.errors import UserError
from common.outputs import atomic_write_text, write_json
from benchmarks import machine
from benchmarks.pipelines import pipelines, work

ITEMS = {"cnn": 10000, "mlp": 50000}
QUICK_ITEMS = {"cnn": 300, "mlp": 2000}
UNIT = {"cnn": "images/s", "mlp": "rows/s"}
PAUSE = 0.2      # seconds between turns: the last process's worker threads stop spinning
TIMEOUT = 1800   # seconds a process may go without a word before it is stopped


def resolve_device(name):
    """auto: CUDA when torch sees a GPU (asked in a throw-away process), else the CPU."""
    found = name != "cpu" and machine.may_have_cuda() and subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True).stdout.strip().endswith("True")
    if name == "cuda" and not found:
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu or auto")
    return "cuda" if found else "cpu"


def receive(conn, process, log):
    """A process's next message: "ready", its results (a dict), or why there are none (a str)."""
    try:
        if conn.poll(TIMEOUT):
            return conn.recv()
        why = f"silent for {TIMEOUT} s"
    except EOFError:
        why = "the process ended"
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    return f"{why} (exit code {process.exitcode}; log {log})"


def measure(groups, settings, logs):
    """{pipeline: {"epoch_seconds", "error"}} of every pipeline of `groups` (one list per
    process, ``benchmarks.pipelines.work``): the processes set up one after the other, then
    take turns, one epoch each per round (with --quick they all run at once, no turns)."""
    context, workers, messages = multiprocessing.get_context("spawn"), [], []
    for i, group in enumerate(groups):
        conn, child = context.Pipe()
        log = logs / f"{i + 1}-{group[0].package}.log"
        process = context.Process(target=work, args=(group, settings, child, str(log)),
                                  daemon=True)  # stopped when this process stops
        process.start()
        child.close()
        workers.append((conn, process, log))
        if not settings["quick"]:
            messages.append(receive(*workers[-1]))  # "ready": set up
    messages = messages or [receive(*w) for w in workers]
    rounds = 0
    while "ready" in messages:
        rounds += 1
        for i, (conn, process, log) in enumerate(workers):
            if messages[i] == "ready":
                time.sleep(PAUSE)
                conn.send("go")
                messages[i] = receive(conn, process, log)
        print(f"  round {rounds} of {settings['warmup'] + settings['epochs']} done", flush=True)
    results = {}
    for group, message, (_, process, _) in zip(groups, messages, workers):
        process.join()
        for p in group:
            results[p] = message[p] if isinstance(message, dict) else {"epoch_seconds": [],
                                                                        "error": message}
    return results


def make_records(results, settings, info):
    """(records, failures): one record per pipeline that trained, ratios filled in."""
    records, failures = [], []
    for p, result in results.items():
        timed = result["epoch_seconds"][settings["warmup"]:]
        if result["error"] or not timed:
            failures.append(f"{p.name} ({p.variant}): {result['error'] or 'no timed epoch'}")
            continue
        rates = [settings["items"] / s for s in timed]
        records.append({
            "name": p.name, "variant": p.variant, "task": settings["task"],
            "device": settings["device"],
            "items_per_second": settings["items"] / statistics.median(timed),
            "ratio_to_baseline": None, "reference": p.reference, "unit": UNIT[settings["task"]],
            "items_per_second_min": min(rates), "items_per_second_max": max(rates),
            "items_per_epoch": settings["items"], "batch_size": 100, "timed_epochs": len(timed),
            "warmup_epochs": settings["warmup"], "epoch_seconds": result["epoch_seconds"],
            "cpu": info["cpu"], "cores": info["cores"], "gpus": info["gpus"],
            "quick": settings["quick"]})
    rate = {r["name"]: r["items_per_second"] for r in records if r["variant"] == "manual"}
    for r in records:
        if r["reference"] in rate:
            r["ratio_to_baseline"] = r["items_per_second"] / rate[r["reference"]]
    return records, failures


def report(records, failures, settings, info):
    """The table: per implementation, plain next to fast, and both against its reference."""
    rate = {(r["name"], r["variant"]): r["items_per_second"] for r in records}
    number = lambda v: f"{v:,.0f}" if v else "-"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    quick = "; --quick: a smoke run, not a measurement" if settings["quick"] else ""
    lines = [f"benchmarks.training on {machine.describe(info)}",
             f"{settings['task'].upper()} on {settings['device']}, {UNIT[settings['task']]}: "
             f"{settings['items']:,} items, batch 100, median of {settings['epochs']} timed "
             f"epochs after {settings['warmup']} warm-up{quick}", "",
             f"{'implementation':24s} {'plain':>9s} {'fast':>9s} {'fast/plain':>10s}   "
             f"{'manual reference':34s} {'manual':>9s} {'plain/ref':>9s} {'fast/ref':>9s}"]
    found = pipelines(settings["task"])  # per loop: manual, plain, fast
    for manual, plain, fast in zip(found[::3], found[1::3], found[2::3]):
        m, p, f = (rate.get((x.name, x.variant)) for x in (manual, plain, fast))
        lines.append(f"{plain.name:24s} {number(p):>9s} {number(f):>9s} {ratio(f, p):>10s}   "
                     f"{manual.name:34s} {number(m):>9s} {ratio(p, m):>9s} {ratio(f, m):>9s}")
    return "\n".join(lines + [f"FAILED {line}" for line in failures])


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training",
        description="Training throughput of every entry point, plain and --fast, against the "
                    "course manual's pipeline of the same framework, each in its own process.")
    parser.add_argument("--task", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="timed epochs (default 5), after one warm-up epoch")
    parser.add_argument("--items", type=positive_int, default=None,
                        help="training images or rows (default 10,000 images, 50,000 rows)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when a GPU is visible, else the CPU")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records to PATH")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write training.json (records and machine), training.txt and the logs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small data, one timed epoch, one process per framework")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    items = args.items or (QUICK_ITEMS if args.quick else ITEMS)[args.task]
    settings = {"task": args.task, "device": resolve_device(args.device), "items": items,
                "warmup": 1, "epochs": 1 if args.quick else args.epochs, "quick": args.quick}
    out = Path(args.out) if args.out else None
    logs = out / "logs" if out else Path(tempfile.mkdtemp(prefix="benchmarks-training-"))
    logs.mkdir(parents=True, exist_ok=True)
    info = machine.machine_info()
    measured = pipelines(args.task)
    if args.quick:  # one process per framework: start-up would be most of a smoke run
        groups = [[p for p in measured if p.package == package]
                  for package in dict.fromkeys(p.package for p in measured)]
    else:
        groups = [[p] for p in measured]
    print(f"benchmarks.training: {len(measured)} pipelines in {len(groups)} processes "
          f"(logs in {logs})", flush=True)
    started = time.perf_counter()
    records, failures = make_records(measure(groups, settings, logs), settings, info)
    table = report(records, failures, settings, info)
    print("\n" + table + f"\n\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(Path(args.json), records)
    if out:
        write_json(out / "training.json", {"machine": info, "settings": settings,
                                           "records": records, "failures": failures})
        atomic_write_text(out / "training.txt", table + "\n")
    if failures:
        print(f"error: {len(failures)} of {len(measured)} pipelines failed (logs in {logs})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from common.runner import run_main
    run_main(main)
