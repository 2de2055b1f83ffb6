"""What a benchmark runs on: CPU, GPUs, load, library versions; the device; TensorFlow's state.

Describing the machine imports no framework (versions come from the package
metadata, GPU names from ``nvidia-smi``), so it costs no start-up.
"""
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from common.errors import UserError

PACKAGES = ("numpy", "scipy", "torch", "torchvision", "tensorflow", "keras", "pillow")


def may_have_cuda():
    """A cheap first look: False means certainly no NVIDIA GPU."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def resolve_device(name, torch_sees_gpu):
    """--device auto|cpu|cuda -> "cpu" or "cuda": CUDA where torch sees a GPU (asked only
    where there may be one); asking for a missing GPU is a user error."""
    found = name != "cpu" and may_have_cuda() and torch_sees_gpu()
    if name == "cuda" and not found:
        raise UserError("--device cuda was asked for but no GPU is visible; "
                        "use --device cpu or auto")
    return "cuda" if found else "cpu"


def machine_info():
    """A JSON-friendly description of the machine, for every benchmark report."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(encoding="utf-8").splitlines() if cpuinfo.exists() else []
    gpus = []
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    dists = list(metadata.distributions())[::-1]  # the first on sys.path wins, as in imports
    installed = {str(d.name).lower(): d.version for d in dists}
    versions = {name: installed[name] for name in PACKAGES if name in installed}
    return {"cpu": next((line.split(":", 1)[1].strip() for line in lines
                         if line.startswith("model name")), platform.machine()),
            "cores": len(os.sched_getaffinity(0)), "gpus": gpus,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "versions": versions}


def tensorflow_problem(device):
    """Why TensorFlow cannot compute on `device` ("cpu" or "cuda"), or None. It imports
    TensorFlow: ``benchmarks.training`` asks it in a throw-away process."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        return f"tensorflow is not installed ({exc})"
    if device == "cuda" and not tf.config.list_physical_devices("GPU"):
        return (f"tensorflow {tf.__version__} sees no GPU (it needs the CUDA 12 libraries "
                "of `uv sync --extra gpu`)")
    return None


def describe(info):
    """One line for the top of a printed table."""
    libs = " ".join(f"{k} {v}" for k, v in info["versions"].items()
                    if k in ("torch", "tensorflow", "keras", "cupy"))
    return (f"{info['cpu']}, {info['cores']} cores, {', '.join(info['gpus']) or 'no GPU'}; "
            f"load average {info['load_average'][0]:.2f}; {libs}")
