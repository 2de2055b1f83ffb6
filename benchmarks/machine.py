"""What a benchmark ran on: CPU model, cores, GPU, load, library versions.

Nothing here imports a framework: versions come from the installed package
metadata, the GPU name from ``nvidia-smi`` (or from torch when the caller has
already imported it), so describing the machine costs no framework start-up.
"""
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

PACKAGES = ("numpy", "scipy", "torch", "torchvision", "tensorflow", "keras", "cupy", "pillow")


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def gpu_names():
    """Names of the visible NVIDIA GPUs ([] when there is none)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def may_have_cuda():
    """A cheap first look (no framework import): False means certainly no GPU."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def versions():
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# Environment variables that change how fast a framework runs.
SPEED_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS",
                   "TF_XLA_FLAGS", "CUDA_VISIBLE_DEVICES")


def machine_info():
    """A JSON-friendly description of the machine, for every benchmark report."""
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "load_average_1_5_15min": load_average(),
        "versions": versions(),
        "environment": {k: os.environ[k] for k in SPEED_VARIABLES if k in os.environ},
    }


def describe(info):
    """One line for the top of a printed table."""
    gpus = ", ".join(info["gpus"]) or "no GPU"
    v = info["versions"]
    libs = " ".join(f"{k} {v[k]}" for k in ("numpy", "torch", "tensorflow", "keras", "cupy") if k in v)
    load = info.get("load_average_1_5_15min")
    load_text = f"; load average {load[0]:.2f}" if load else ""
    return f"{info['cpu']}, {info['cores']} cores, {gpus}{load_text}; {libs}"
