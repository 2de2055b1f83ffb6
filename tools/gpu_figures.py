"""One line of figures for a step of ``tools/gpu_check.sh``: ``python -m tools.gpu_figures KIND PATH...``.

KIND and what it reads: ``parity`` (tools.device_parity's JSON), ``run`` (an entry point's
output directory), ``same`` (two output directories: exit 1 unless their weights are bitwise
equal), ``pytest`` (a pytest log), ``training`` (benchmarks.training's training.json),
``ops`` (benchmarks.ops's ops.json). numpy and safetensors only: no framework is imported.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def _number(value):
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def parity(path):
    found = json.loads(Path(path).read_text())
    return "; ".join(f"{task}: " + ", ".join(f"{k} {_number(v)}" for k, v in values.items())
                     for task, values in found["figures"].items()) + " (float32 vs float64 CPU)"


def run(folder):
    m = json.loads((Path(folder) / "metrics.json").read_text())
    test = ", ".join(f"{k} {v:.4f}" for k, v in m["test"].items() if isinstance(v, float))
    rate = f"{m['items_per_second']:,.0f} items/s" if m["items_per_second"] else "no epochs timed"
    return (f"{m['entry_point']} {m['variant']} on {m['device']} (tf32 {m['tf32']}): {test}; "
            f"{rate} (median epoch after the first of {len(m['epochs'])})")


def same(first, second):
    a, b = (load_file(Path(folder) / "weights.safetensors") for folder in (first, second))
    differ = sorted(k for k in a if k not in b or not np.array_equal(a[k], b[k]))
    if differ or a.keys() != b.keys():
        raise SystemExit(f"weights differ: {', '.join(differ) or 'tensor names'}")
    return f"bitwise equal weights ({len(a)} tensors); first run: {run(first)}"


def pytest(path):
    lines = [line.strip("= \n") for line in Path(path).read_text().splitlines()
             if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return lines[-1] if lines else "no pytest summary line"


def training(path):
    found = json.loads(Path(path).read_text())
    rates = [f"{r['name']} {r['variant']} {r['items_per_second']:,.0f}" for r in found["records"]]
    skipped = found.get("skipped") or []
    unit = found["records"][0]["unit"] if found["records"] else ""
    return (f"{unit}: " + ", ".join(rates) + (f"; skipped {len(skipped)}: {skipped[0]}" if skipped else "")
            + (f"; FAILED {'; '.join(found['failures'])}" if found.get("failures") else ""))


def ops(path):
    found = json.loads(Path(path).read_text())
    peaks = [f"{s['op']} {s['backend']} ({s['device']}) {s['peak_gflops']:,.0f}"
             for s in found["summary"] if s["peak_gflops"]]
    return ("peak GFLOP/s, TF32 " + str(found.get("tf32")) + ": " + ", ".join(peaks)
            + (f"; skipped {len(found['skipped'])}" if found.get("skipped") else ""))


KINDS = {"parity": parity, "run": run, "same": same, "pytest": pytest, "training": training,
         "ops": ops}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in KINDS:
        print(f"usage: python -m tools.gpu_figures {{{','.join(KINDS)}}} PATH...", file=sys.stderr)
        sys.exit(2)
    print(KINDS[sys.argv[1]](*sys.argv[2:]).replace("\t", " ").replace("\n", " "))
