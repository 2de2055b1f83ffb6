"""One vocabulary: the same role has the same name, in the same file and in the same
order, in every framework; the README's table of paired files lists those names; every
paired file's docstring names its twins; every entry point's main() has the same sections
in the same order.

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
    "rnn_models.py": ["build_rnn", "export_weights", "import_weights"],
}
# rnn_models.py defines its model first: a class in torch and in the Keras Subclassing API,
# a graph-building function in TF1.
RNN_MODEL = {"torch_impl": "RNNClassifier", "tf2_impl": "RNNClassifier",
             "tf1_compat": "rnn_classifier"}
PROGRAMS = ("run_cnn", "run_nn", "run_rnn")
ENTRY_POINTS = [f"{package}/{name}.py" for package in PACKAGES for name in PROGRAMS] \
    + [f"tf2_impl/{name}_keras.py" for name in PROGRAMS]
SECTIONS = ["# Data", "# Model, loss and optimizer", "# Training", "# Test"]


def _top_level_names(path):
    tree = ast.parse(path.read_text())
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def _imported_names(path):
    """Names a module takes from another (torch's rnn_models.py re-exports models.py's
    export_weights and import_weights: a state_dict is a state_dict)."""
    tree = ast.parse(path.read_text())
    return [alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
            for alias in node.names]


def _in_order(names, wanted):
    """`wanted` as it appears in `names` (each name's first definition)."""
    return [name for name in names if name in wanted]


@pytest.mark.parametrize("file", sorted(SHARED))
@pytest.mark.parametrize("package", PACKAGES)
def test_shared_names_defined_in_every_framework_in_the_same_order(package, file):
    path = REPO / package / file
    names = _top_level_names(path)
    wanted = ([RNN_MODEL[package]] if file == "rnn_models.py" else []) + SHARED[file]
    missing = [n for n in wanted if n not in names + _imported_names(path)]
    assert not missing, f"{package}/{file} lacks {missing}"
    defined = [n for n in wanted if n in names]
    assert _in_order(names, wanted) == defined, f"{package}/{file} orders them differently"


def test_fast_variants_keep_the_names_they_replace():
    """Every public function or class of a fast.py that shares a name with the plain
    code is a drop-in for it; each fast.py replaces at least one plain name."""
    for package in PACKAGES:
        plain = {name for file in SHARED for name in _top_level_names(REPO / package / file)}
        fast = set(_top_level_names(REPO / package / "fast.py"))
        assert fast & plain, f"{package}/fast.py replaces no plain function by name"


def test_readme_table_lists_the_shared_names():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## The paired files"):text.index("## Running")]
    for names in SHARED.values():
        for name in names:
            assert f"`{name}`" in table, f"README's paired-files table does not list {name}"


@pytest.mark.parametrize("file", [*SHARED, "fast.py", *(f"{name}.py" for name in PROGRAMS)])
@pytest.mark.parametrize("package", PACKAGES)
def test_every_paired_file_names_its_twins(package, file):
    """The docstring names the same file in the other frameworks (a ``_keras`` entry point:
    its program's)."""
    files = [file] + [f"{file[:-3]}_keras.py"] * (package == "tf2_impl" and file.startswith("run_"))
    for name in files:
        doc = ast.get_docstring(ast.parse((REPO / package / name).read_text())) or ""
        missing = [f"{other}/{file}" for other in PACKAGES
                   if other != package and f"{other}/{file}" not in doc]
        assert not missing, f"{package}/{name}'s docstring does not name {missing}"


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
