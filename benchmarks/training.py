"""Training throughput of every pipeline of one task: ``python -m benchmarks.training``.

The CNN (CIFAR-shaped images), the RNN (the same, a row per step) or the MLP (make_friedman1
rows) through every entry point, ``plain`` and ``fast``, and the manual's CNN and MLP references
(``benchmarks.pipelines``), each in a fresh process (``CUDA_VISIBLE_DEVICES=""`` on the CPU).
They take turns, one epoch each per round: a slow spell of a shared machine spreads over all. A
figure is the median of the timed epochs after one warm-up; its ratio divides it by its
framework's reference in the same run. TensorFlow's pipelines run only where it imports (on CUDA:
sees a GPU), else they are reported skipped. ``--quick``: a smoke run, one process per framework.
"""
import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.cli import positive_int
from common.outputs import atomic_write_text, write_json
from benchmarks import machine
from benchmarks.pipelines import pipelines, work

ITEMS = {"cnn": 10000, "mlp": 50000, "rnn": 10000}
QUICK_ITEMS = {"cnn": 300, "mlp": 2000, "rnn": 300}
UNIT = {"cnn": "images/s", "mlp": "rows/s", "rnn": "sequences/s"}
PAUSE = 0.2      # seconds between turns: the last process's worker threads stop spinning
TIMEOUT = 1800   # seconds a process may go without a word before it is stopped
TF32 = "framework defaults (torch: convolutions; tensorflow: all)"  # no --deterministic here


def ask(code):
    """The last line `code` prints in a throw-away process (this one and the workers it
    spawns stay free of frameworks), or the last line of its error."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return (run.stdout.strip() or "the probe failed: " + run.stderr.strip()).splitlines()[-1]


def select(task, device):
    """(pipelines of `task` to measure, ["name (variant): why" of those skipped]): no worker
    that could only fail starts (the GPU check machines have torch but no TensorFlow)."""
    why = ask("from benchmarks.machine import tensorflow_problem; "
              f"print(tensorflow_problem({device!r}))")
    skipped = [p for p in pipelines(task) if why != "None" and p.loop != "torch"]
    return ([p for p in pipelines(task) if p not in skipped],
            [f"{p.name} ({p.variant}): {why}" for p in skipped])


def receive(conn, process, log):
    """A process's next message: "ready", its results (a dict), or why there are none (a str)."""
    try:
        if conn.poll(TIMEOUT):
            return conn.recv()
        why = f"silent for {TIMEOUT} s"
    except EOFError:
        why = "the process ended"
    process.join(5)
    process.kill()  # a no-op once it has ended
    process.join()
    return f"{why} (exit code {process.exitcode}; log {log})"


def measure(groups, settings, logs):
    """{pipeline: {"epoch_seconds", "error"}} of `groups` (one list per process): they set up
    one after the other, then take turns, one epoch each per round (--quick: all at once)."""
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
    for _, process, _ in workers:
        process.join()
    return {p: message[p] if isinstance(message, dict) else {"epoch_seconds": [], "error": message}
            for group, message in zip(groups, messages) for p in group}


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


def report(records, failures, skipped, settings, info):
    """The table: per implementation, plain next to fast, and both against its reference."""
    rate = {(r["name"], r["variant"]): r["items_per_second"] for r in records}
    num = lambda v: f"{v:,.0f}" if v else "-"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    quick = "; --quick: a smoke run, not a measurement" if settings["quick"] else ""
    lines = [f"benchmarks.training on {machine.describe(info)}",
             f"{settings['task'].upper()} on {settings['device']}, {UNIT[settings['task']]}: "
             f"{settings['items']:,} items, batch 100, median of {settings['epochs']} timed "
             f"epochs after {settings['warmup']} warm-up; TF32 {settings['tf32']}{quick}", "",
             f"{'implementation':24s} {'plain':>9s} {'fast':>9s} {'fast/plain':>10s}   "
             f"{'manual reference':34s} {'manual':>9s} {'plain/ref':>9s} {'fast/ref':>9s}"]
    for x in (x for x in pipelines(settings["task"]) if x.variant == "plain"):  # per loop
        p, f, m = (rate.get(key) for key in ((x.name, "plain"), (x.name, "fast"),
                                             (x.reference, "manual")))
        lines.append(f"{x.name:24s} {num(p):>9s} {num(f):>9s} {ratio(f, p):>10s}   "
                     f"{x.reference or '-':34s} {num(m):>9s} {ratio(p, m):>9s} {ratio(f, m):>9s}")
    return "\n".join(lines + [f"FAILED {f}" for f in failures] + [f"SKIPPED {s}" for s in skipped])


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="cnn", choices=sorted(ITEMS))
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="timed epochs (default 5), after one warm-up epoch")
    parser.add_argument("--items", type=positive_int, default=None,
                        help="training items (default 10,000 images or sequences, 50,000 rows)")
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
    device = machine.resolve_device(
        args.device, lambda: ask("import torch; print(torch.cuda.is_available())") == "True")
    settings = {"task": args.task, "device": device, "items": items, "warmup": 1,
                "epochs": 1 if args.quick else args.epochs, "quick": args.quick,
                "tf32": TF32 if device == "cuda" else "none (CPU)"}
    out = Path(args.out) if args.out else None
    logs = out / "logs" if out else Path(tempfile.mkdtemp(prefix="benchmarks-training-"))
    logs.mkdir(parents=True, exist_ok=True)
    info = machine.machine_info()
    measured, skipped = select(args.task, device)
    packages = dict.fromkeys(p.package for p in measured)  # --quick: one process per framework
    groups = ([[p for p in measured if p.package == k] for k in packages] if args.quick
              else [[p] for p in measured])
    print(f"benchmarks.training: {len(measured)} pipelines in {len(groups)} processes, "
          f"{len(skipped)} skipped (logs in {logs})", flush=True)
    started = time.perf_counter()
    records, failures = make_records(measure(groups, settings, logs), settings, info)
    table = report(records, failures, skipped, settings, info)
    print("\n" + table + f"\n\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(Path(args.json), records)
    if out:
        write_json(out / "training.json", {"machine": info, "settings": settings,
                                           "records": records, "failures": failures,
                                           "skipped": skipped})
        atomic_write_text(out / "training.txt", table + "\n")
    if failures:
        print(f"error: {len(failures)} of {len(measured)} pipelines failed (logs in {logs})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from common.runner import run_main
    run_main(main)
