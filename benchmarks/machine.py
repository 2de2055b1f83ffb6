"""What a benchmark ran on: CPU model, cores, GPUs, load and library versions.

Nothing here imports a framework (versions come from the package metadata, GPU
names from ``nvidia-smi``), so describing the machine costs no start-up.
"""
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "scipy", "torch", "torchvision", "tensorflow", "keras", "pillow")


def may_have_cuda():
    """A cheap first look: False means certainly no NVIDIA GPU."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def machine_info():
    """A JSON-friendly description of the machine, for every benchmark report."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(encoding="utf-8").splitlines() if cpuinfo.exists() else []
    gpus = []
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": next((line.split(":", 1)[1].strip() for line in lines
                         if line.startswith("model name")), platform.machine()),
            "cores": len(os.sched_getaffinity(0)), "gpus": gpus,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "versions": versions}


def describe(info):
    """One line for the top of a printed table."""
    libs = " ".join(f"{k} {v}" for k, v in info["versions"].items()
                    if k in ("torch", "tensorflow", "keras"))
    return (f"{info['cpu']}, {info['cores']} cores, {', '.join(info['gpus']) or 'no GPU'}; "
            f"load average {info['load_average'][0]:.2f}; {libs}")
