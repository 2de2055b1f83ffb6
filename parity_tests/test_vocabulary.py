"""One vocabulary: the same role has the same name, in the same file and in the same
order, in every framework; the README's table of paired files lists those names; every
entry point's main() has the same sections in the same order.

These read the source files (``ast``), so they fail when a twin renames, drops or
reorders a function, which is what would make the files stop reading side by side.
"""
import ast
import re

import pytest

from parity_tests.conftest import REPO

PACKAGES = ("torch_impl", "tf2_impl", "tf1_compat")
# file -> the shared top-level names, in the order every framework defines them.
SHARED = {
    "models.py": ["build_mlp", "build_cnn", "export_weights", "import_weights"],
    "train.py": ["resolve_device", "make_deterministic", "make_batches", "make_loss",
                 "make_optimizer", "train_one_epoch", "predict", "evaluate",
                 "save_checkpoint", "load_checkpoint"],
}
ENTRY_POINTS = [f"{package}/{name}.py" for package in PACKAGES for name in ("run_cnn", "run_nn")] \
    + ["tf2_impl/run_cnn_keras.py", "tf2_impl/run_nn_keras.py"]
SECTIONS = ["# Data", "# Model, loss and optimizer", "# Training", "# Test"]


def _top_level_names(path):
    tree = ast.parse(path.read_text())
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def _in_order(names, wanted):
    """`wanted` as it appears in `names` (each name's first definition)."""
    return [name for name in names if name in wanted]


@pytest.mark.parametrize("file", sorted(SHARED))
@pytest.mark.parametrize("package", PACKAGES)
def test_shared_names_defined_in_every_framework_in_the_same_order(package, file):
    names = _top_level_names(REPO / package / file)
    missing = [n for n in SHARED[file] if n not in names]
    assert not missing, f"{package}/{file} lacks {missing}"
    assert _in_order(names, SHARED[file]) == SHARED[file], f"{package}/{file} orders them differently"


def test_fast_variants_keep_the_names_they_replace():
    """Every public function or class of a fast.py that shares a name with the plain
    code is a drop-in for it; each fast.py replaces at least one plain name."""
    for package in PACKAGES:
        plain = set(_top_level_names(REPO / package / "models.py")) \
            | set(_top_level_names(REPO / package / "train.py"))
        fast = set(_top_level_names(REPO / package / "fast.py"))
        assert fast & plain, f"{package}/fast.py replaces no plain function by name"


def test_readme_table_lists_the_shared_names():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## The paired files"):text.index("## Running")]
    for names in SHARED.values():
        for name in names:
            assert f"`{name}`" in table, f"README's paired-files table does not list {name}"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_main_has_the_same_sections_in_order(entry_point):
    source = (REPO / entry_point).read_text()
    tree = ast.parse(source)
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    body = "\n".join(source.splitlines()[main.lineno - 1:main.end_lineno])
    # "# Data" alone on its line, or followed by ": why this framework differs".
    found = [re.search(rf"^ +{re.escape(section)}(:.*)?$", body, re.M) for section in SECTIONS]
    positions = [m.start() if m else -1 for m in found]
    assert all(p >= 0 for p in positions), f"{entry_point}: missing {SECTIONS} comments in main()"
    assert positions == sorted(positions), f"{entry_point}: sections out of order"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_main_reads_plain_and_fast_from_one_flag(entry_point):
    """Each entry point reads --fast itself (the TF1 MLP, which has no faster variant,
    records that in metrics.json)."""
    assert "args.fast" in (REPO / entry_point).read_text(), entry_point
