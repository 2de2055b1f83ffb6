"""Test-suite set-up shared by every test process.

* ``import common`` first: it installs the torch/tensorflow import-order guard
  (common/frameworks.py) and TensorFlow's GPU memory growth, and torch is imported
  before tensorflow anyway. TensorFlow is optional here: the GPU check machines
  run the torch tests without it.
* Precision settings are pinned before any framework is used, because parity
  checks compare numbers across frameworks: oneDNN's fused CPU kernels off
  (``TF_ENABLE_ONEDNN_OPTS=0``), XLA auto-clustering off, TF32 off on both sides
  (it only matters on Ampere or newer GPUs, where it is torch's and TF's default
  for convolutions / TF's for matmuls).
* ``--device cpu|cuda`` (default cpu) is where the device tests run: the fixtures
  ``device`` (torch) and ``tf_device`` (TensorFlow) give it, or skip the test with the
  reason when that framework sees no GPU. With cpu, TensorFlow's GPUs are hidden, so
  every in-process TensorFlow run of the session is on the CPU.
"""
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import common  # noqa: E402,F401  (installs the import-order guard)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

try:
    import tensorflow as tf  # noqa: E402  (after torch: see common/frameworks.py)
    # The public API can turn op determinism on, not off; restore_process_state needs both.
    from tensorflow.python.framework import config as tf_config  # noqa: E402
except ImportError:
    tf = tf_config = None
else:
    tf.config.experimental.enable_tensor_float_32_execution(False)

from common.config import cnn_parameter_shapes, mlp_parameter_shapes  # noqa: E402
from common.runner import TrainingRun, run_main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NO_TF_GPU = ("TensorFlow sees no GPU: the default install's TensorFlow finds no CUDA 12 "
             "libraries (uv sync --extra gpu installs them)")


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the device tests run (default cpu); cuda skips, with the "
                          "reason, the frameworks that see no GPU")


def pytest_configure(config):
    if tf is not None and config.getoption("device") == "cpu":
        tf.config.set_visible_devices([], "GPU")


def pytest_collection_modifyitems(config, items):
    """Slow tests skip, with the way to run them, unless a -m expression chose the tests."""
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: run with uv run pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    tf_gpus = "no tensorflow" if tf is None else len(tf.config.list_physical_devices("GPU"))
    return (f"--device {config.getoption('device')}: torch sees {torch.cuda.device_count()} "
            f"GPU(s), tensorflow {tf_gpus}")


@pytest.fixture
def device(request):
    """The torch device of the device tests: "cpu", or "cuda" when torch sees a GPU."""
    name = request.config.getoption("device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: torch sees no CUDA GPU")
    return name


@pytest.fixture
def tf_device(request):
    """The TensorFlow device of the device tests, like ``device``."""
    name = request.config.getoption("device")
    if tf is None:
        pytest.skip("tensorflow is not installed")
    if name == "cuda" and not tf.config.get_visible_devices("GPU"):
        pytest.skip(f"--device cuda: {NO_TF_GPU}")
    return name


@contextlib.contextmanager
def process_state():
    """main() installs signal handlers, and --deterministic sets framework flags and
    environment variables: give the rest of the pytest process its own back (TensorFlow's
    op determinism, left on, makes every later unseeded random op raise)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    tf_deterministic = tf_config is not None and tf_config.is_op_determinism_enabled()
    environ = dict(os.environ)
    yield
    if tf_config is not None and tf_config.is_op_determinism_enabled() and not tf_deterministic:
        tf_config.disable_op_determinism()
    for s, handler in handlers.items():
        signal.signal(s, handler)
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)  # imports torch._inductor: only if needed
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(autouse=True)
def restore_process_state():
    """The process state around each test (``process_state``)."""
    with process_state():
        yield


@pytest.fixture(scope="module", autouse=True)
def restore_module_process_state():
    """The same around each module: a module-scoped fixture that runs a main() does so
    before the per-test guard starts, and would otherwise leave its flags to later
    modules in the same worker."""
    with process_state():
        yield


def call(main, argv):
    """Exit code of an entry point's main() run in-process, as the command line gives it.

    `main` is a function or a module name ("torch_impl.run_cnn")."""
    if isinstance(main, str):
        main = importlib.import_module(main).main
    try:
        run_main(main, argv)
    except SystemExit as exc:
        return exc.code
    return 0


def metrics(out):
    """The metrics.json of a run directory."""
    return json.loads((Path(out) / "metrics.json").read_text())


def error_line(capsys):
    """The one error sentence on stderr (after any progress bars), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def expect_exit(capsys, main, argv, code, *words):
    """Run main(argv) in-process; assert the exit code and one error sentence naming `words`."""
    assert call(main, argv) == code
    line = error_line(capsys)
    for word in words:
        assert word in line, line
    return line


def wait_for(path, text, proc, timeout=240):
    """Wait until the file at `path` holds `text`; fail when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} within {timeout}s")


def interrupt_then_resume(spawn, module, argv, tmp_path, epochs=4):
    """`module` run uninterrupted and, beside it, stopped by a real signal (SIGTERM for the
    TF2 runners, SIGINT for the others) once its log shows epoch 1: exit 128 + signal with a
    resume hint and no predictions; --resume finishes it with the uninterrupted run's
    predictions and test metrics."""
    sig = signal.SIGTERM if module.startswith("tf2") else signal.SIGINT
    argv = [*argv, "--epochs", str(epochs)]
    with open(tmp_path / "full.log", "w") as log:
        full = spawn(module, [*argv, "--out", str(tmp_path / "full")], log)
    with open(tmp_path / "cut.log", "w") as log:
        cut = spawn(module, [*argv, "--out", str(tmp_path / "cut")], log)
        wait_for(tmp_path / "cut" / "run.log", f"epoch 1/{epochs}:", cut)
        cut.send_signal(sig)
        assert cut.wait(timeout=240) == 128 + sig
    log_text = (tmp_path / "cut.log").read_text()
    assert f"--resume {tmp_path / 'cut'}" in log_text and "Traceback" not in log_text
    assert not (tmp_path / "cut" / "predictions.csv").exists()
    with open(tmp_path / "resume.log", "w") as log:
        assert spawn(module, ["--resume", str(tmp_path / "cut")], log).wait(timeout=240) == 0
    assert full.wait(timeout=240) == 0
    assert [e["epoch"] for e in metrics(tmp_path / "cut")["epochs"]] == list(range(1, epochs + 1))
    assert (tmp_path / "cut" / "predictions.csv").read_bytes() == \
        (tmp_path / "full" / "predictions.csv").read_bytes()
    assert metrics(tmp_path / "cut")["test"] == metrics(tmp_path / "full")["test"]


def expect_nan_stop(capsys, module, argv, out):
    """A run whose loss turns non-finite: exit 3, told to lower the learning rate, no weights."""
    assert call(module, [*argv, "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "loss became" in err and "Lower the learning rate" in err and "Traceback" not in err
    assert not (out / "weights.safetensors").exists()


def random_shared_weights(task, input_shape, num_classes=10, seed=0, scale=0.1):
    """Random tensors in the shared weights format (batch-norm variances positive)."""
    rng = np.random.default_rng(seed)
    shapes = (cnn_parameter_shapes(input_shape, num_classes) if task == "classification"
              else mlp_parameter_shapes(input_shape[-1]))
    tensors = {}
    for name, shape in shapes.items():
        value = rng.normal(0.0, scale, shape)
        if name.endswith("running_var") or (name.startswith("bn") and name.endswith(".weight")):
            value = 1.0 + np.abs(value)
        tensors[name] = value.astype(np.float32)
    return tensors


@pytest.fixture
def spawn():
    """Start entry points as subprocesses; any still running at the end are killed."""
    started = []

    def start(module, argv, log):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def signal_in_epoch(monkeypatch):
    """``signal_in_epoch(n)``: runs in this test get SIGINT (or `signum`) as epoch n starts,
    delivered to the runner's own handler as a Ctrl-C would be; ``monkeypatch.undo()``
    disarms it."""
    def arm(epoch, signum=signal.SIGINT):
        start_epoch = TrainingRun.start_epoch

        def start_then_signal(run, n):
            start_epoch(run, n)
            if n == epoch:
                signal.raise_signal(signum)

        monkeypatch.setattr(TrainingRun, "start_epoch", start_then_signal)
    return arm
