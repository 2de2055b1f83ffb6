"""The measured pipelines, and the process that measures them.

A pipeline is an entry point in its ``plain`` or ``fast`` variant, set up with its
implementation's own functions picked as the entry point picks them (``Parts``), or one of
the manual's references (``benchmarks.baselines``, variant ``manual``). One epoch is timed:
its batches and ``train_one_epoch``, or one ``model.fit`` epoch; validation, checkpoints and
bookkeeping are left out, as for the references. ``work`` is one benchmark process.
"""
import os
import traceback
from dataclasses import dataclass
from importlib import import_module

from common import config
from common.seed import seed_everything
from benchmarks.baselines import MANUAL, MANUAL_TASKS, clocked, fit_epochs
from benchmarks.data import benchmark_data

SEED, BATCH_SIZE, LEARNING_RATE = config.SEED, config.BATCH_SIZE, config.LEARNING_RATE
PROGRAMS = {"cnn": "run_cnn", "mlp": "run_nn", "rnn": "run_rnn"}  # task: entry point's name
# loop: (package, its entry points' suffix, the manual reference it is measured against)
LOOPS = {"torch": ("torch_impl", "", "manual torch DataLoader pipeline"),
         "tape": ("tf2_impl", "", "manual TF2 GradientTape loop"),
         "fit": ("tf2_impl", "_keras", "manual Keras fit"),
         "tf1": ("tf1_compat", "", "manual TF1 graph")}
VARIANTS = ("plain", "fast")


@dataclass(frozen=True)
class Pipeline:
    name: str      # the entry point ("torch_impl.run_cnn") or the manual reference's name
    variant: str   # "plain", "fast" or "manual"
    loop: str      # its key in LOOPS
    reference: str = None  # the manual reference's name (the manual has no RNN: None)

    package = property(lambda self: LOOPS[self.loop][0])


def pipelines(task):
    """Every pipeline of `task`: per loop, the manual reference (if any), then plain and fast."""
    found = []
    for loop, (package, suffix, reference) in LOOPS.items():
        reference = reference if task in MANUAL_TASKS else None
        entry = f"{package}.{PROGRAMS[task]}{suffix}"
        found += [Pipeline(reference, "manual", loop, reference)] if reference else []
        found += [Pipeline(entry, variant, loop, reference) for variant in VARIANTS]
    return found


class Parts:
    """An implementation's functions as its entry point picks them: with `fast`, those its
    fast.py defines (same names as the plain ones they replace), else [rnn_]models/train.py's."""

    def __init__(self, package, fast, task="cnn"):
        self.fast = fast
        names = ["fast"] * fast + ["rnn_models"] * (task == "rnn") + ["models", "train"]
        self.modules = [import_module(f"{package}.{name}") for name in names]

    def __getattr__(self, name):
        for module in self.modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"{self.modules[-1].__package__} defines no {name}")

    def build_model(self, task, data, **api):
        if task == "rnn":
            return self.build_rnn(data.input_shape[-1], data.num_classes, **api)
        if task == "cnn":
            return self.build_cnn(data.input_shape, data.num_classes, **api)
        return self.build_mlp(data.input_shape[-1], **api)


def torch_loop(task, data, device, parts):
    import torch
    from common.layout import nhwc_to_nchw
    device = parts.resolve_device(device)
    seed_everything(SEED)
    if parts.fast and task == "cnn":
        parts.keep_freed_memory()  # as run_cnn does with --fast
    # As the entry points feed them: NCHW images; --fast moves each split to the device once.
    home = device if parts.fast else torch.device("cpu")
    x = torch.from_numpy(nhwc_to_nchw(data.x) if task == "cnn" else data.x).to(home)
    y = torch.from_numpy(data.y).to(home)
    model = parts.build_model(task, data).to(device)
    loss_fn, optimizer = parts.make_loss(data.task), parts.make_optimizer(model, LEARNING_RATE)
    return clocked(lambda n: parts.train_one_epoch(
        model, parts.make_batches(x, y, BATCH_SIZE, SEED, n), loss_fn, optimizer, data.task))


def tape_loop(task, data, device, parts):
    parts.resolve_device(device)
    seed_everything(SEED)
    model = parts.build_model(task, data)
    step = parts.make_train_step(model, parts.make_loss(data.task),
                                 parts.make_optimizer(model, LEARNING_RATE))
    return clocked(lambda n: parts.train_one_epoch(
        step, parts.make_batches(data.x, data.y, BATCH_SIZE, SEED, n), data.task))


def fit_loop(task, data, device, parts):
    parts.resolve_device(device)
    seed_everything(SEED)
    model = parts.build_model(task, data, api="sequential" if task == "mlp" else "functional")
    model.compile(optimizer=parts.make_optimizer(model, LEARNING_RATE),
                  loss=parts.make_loss(data.task), metrics=[parts.make_metric(data.task)],
                  jit_compile=False)
    # Epoch n's feed starts after n - 1 epochs (fit's initial_epoch).
    return fit_epochs(model, lambda n: parts.make_fit_batches(
        data.x, data.y, BATCH_SIZE, SEED, n - 1), steps_per_epoch=-(-len(data.x) // BATCH_SIZE))


def tf1_loop(task, data, device, parts):
    import tensorflow as tf
    parts.use_tf1_behavior()  # what the entry point does first, under __main__
    device = parts.resolve_device(device)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(SEED)
        model = parts.build_model(task, data)
        loss = parts.make_loss(data.task, model)
        step = parts.make_train_step(parts.make_optimizer(LEARNING_RATE), loss)
        initialize = tf.compat.v1.global_variables_initializer()
    graph.finalize()
    sess = tf.compat.v1.Session(graph=graph, config=parts.session_config(device))
    sess.run(initialize)
    return clocked(lambda n: parts.train_one_epoch(sess, model, step, loss, parts.make_batches(
        data.x, data.y, BATCH_SIZE, SEED, n), data.task))


SET_UP = {"torch": torch_loop, "tape": tape_loop, "fit": fit_loop, "tf1": tf1_loop}


def set_up(pipeline, task, data, device):
    """`pipeline` ready to train: a function that trains epoch n and returns its seconds."""
    if pipeline.variant == "manual":
        return MANUAL[pipeline.name](task, data, device)
    parts = Parts(pipeline.package, pipeline.variant == "fast", task)
    return SET_UP[pipeline.loop](task, data, device, parts)


def _failure(exc):
    traceback.print_exc()
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def work(group, settings, conn, log):
    """One benchmark process: set up `group`, then train one epoch of each in turn (without
    --quick: "ready" on `conn`, then wait for "go"); send {pipeline: {"epoch_seconds": [...],
    "error": None or one line}} at the end. Its output (framework logs...) goes to `log`."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd in (1, 2):
        os.dup2(out, fd)
    if settings["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no framework can put work on a GPU
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    task, data = settings["task"], benchmark_data(settings["task"], settings["items"])
    results, epoch = {}, {}
    for p in group:
        results[p] = {"epoch_seconds": [], "error": None}
        try:
            epoch[p] = set_up(p, task, data, settings["device"])
        except Exception as exc:  # one broken pipeline must not hide the others' figures
            results[p]["error"] = _failure(exc)
    for n in range(1, settings["warmup"] + settings["epochs"] + 1):
        for p in list(epoch):
            if not settings["quick"]:
                conn.send("ready")
                conn.recv()
            try:
                results[p]["epoch_seconds"].append(epoch[p](n))
            except Exception as exc:
                results[p]["error"] = _failure(exc)
                del epoch[p]
    conn.send(results)
