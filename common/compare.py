"""Train every implementation of one task and compare them: ``python -m common.compare``.

Every implementation starts from the same initial weights (a fresh torch model,
exported in the shared format) and trains on the same split with the same batch
order, each in its own process (import order, clean state). The result is one
overlaid plot of the training and validation curves and a table: final test
metric, seconds, throughput, and the largest difference of each implementation's
validation-loss curve from PyTorch's. A failing implementation is reported in the
table with its error while the others still finish.

    uv run python -m common.compare --task cnn --epochs 10
    uv run python -m common.compare --task mlp --dataset diabetes
    uv run python -m common.compare --task rnn --cell gru
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common.cli import positive_int
from common.config import RNN_CELLS
from common.outputs import atomic_path, write_json, atomic_write_text

IMPLEMENTATIONS = {
    "cnn": [("torch", "torch_impl.run_cnn"), ("tf2-tape", "tf2_impl.run_cnn"),
            ("tf2-fit", "tf2_impl.run_cnn_keras"), ("tf1", "tf1_compat.run_cnn")],
    "mlp": [("torch", "torch_impl.run_nn"), ("tf2-tape", "tf2_impl.run_nn"),
            ("tf2-fit", "tf2_impl.run_nn_keras"), ("tf1", "tf1_compat.run_nn")],
    "rnn": [("torch", "torch_impl.run_rnn"), ("tf2-tape", "tf2_impl.run_rnn"),
            ("tf2-fit", "tf2_impl.run_rnn_keras"), ("tf1", "tf1_compat.run_rnn")],
}
DEFAULT_DATASET = {"cnn": "digits", "mlp": "friedman", "rnn": "digits"}
KIND = {"cnn": "image", "mlp": "tabular", "rnn": "sequence"}

# Runs in a child process: common/ itself never imports a framework.
_INITIAL_WEIGHTS = """
import sys
import torch
from common.datasets import load_dataset
from common.weights import save_weights, weights_metadata
from torch_impl.models import build_cnn, build_mlp, export_weights
from torch_impl.rnn_models import build_rnn
task, kind, dataset_name, data_dir, seed, path, cell, bidirectional = sys.argv[1:]
dataset = load_dataset(dataset_name, kind, data_dir, int(seed))
torch.manual_seed(int(seed))
options = {"cell": cell, "bidirectional": bidirectional == "True"} if task == "rnn" else {}
model = {"cnn": lambda: build_cnn(dataset.input_shape, dataset.num_classes),
         "mlp": lambda: build_mlp(dataset.input_shape[-1]),
         "rnn": lambda: build_rnn(dataset.input_shape[-1], dataset.num_classes, **options)}[task]()
save_weights(path, export_weights(model), weights_metadata(dataset, "torch (initial)", options))
"""


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m common.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(IMPLEMENTATIONS), default="cnn")
    parser.add_argument("--dataset", default=None,
                        help="default: digits (cnn, rnn) / friedman (mlp)")
    parser.add_argument("--cell", choices=RNN_CELLS, default="lstm", help="rnn: the recurrent layer")
    parser.add_argument("--bidirectional", action="store_true", help="rnn: read both ways")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="a subset of: torch tf2-tape tf2-fit tf1")
    parser.add_argument("--out", default=None, help="default runs/compare-<task>-<time>")
    return parser


def _run_one(name, module, args, out, initial):
    """Train one implementation in a child process, echoing its per-epoch lines."""
    run_dir = out / name
    command = [sys.executable, "-m", module, "--dataset", args.dataset, "--data-dir", args.data_dir,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--device", args.device, "--weights", str(initial),
               "--deterministic", "--out", str(run_dir)]
    if args.task == "rnn":
        command += ["--cell", args.cell] + (["--bidirectional"] if args.bidirectional else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    tail = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            if line.startswith(("epoch ", "test ", "error")):
                print(f"[{name}] {line}", flush=True)
    seconds = time.perf_counter() - start
    metrics_file = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        error = next((t for t in reversed(tail) if t.strip()), "no output")
        return {"implementation": name, "module": module, "ok": False, "seconds": seconds,
                "error": f"exit {proc.returncode}: {error}"}
    metrics = json.loads(metrics_file.read_text())
    return {"implementation": name, "module": module, "ok": True, "seconds": seconds,
            "metrics": metrics}


def _curve(result, key):
    return [e[key] for e in result["metrics"]["epochs"]] if result["ok"] else []


def summarise(results, task):
    """Table rows: test metric, seconds, throughput, max |val loss - torch's| over epochs."""
    metric = "r2" if task == "mlp" else "accuracy"
    reference = next((r for r in results if r["implementation"] == "torch" and r["ok"]), None)
    rows = []
    for r in results:
        if not r["ok"]:
            rows.append({"implementation": r["implementation"], "ok": False, "error": r["error"]})
            continue
        m = r["metrics"]
        row = {"implementation": r["implementation"], "ok": True,
               f"test_{metric}": m["test"][metric], "test_loss": m["test"]["loss"],
               "seconds": round(r["seconds"], 1), "items_per_second": m.get("items_per_second"),
               "max_val_loss_diff_vs_torch": None}
        if reference is not None:
            ours, theirs = _curve(r, "val_loss"), _curve(reference, "val_loss")
            row["max_val_loss_diff_vs_torch"] = max(abs(a - b) for a, b in zip(ours, theirs))
        rows.append(row)
    return rows


def format_table(rows, task):
    metric = "r2" if task == "mlp" else "accuracy"
    header = f"{'implementation':<10} {'test ' + metric:>13} {'seconds':>8} {'items/s':>9} {'max |dval loss|':>16}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if not row["ok"]:
            lines.append(f"{row['implementation']:<10} FAILED: {row['error']}")
            continue
        diff = row["max_val_loss_diff_vs_torch"]
        ips = row["items_per_second"]
        lines.append(f"{row['implementation']:<10} {row['test_' + metric]:>13.4f} {row['seconds']:>8.1f} "
                     f"{(f'{ips:.0f}' if ips else '-'):>9} {(f'{diff:.4f}' if diff is not None else '-'):>16}")
    return "\n".join(lines)


def plot(results, task, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = "mse" if task == "mlp" else "accuracy"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if not r["ok"]:
            continue
        epochs = [e["epoch"] for e in r["metrics"]["epochs"]]
        for ax, key in zip(axes, ("loss", metric)):
            line, = ax.plot(epochs, _curve(r, f"train_{key}"), linestyle="--", alpha=0.7)
            ax.plot(epochs, _curve(r, f"val_{key}"), color=line.get_color(),
                    label=r["implementation"])
    for ax, key in zip(axes, ("loss", metric)):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} (dashed: train, solid: validation)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{task}: every implementation from the same initial weights")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.dataset = args.dataset or DEFAULT_DATASET[args.task]
    out = Path(args.out or f"runs/compare-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    initial = out / "initial.weights.safetensors"
    subprocess.run([sys.executable, "-c", _INITIAL_WEIGHTS, args.task, KIND[args.task],
                    args.dataset, args.data_dir, str(args.seed), str(initial), args.cell,
                    str(args.bidirectional)], check=True)
    chosen = [(n, m) for n, m in IMPLEMENTATIONS[args.task] if not args.only or n in args.only]
    results = [_run_one(name, module, args, out, initial) for name, module in chosen]
    rows = summarise(results, args.task)
    table = format_table(rows, args.task)
    plot(results, args.task, out / f"compare-{args.task}.png")
    model = {"cell": args.cell, "bidirectional": args.bidirectional} if args.task == "rnn" else {}
    write_json(out / "compare.json", {"task": args.task, "dataset": args.dataset, **model,
                                      "epochs": args.epochs, "rows": rows})
    atomic_write_text(out / "compare.txt", table + "\n")
    print(table)
    print(f"plot, table and runs in {out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
