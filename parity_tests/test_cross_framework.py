"""The eight entry points against each other: convergence from the same initial
weights, and a model trained in any implementation evaluated in every other.

Each task's four implementations start from one torch initialisation (exported in
the shared format), train a few epochs on the same split and batches, and write
``weights.safetensors``; every one of those files is then evaluated with
``--eval-only --weights`` by all four. Runs are in-process calls of each module's
``main`` (the subprocess behaviour of the same entry points is covered by each
implementation's smoke tests). With ``pytest --device cuda`` torch trains on the GPU, and
TensorFlow too where it sees one (else on the CPU, as its runs' metrics.json record).
"""
import csv

import numpy as np
import pytest
import torch

from common.datasets import load_dataset
from common.weights import save_weights, weights_metadata
from parity_tests.conftest import call, metrics, tf
from torch_impl.models import build_cnn, build_mlp, export_weights

ENTRY_POINTS = {
    "cnn": ["torch_impl.run_cnn", "tf2_impl.run_cnn", "tf2_impl.run_cnn_keras", "tf1_compat.run_cnn"],
    "mlp": ["torch_impl.run_nn", "tf2_impl.run_nn", "tf2_impl.run_nn_keras", "tf1_compat.run_nn"],
}
DATASET = {"cnn": "digits", "mlp": "friedman"}
EPOCHS = 4
# Same start, same batches, float32 arithmetic that differs in summation order and
# in dropout masks (each framework draws its own): the final test metrics agree
# within these bands.
BAND = {"cnn": ("accuracy", 0.05), "mlp": ("r2", 0.05)}


def _run(module, argv, device):
    """Run `module` on the session's --device: TensorFlow on the CPU where it sees no GPU."""
    if not module.startswith("torch") and device == "cuda" and not tf.config.get_visible_devices("GPU"):
        device = "cpu"
    assert call(module, [*argv, "--device", device]) == 0, module
    assert metrics(argv[argv.index("--out") + 1])["device"] == device, module


def _initial_weights(task, path):
    kind = "image" if task == "cnn" else "tabular"
    dataset = load_dataset(DATASET[task], kind, seed=0)
    torch.manual_seed(0)
    model = (build_cnn(dataset.input_shape, dataset.num_classes) if task == "cnn"
             else build_mlp(dataset.input_shape[-1]))
    save_weights(path, export_weights(model), weights_metadata(dataset, "torch (initial)"))


@pytest.fixture(scope="module", params=["cnn", "mlp"])
def trained(request, tmp_path_factory):
    """{module: run directory} after EPOCHS epochs from the shared initial weights."""
    task, device = request.param, request.config.getoption("device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: torch sees no CUDA GPU")
    root = tmp_path_factory.mktemp(f"cross-{task}")
    initial = root / "initial.safetensors"
    _initial_weights(task, initial)
    runs = {}
    for module in ENTRY_POINTS[task]:
        out = root / module
        _run(module, ["--dataset", DATASET[task], "--epochs", str(EPOCHS), "--weights", str(initial),
                      "--out", str(out)], device)
        runs[module] = out
    return task, root, runs, device


def _predictions(run_dir):
    with open(run_dir / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_convergence_from_the_same_initial_weights(trained):
    task, _, runs, _ = trained
    metric, band = BAND[task]
    finals = {m: metrics(d)["test"][metric] for m, d in runs.items()}
    assert all(len(metrics(d)["epochs"]) == EPOCHS for d in runs.values())
    assert min(finals.values()) > (0.8 if task == "cnn" else 0.6), finals
    assert max(finals.values()) - min(finals.values()) <= band, finals


def test_cross_framework_eval_only_same_predictions_all_entry_points(trained):
    """Every trained weights file, evaluated by every entry point of its task: same
    argmax everywhere; confidences and regression outputs within 1e-4."""
    task, root, runs, device = trained
    for writer, run_dir in runs.items():
        reference = _predictions(run_dir)
        for reader in ENTRY_POINTS[task]:
            out = root / f"eval-{writer}-by-{reader}"
            _run(reader, ["--dataset", DATASET[task], "--eval-only", "--weights",
                          str(run_dir / "weights.safetensors"), "--out", str(out)], device)
            got = _predictions(out)
            assert len(got) == len(reference)
            pairs = f"{writer} -> {reader}"
            if task == "cnn":
                assert [r["prediction"] for r in got] == [r["prediction"] for r in reference], pairs
                diff = max(abs(float(a["confidence"]) - float(b["confidence"]))
                           for a, b in zip(got, reference))
            else:
                diff = max(abs(float(a["prediction"]) - float(b["prediction"]))
                           for a, b in zip(got, reference))
            assert diff <= 1e-4, f"{pairs}: largest difference {diff}"
            np.testing.assert_allclose(metrics(out)["test"]["loss"], metrics(run_dir)["test"]["loss"],
                                       rtol=1e-4, err_msg=pairs)


@pytest.mark.parametrize("reader", ENTRY_POINTS["cnn"])
def test_plain_weights_evaluate_identically_in_every_fast_variant(trained, reader, tmp_path):
    """A CNN trained by the plain torch code, evaluated with --fast by every CNN entry
    point: the fast variants read the shared format and predict what plain torch does."""
    task, _, runs, device = trained
    if task != "cnn":
        pytest.skip("the fast variants that change the model are the CNN's")
    plain = runs["torch_impl.run_cnn"]
    _run(reader, ["--dataset", DATASET[task], "--eval-only", "--fast", "--weights",
                  str(plain / "weights.safetensors"), "--out", str(tmp_path)], device)
    assert metrics(tmp_path)["variant"] == "fast"
    got, reference = _predictions(tmp_path), _predictions(plain)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in reference], reader
    diff = max(abs(float(a["confidence"]) - float(b["confidence"])) for a, b in zip(got, reference))
    assert diff <= 1e-4, f"{reader}: largest difference {diff}"
