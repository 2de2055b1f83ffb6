"""One benchmark process: ``python -m benchmarks.workers`` (started by ``benchmarks.training``).

Every entry trains for warm-up + timed epochs and returns the seconds of each
epoch. The implementations' entries call the shipped code -- each package's
model builders and its own ``train_one_epoch`` from ``torch_impl.train``,
``tf2_impl.train`` and ``tf1_compat.train`` -- set up the way its ``run_cnn`` /
``run_nn`` sets them up, so the benchmark measures what a user runs. Only the
work inside ``train_one_epoch`` (or one epoch of ``model.fit``) is timed; the
batch order (``common.datasets.batch_indices``) is drawn before the clock starts,
as in the runners. The set-up (layouts, memory formats, optimizer constants,
model-building API) mirrors the runners': when a runner changes its set-up, the
matching ``run_*`` function here must follow. The course manual's pipelines
live in ``benchmarks.baselines``.

``benchmarks.training`` starts one process per entry (clean state, and the
import-order rule: a process imports torch or tensorflow, rarely both), with
``CUDA_VISIBLE_DEVICES=""`` for CPU runs so no framework can place work on a
GPU. With ``--turns-fd`` the process takes turns with the others
(``benchmarks.timing.wait_for_turn``): it says "ready" on that file descriptor
before every epoch and before its closing matrix-product measurement, and waits
for "go" on stdin. A TF1 process switches the whole process to TF1 semantics
first, as only an entry point may: ``tf1_compat.train.use_tf1_behavior()`` for
tf1_compat, as its runners do (v1 semantics with v2 control flow), plain
``tf.compat.v1.disable_v2_behavior()`` for the manual's TF1 graph.

The result, written to ``--result`` as JSON: one item per entry with
``epoch_seconds`` (warm-up epochs included, first), ``items`` per epoch and
``error`` (None, or one line saying why the entry failed), plus ``peaks``: the
matrix-product GFLOP/s of this process's frameworks, when ``--peak`` asked.
"""
import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (installs the torch/tensorflow import-order guard first)

from common import config
from common.datasets import batch_indices
from common.memory import keep_freed_memory
from common.outputs import write_json
from common.seed import epoch_seed, seed_everything
from benchmarks import baselines
from benchmarks.data import image_data, tabular_data
from benchmarks.timing import timed_epochs, use_turns, wait_for_turn

SEED = config.SEED
BATCH_SIZE = config.BATCH_SIZE


@dataclass(frozen=True)
class Entry:
    """One line of the benchmark table."""

    name: str         # the record's `implementation`; see training.NAME_MARKERS
    kind: str         # "baseline", "implementation" or "reference"
    family: str       # "torch", "tf2", "tf1" or "tf1_manual": which process can run it
    description: str


# The order is the order of the records: every implementation comes before any
# other record sharing its marker substring (torch_eager before torch_compile).
ENTRIES = {
    "cnn": [
        Entry("baseline_manual_pil_dataloader", "baseline", "torch",
              "course manual: per-sample PIL image, ToTensor + Normalize, DataLoader(batch 100)"),
        Entry("torch_eager", "implementation", "torch", "torch_impl.train.train_one_epoch"),
        Entry("torch_compile", "implementation", "torch",
              "torch_impl.train.train_one_epoch on torch.compile(model)"),
        Entry("tf2_tape", "implementation", "tf2", "tf2_impl.train GradientTape loop"),
        Entry("tf2_keras_fit", "implementation", "tf2", "tf2_impl.train Keras model.fit"),
        Entry("tf1_session", "implementation", "tf1", "tf1_compat.train.train_one_epoch"),
        Entry("manual_tf2_gradient_loop", "reference", "tf2",
              "course manual: @tf.function GradientTape step over tf.data, softmax in the model"),
        Entry("manual_keras_tfdata", "reference", "tf2",
              "course manual: Keras model.fit over tf.data, softmax in the model"),
        Entry("manual_tf_graph_session", "reference", "tf1_manual",
              "course manual: straightforward TF1 graph, feed_dict per batch"),
    ],
}
ENTRIES["mlp"] = [
    Entry("baseline_manual_tensordataset_loader", "baseline", "torch",
          "manual style: DataLoader(TensorDataset(x, y), batch 100)"),
] + [e for e in ENTRIES["cnn"] if e.kind != "baseline"]


def entry(task, name):
    for e in ENTRIES[task]:
        if e.name == name:
            return e
    raise KeyError(f"no entry {name!r} for task {task!r}")


def _batches(n, epochs):
    """The runners' batch order, drawn before any clock starts."""
    return {epoch: batch_indices(n, BATCH_SIZE, SEED, epoch) for epoch in range(1, epochs + 1)}


def _arrays(task, data):
    """(x, y, common task name) the way the runners hand them to train_one_epoch."""
    if task == "cnn":
        return data.x, data.labels, "classification"
    return data.x, data.y.reshape(-1, 1), "regression"  # targets (N, 1), like the model's output


# -- PyTorch: torch_impl -------------------------------------------------------------------
def run_torch(task, data, device, epochs, compile_model=False):
    import torch

    from common.layout import nhwc_to_nchw
    from torch_impl.models import CNNClassifier, MLPRegressor
    from torch_impl.train import resolve_device, to_device, train_one_epoch

    seed_everything(SEED)
    device = resolve_device(device)
    keep_freed_memory()  # as torch_impl's runners; the manual's baseline does without
    x, y, kind = _arrays(task, data)
    if task == "cnn":
        # As torch_impl/run_cnn.py: NHWC -> NCHW shape, stored channels_last.
        x = to_device(nhwc_to_nchw(x), device, torch.channels_last)
        model = CNNClassifier(data.input_shape, data.num_classes)
        model = model.to(device, memory_format=torch.channels_last)
    else:
        x = to_device(x, device)
        model = MLPRegressor(data.input_shape[-1]).to(device)
    y = to_device(y, device)
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.LEARNING_RATE,
                                 betas=(config.ADAM_BETA1, config.ADAM_BETA2), eps=config.ADAM_EPS)
    batches = _batches(len(x), epochs)

    def epoch_fn(epoch):
        train_one_epoch(step_model, optimizer, x, y, batches[epoch], kind)  # ends with .item(): synced

    def reseed(epoch):
        torch.manual_seed(epoch_seed(SEED, epoch))  # this epoch's dropout masks

    return timed_epochs(epoch_fn, epochs, before_epoch=reseed)


# -- TF1: tf1_compat ----------------------------------------------------------------------
def run_tf1(task, data, device, epochs):
    import tensorflow as tf

    from tf1_compat.models import build_cnn_classifier, build_mlp_regressor
    from tf1_compat.train import adam_train_op, resolve_device, session_config, train_one_epoch

    device = resolve_device(device)
    x, y, kind = _arrays(task, data)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(SEED)
        if task == "cnn":
            model = build_cnn_classifier(data.input_shape, data.num_classes)
        else:
            model = build_mlp_regressor(data.input_shape[-1])
        train_op = adam_train_op(model, config.LEARNING_RATE)
        initialize = tf.compat.v1.global_variables_initializer()
    graph.finalize()
    batches = _batches(len(x), epochs)
    with tf.compat.v1.Session(graph=graph, config=session_config(device)) as sess:
        sess.run(initialize)

        def epoch_fn(epoch):
            train_one_epoch(sess, model, train_op, x, y, batches[epoch], kind,
                            dropout_seed=epoch_seed(SEED, epoch))

        return timed_epochs(epoch_fn, epochs)


# -- TF2: tf2_impl ------------------------------------------------------------------------
# The model-building API each TF2 entry point uses by default (tf2_impl/run_*.py).
TF2_APIS = {("cnn", "tape"): "subclassing", ("cnn", "fit"): "functional",
            ("mlp", "tape"): "subclassing", ("mlp", "fit"): "sequential"}


class _FitRun:
    """What ``tf2_impl.train.TrainingRunCallback`` needs from ``common.runner.TrainingRun``:
    the metric name and ``check_stop`` (a signal flag look-up there, nothing here)."""

    def __init__(self, metric):
        self.metric = metric

    def check_stop(self, epoch):
        return None


def run_tf2(task, data, device, epochs, loop):
    import keras

    from tf2_impl.models import build_cnn, build_mlp
    from tf2_impl.train import (TrainingRunCallback, as_tensor, compile_model, fit_batches,
                                make_optimizer, make_train_step, reseed_dropout, resolve_device,
                                train_one_epoch)

    resolve_device(device)  # before any TensorFlow op
    seed_everything(SEED)
    x, y, kind = _arrays(task, data)
    api = TF2_APIS[(task, loop)]
    if task == "cnn":
        model = build_cnn(api, data.input_shape, data.num_classes)
    else:
        model = build_mlp(api, data.input_shape[-1])
    optimizer = make_optimizer(config.LEARNING_RATE)
    optimizer.build(model.trainable_variables)

    if loop == "fit":
        # As tf2_impl.runner runs fit: one call for all epochs over the shared batches,
        # Keras's progress bar and the runner's callback, which times each epoch from its
        # start to the end of its last batch (validation, which fit needs for that
        # callback, is left out of the time there as here).
        compile_model(model, optimizer, kind)
        seconds = []
        callback = TrainingRunCallback(
            _FitRun("accuracy" if kind == "classification" else "mse"), SEED,
            lambda epoch, train_metrics, val_metrics, epoch_seconds: seconds.append(epoch_seconds))
        # Before the runner's callback, whose epoch clock starts in its on_epoch_begin.
        take_turn = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: wait_for_turn())
        held_out = slice(0, min(len(x), 10 * BATCH_SIZE))
        model.fit(fit_batches(x, y, BATCH_SIZE, SEED, range(1, epochs + 1)), epochs=epochs,
                  steps_per_epoch=-(-len(x) // BATCH_SIZE), shuffle=False,
                  validation_data=(x[held_out], y[held_out]), validation_batch_size=BATCH_SIZE,
                  callbacks=[take_turn, keras.callbacks.ProgbarLogger(), callback])
        return seconds

    train_step, metrics = make_train_step(model, optimizer, kind, data.input_shape)
    x, y = as_tensor(x), as_tensor(y)
    batches = _batches(len(data.x), epochs)

    def epoch_fn(epoch):
        train_one_epoch(train_step, metrics, x, y, batches[epoch])  # ends with float(): synced

    def reseed(epoch):
        reseed_dropout(model, epoch_seed(SEED, epoch))  # this epoch's dropout masks

    return timed_epochs(epoch_fn, epochs, before_epoch=reseed)


# -- dispatch -----------------------------------------------------------------------------
def run_entry(task, name, data, device, epochs):
    runners = {
        "baseline_manual_pil_dataloader": lambda: baselines.manual_torch_cnn(data, device, epochs),
        "baseline_manual_tensordataset_loader": lambda: baselines.manual_torch_mlp(data, device, epochs),
        "torch_eager": lambda: run_torch(task, data, device, epochs),
        "torch_compile": lambda: run_torch(task, data, device, epochs, compile_model=True),
        "tf2_tape": lambda: run_tf2(task, data, device, epochs, "tape"),
        "tf2_keras_fit": lambda: run_tf2(task, data, device, epochs, "fit"),
        "tf1_session": lambda: run_tf1(task, data, device, epochs),
        "manual_tf2_gradient_loop": lambda: baselines.manual_tf2_loop(task, data, epochs),
        "manual_keras_tfdata": lambda: baselines.manual_keras_tfdata(task, data, epochs),
        "manual_tf_graph_session": lambda: baselines.manual_tf_graph(task, data, epochs),
    }
    return runners[name]()


def matmul_peaks(frameworks, device, quick):
    """Best float32 matrix-product GFLOP/s of `frameworks` here, with benchmarks.ops's timing."""
    from benchmarks import ops
    settings = ops.Settings(budget=0.5, repeats=3, min_repeat_seconds=0.02, pause=0.0)
    sizes = [256, 512] if quick else [1024, 2048, 4096]
    if device == "cuda" and not quick:
        sizes += [8192]
    peaks = {}
    for framework in frameworks:
        if framework == "numpy":
            backend = ops.numpy_backends()[0]
        elif framework == "torch":
            backend = ops.torch_backends(device)[0]
        else:
            backend = ops.tf_backends(device)[0]
        best = 0.0
        for n in sizes:
            inputs = ops.make_inputs("matmul", n)
            row = ops.measure(backend, n, inputs, settings)
            if row["correct"]:
                best = max(best, row["gflops"])
            if row["seconds"] > settings.budget:
                break
        peaks[framework] = best
    return peaks


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers",
                                     description="Run benchmark entries in this process.")
    parser.add_argument("--jobs", required=True,
                        help="comma-separated task:entry pairs, e.g. cnn:torch_eager,mlp:torch_eager")
    parser.add_argument("--device", required=True, choices=("cpu", "cuda"))
    parser.add_argument("--epochs", type=int, required=True, help="warm-up + timed epochs")
    parser.add_argument("--images", type=int, required=True, help="CNN training images")
    parser.add_argument("--rows", type=int, required=True, help="MLP training rows")
    parser.add_argument("--peak", default="", help="comma-separated: numpy, torch, tensorflow")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--turns-fd", type=int, default=None,
                        help="take turns: write 'ready' lines to this file descriptor and wait "
                             "for 'go' lines on stdin (set by benchmarks.training)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.turns_fd is not None:
        use_turns(sys.stdin, open(args.turns_fd, "w", encoding="utf-8"))
    jobs = [tuple(job.split(":", 1)) for job in args.jobs.split(",") if job]
    families = {entry(task, name).family for task, name in jobs}
    if len(families) != 1:
        raise SystemExit(f"one process runs one family of entries, got {sorted(families)}")
    if families == {"tf1"}:
        from tf1_compat.train import use_tf1_behavior
        use_tf1_behavior()  # what tf1_compat's entry points do first
    elif families == {"tf1_manual"}:
        import tensorflow as tf
        tf.compat.v1.disable_v2_behavior()  # TF1 semantics as the manual's TF1 code had them
    datasets = {}
    results = []
    for task, name in jobs:
        if task not in datasets:
            datasets[task] = image_data(args.images) if task == "cnn" else tabular_data(args.rows)
        data = datasets[task]
        start = time.perf_counter()
        try:
            seconds = run_entry(task, name, data, args.device, args.epochs)
            error = None
        except Exception as exc:  # one broken entry must not hide the others' figures
            traceback.print_exc()
            seconds = []
            text = str(exc).strip()
            error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        results.append({"task": task, "name": name, "epoch_seconds": seconds, "items": len(data.x),
                        "error": error, "wall_seconds": time.perf_counter() - start})
        print(f"{task} {name}: {error or ', '.join(f'{s:.3f}' for s in seconds)} s", flush=True)
    peaks = {}
    wait_for_turn()  # the measurement below and the write-up take a turn of their own
    if args.peak:
        try:
            peaks = matmul_peaks([p for p in args.peak.split(",") if p], args.device, args.quick)
        except Exception:
            traceback.print_exc()
    write_json(Path(args.result), {"device": args.device, "results": results, "peaks": peaks,
                                   "python": sys.version.split()[0]})


if __name__ == "__main__":
    main()
