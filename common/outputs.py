"""Everything a run writes, written so that a crash never leaves half a file.

Each file goes to a temporary file in the same directory and is renamed into
place (``os.replace`` is atomic on one filesystem): a crash at any moment leaves
either the old file or the new one. ``atomic_path`` serves libraries that write
by file name (safetensors, matplotlib, Keras ``save_weights``).

Outputs of every ``run_*`` in ``--out``: ``metrics.json``, ``predictions.csv``,
``curves.png``, ``run.log`` and ``weights.safetensors`` (see ``common.weights``).
"""
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the full name as suffix: Keras insists on '.weights.h5', safetensors does not care.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def predictions_csv(task, outputs, answers):
    """CSV text: classification `index,confidence,prediction,answer` from logits or
    probabilities (softmax is applied here, in float64); regression `index,prediction,answer`."""
    outputs = np.asarray(outputs, dtype=np.float64)
    lines = []
    if task == "classification":
        lines.append("index,confidence,prediction,answer")
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        for i, (p, a) in enumerate(zip(probs, answers)):
            k = int(p.argmax())
            lines.append(f"{i},{p[k]:.6f},{k},{int(a)}")
    else:
        lines.append("index,prediction,answer")
        for i, (p, a) in enumerate(zip(outputs.reshape(-1), answers)):
            lines.append(f"{i},{p:.6f},{float(a):.6f}")
    return "\n".join(lines) + "\n"


def classification_metrics(logits, labels, loss):
    return {"loss": float(loss),
            "accuracy": float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))}


def regression_metrics(predictions, targets, loss=None):
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    mse = float(np.mean((p - t) ** 2))
    r2 = 1.0 - mse / float(np.var(t)) if np.var(t) > 0 else float("nan")
    return {"loss": float(mse if loss is None else loss), "mse": mse, "rmse": mse ** 0.5,
            "mae": float(np.mean(np.abs(p - t))), "r2": r2}


def plot_curves(path, history, metric_name):
    """Loss and `metric_name` per epoch, train and validation, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", metric_name)):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_gflops(path, rows):
    """GFLOP/s against size n per (op, backend, device), one panel per op, log-log, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for key in sorted({(r["backend"], r["device"]) for r in rows if r["op"] == op}):
            mine = [r for r in rows if r["op"] == op and (r["backend"], r["device"]) == key]
            ax.plot([r["size"] for r in mine], [r["gflops"] for r in mine], marker=".",
                    label=f"{key[0]} ({key[1]})")
        ax.set(xscale="log", yscale="log", xlabel="n", ylabel="GFLOP/s", title=op)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def setup_logger(out_dir, name):
    """A logger printing to stdout and appending to `out_dir`/run.log; with `out_dir`
    None (a data-parallel process other than the chief) warnings only, and no file."""
    logger = logging.getLogger(f"dl_rosetta.{name}")
    logger.setLevel(logging.INFO if out_dir is not None else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if out_dir is None:
        return logger
    log_file = logging.FileHandler(Path(out_dir) / "run.log", encoding="utf-8")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(log_file)
    return logger
