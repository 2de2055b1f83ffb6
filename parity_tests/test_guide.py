"""docs/PORTING.md cites files, functions and tests: every one of them must exist.
And ``python -m common.compare`` writes its table and plot with every implementation."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "PORTING.md"
REFERENCE = re.compile(r"`([A-Za-z0-9_]+/[A-Za-z0-9_/]+\.py)(?:::([A-Za-z_][A-Za-z0-9_]*))?`")
TEST_ID = re.compile(r"\btest_[A-Za-z0-9_]+")


def _defined_names(path):
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}


def _test_names():
    """Test functions, and test modules (the guide may cite a whole file)."""
    names = set()
    for path in (REPO / "parity_tests").glob("test_*.py"):
        names |= {path.stem} | {n for n in _defined_names(path) if n.startswith("test_")}
    return names


def test_guide_cites_existing_files_and_functions():
    text = GUIDE.read_text()
    references = REFERENCE.findall(text)
    assert len(references) >= 40
    for file, name in references:
        path = REPO / file
        assert path.is_file(), f"PORTING.md cites {file}, which does not exist"
        if name:
            assert name in _defined_names(path), f"PORTING.md cites {file}::{name}, not defined there"


def test_guide_cites_existing_test_ids():
    cited = set(TEST_ID.findall(GUIDE.read_text()))
    assert len(cited) >= 15
    missing = cited - _test_names()
    assert not missing, f"PORTING.md cites tests that do not exist: {sorted(missing)}"


def test_guide_names_every_pitfall_test():
    """Every pitfall test in the suite is explained in the guide."""
    pitfalls = {n for n in _test_names() if n.startswith("test_pitfall_")}
    assert pitfalls and pitfalls <= set(TEST_ID.findall(GUIDE.read_text()))


@pytest.mark.parametrize("bad", ["`common/nosuch.py`", "`common/layout.py::no_such_function`"])
def test_guide_check_catches_a_missing_reference(bad):
    (file, name), = REFERENCE.findall(bad)
    path = REPO / file
    assert not path.is_file() or name not in _defined_names(path)


@pytest.mark.parametrize("task, options", [("mlp", ["--dataset", "diabetes"]),
                                           ("rnn", ["--cell", "gru"])])
def test_compare_smoke_writes_table_and_plot(tmp_path, task, options):
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "common.compare", "--task", task, *options,
                           "--epochs", "2", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())["rows"]
    names = ["torch", "tf2-tape", "tf2-fit", "tf1"]
    assert [r["implementation"] for r in rows] == names and all(r["ok"] for r in rows)
    assert all(r["max_val_loss_diff_vs_torch"] is not None for r in rows)
    table = (out / "compare.txt").read_text()
    assert all(name in table for name in names)
    assert (out / f"compare-{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in names:  # progress was shown per implementation
        assert f"[{name}] epoch 2/2" in proc.stdout
    if task == "rnn":  # digits by default; every run from the same initial GRU weights
        saved = json.loads((out / "compare.json").read_text())
        assert (saved["dataset"], saved["cell"]) == ("digits", "gru")
        assert all(json.loads((out / name / "metrics.json").read_text())["cell"] == "gru"
                   for name in names)
