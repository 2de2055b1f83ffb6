"""Reliability of the four recurrent programs, as ``test_reliability.py`` checks the others
(with the same helpers, from ``conftest.py``): a real signal to a real subprocess, then
``--resume``, equal to the uninterrupted run with ``--deterministic``; a non-finite loss
stops with exit 3; a weights file that does not fit is one sentence and exit 2, the cell
and direction included (each entry point must pass them to ``load_weights``).
"""
import pytest

from common.datasets import load_dataset
from common.weights import save_weights, weights_metadata
from parity_tests.conftest import expect_exit, expect_nan_stop, interrupt_then_resume
from torch_impl.models import build_cnn, export_weights
from torch_impl.rnn_models import build_rnn

RUNNERS = ["torch_impl.run_rnn", "tf2_impl.run_rnn", "tf2_impl.run_rnn_keras", "tf1_compat.run_rnn"]
# Each runner resumes one cell (the resumed run must restore --cell from run_config.json).
CELLS = dict(zip(RUNNERS, ["lstm", "gru", "gru", "lstm"]))
# Digits, small batches: epochs long enough for a signal to land inside one.
SMALL = ["--dataset", "digits", "--batch-size", "20", "--device", "cpu"]


@pytest.mark.parametrize("module", RUNNERS)
def test_interrupt_then_resume_equals_uninterrupted(module, tmp_path, spawn):
    argv = [*SMALL, "--cell", CELLS[module], "--seed", "3", "--deterministic"]
    interrupt_then_resume(spawn, module, argv, tmp_path, epochs=2)


@pytest.mark.parametrize("module", RUNNERS)
def test_nan_from_huge_learning_rate_exits_3(module, tmp_path, capsys):
    """--lr 1e37, not the 1e9 of the other programs: tanh bounds the recurrent state, so the
    logits grow only with fc's weights, by about lr per Adam step, and at 1e9 the loss stays
    finite (about 1e10). 1e37 overflows float32 in the first steps; 1e38 would overflow
    torch's Adam step size itself (lr / (1 - beta1))."""
    argv = ["--dataset", "digits", "--epochs", "2", "--lr", "1e37", "--device", "cpu"]
    expect_nan_stop(capsys, module, argv, tmp_path / "run")


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Fresh torch models' files that an LSTM run on digits must refuse."""
    root = tmp_path_factory.mktemp("rnn-weights")
    digits = load_dataset("digits", "sequence")
    files = {}

    def save(name, model, dataset=digits, **options):
        files[name] = root / f"{name}.safetensors"
        metadata = weights_metadata(dataset, "torch", options)
        save_weights(files[name], export_weights(model), metadata)

    save("gru", build_rnn(8, 10, "gru"), cell="gru", bidirectional=False)
    save("bidirectional", build_rnn(8, 10, "lstm", True), cell="lstm", bidirectional=True)
    save("synthetic", build_rnn(96, 10, "lstm"), load_dataset("synthetic", "sequence"),
         cell="lstm", bidirectional=False)
    save("cnn", build_cnn((8, 8, 1), 10), load_dataset("digits", "image"))
    files["truncated"] = root / "truncated.safetensors"
    files["truncated"].write_bytes(files["gru"].read_bytes()[:1000])
    return files


@pytest.mark.parametrize("module", RUNNERS)
@pytest.mark.parametrize("case, words", [
    ("gru", ["holds a gru model, this run builds a lstm: pass --cell gru"]),
    ("bidirectional", ["has unexpected tensor 'rnn.", "_reverse'"]),
    ("synthetic", ["'rnn.weight_ih_l0' has shape (256, 96), expected (256, 8)"]),
    ("cnn", ["lacks tensor 'rnn.weight_ih_l0'"]),
    ("truncated", ["is not a readable safetensors file"]),
])
def test_weights_that_do_not_fit_exit_2(module, case, words, weights_files, tmp_path, capsys):
    path = weights_files[case]
    argv = [*SMALL, "--eval-only", "--weights", str(path), "--out", str(tmp_path / "run")]
    expect_exit(capsys, module, argv, 2, str(path), *words)
    assert not (tmp_path / "run" / "predictions.csv").exists()
