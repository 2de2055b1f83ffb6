"""Tests of the PyTorch recurrent classifier (``torch_impl/rnn_models.py``, the reference) and
of what its program shares with its twins: the ``sequence`` data kind, the command line and
the weights check; one real command line, ``torch_impl.run_rnn --epochs 2``.

Shapes and variable lists in the style of slim's ``alexnet_test``, per cell and direction;
then the two choices every twin must copy: ``batch_first=True`` (torch's default reads a
(B, T, F) batch as B steps of a batch of T, silently) and the final hidden state taken as
the features for ``fc`` (the forward direction's after the last step, then the backward
direction's after the first). The reliability of the four RNN programs (interrupt and
resume, NaN stop, unfit weights) is in ``test_rnn_reliability.py``.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import config
from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.errors import DataError, WeightsError
from common.weights import load_weights, read_weights, save_weights, weights_metadata
from parity_tests.conftest import REPO, call, expect_exit, metrics
from torch_impl import run_rnn
from torch_impl.rnn_models import CELLS, build_rnn, export_weights, import_weights

H = config.RNN_HIDDEN
B, T, F = 5, 8, 8  # batch, steps, features (digits: 8 rows of 8 pixels)
WRONG = 0.05       # every wrong way below differs by more than this


def max_diff(a, b):
    return (a - b).abs().max().item()


def final_hidden(state):
    """h_n of an LSTM's (h_n, c_n) or of a GRU."""
    return state[0] if isinstance(state, tuple) else state


def last_layer_state(layer, x):
    """The last layer's final hidden state (of its last direction) after reading x."""
    return final_hidden(layer(x)[1])[-1]


# -- shapes and variables ----------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", config.RNN_CELLS)
@pytest.mark.parametrize("steps, features", [(8, 8), (32, 96)], ids=["digits", "cifar"])
def test_layer_outputs_and_variables(cell, bidirectional, steps, features):
    """Two layers, rnn then fc; the variables are the shared format's, in its order."""
    model = build_rnn(features, 10, cell, bidirectional)
    shapes = []
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, inputs, out, name=name: shapes.append(
            (name, tuple(out[0].shape) if name == "rnn" else tuple(out.shape))))
    dirs = 2 if bidirectional else 1
    assert tuple(model(torch.randn(4, steps, features)).shape) == (4, 10)
    assert shapes == [("rnn", (4, steps, dirs * H)), ("fc", (4, 10))]
    expected = config.rnn_parameter_shapes(features, 10, cell, bidirectional)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(expected.items())
    assert {k: tuple(v.shape) for k, v in export_weights(model).items()} == expected
    assert expected["rnn.weight_ih_l0"] == (config.RNN_GATES[cell] * H, features)
    assert model.rnn.batch_first and isinstance(model.rnn, CELLS[cell])


def test_parameter_shapes_refuse_an_unknown_cell():
    with pytest.raises(ValueError, match="unknown recurrent cell 'rnn'; choose one of lstm, gru"):
        config.rnn_parameter_shapes(8, 10, "rnn")


# -- batch_first -------------------------------------------------------------------------
@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_batch_first_false_on_a_batch_major_input_is_silently_wrong(cell):
    """The same weights in a layer with torch's default batch_first=False, given the (B, T, F)
    batch the model gets: with B == T no error and logits of the right shape, but the wrong
    values, and each sample's logits depend on the other samples (the layer steps through
    the batch). The model's batch_first=True layer gives every sample its own sequence's
    logits, those of the time-major call on the transposed batch."""
    torch.manual_seed(0)
    model = build_rnn(F, 10, cell).eval()
    time_major = CELLS[cell](F, H, num_layers=config.RNN_LAYERS)  # batch_first=False
    time_major.load_state_dict(model.rnn.state_dict())
    x = torch.randn(T, T, F)  # B == T: the shapes cannot tell
    changed = x.clone()
    changed[-1] += 1.0  # only the last sample differs

    def wrong(x):
        return model.fc(last_layer_state(time_major, x))

    with torch.no_grad():
        right = model(x)
        assert right.shape == wrong(x).shape == (T, 10)
        assert max_diff(wrong(x), right) > WRONG
        assert max_diff(wrong(changed)[:-1], wrong(x)[:-1]) > WRONG  # samples mixed
        torch.testing.assert_close(model(changed)[:-1], right[:-1])
        torch.testing.assert_close(right, model.fc(last_layer_state(time_major, x.transpose(0, 1))))
        torch.testing.assert_close(model(x[3:4]), right[3:4])


# -- the final hidden state ----------------------------------------------------------------
@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_forward_final_state_is_the_last_steps_output(cell):
    torch.manual_seed(1)
    model = build_rnn(F, 10, cell).eval()
    x = torch.randn(B, T, F)
    with torch.no_grad():
        out, state = model.rnn(x)
        assert torch.equal(final_hidden(state)[-1], out[:, -1])
        torch.testing.assert_close(model(x), model.fc(out[:, -1]))
        assert max_diff(model(x), model.fc(out[:, 0])) > WRONG


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_bidirectional_concatenates_forward_last_then_backward_first(cell):
    """[forward after step T, backward after step 1]; the backward half is a forward layer
    with the ``_reverse`` weights run on the reversed sequence. ``out[:, -1]`` (the backward
    direction after one step only) and the swapped order are the wrong features."""
    torch.manual_seed(2)
    model = build_rnn(F, 10, cell, bidirectional=True).eval()
    backward = CELLS[cell](F, H, batch_first=True)
    backward.load_state_dict({k.replace("_reverse", ""): v
                              for k, v in model.rnn.state_dict().items() if k.endswith("_reverse")})
    x = torch.randn(B, T, F)
    with torch.no_grad():
        out, state = model.rnn(x)
        h_n = final_hidden(state)
        torch.testing.assert_close(last_layer_state(backward, x.flip(1)), out[:, 0, H:])
        torch.testing.assert_close(torch.cat([h_n[-2], h_n[-1]], dim=1),
                                   torch.cat([out[:, -1, :H], out[:, 0, H:]], dim=1))
        logits = model(x)
        torch.testing.assert_close(logits, model.fc(torch.cat([out[:, -1, :H], out[:, 0, H:]], 1)))
        assert max_diff(logits, model.fc(out[:, -1])) > WRONG
        assert max_diff(logits, model.fc(torch.cat([h_n[-1], h_n[-2]], dim=1))) > WRONG


# -- the sequence data kind --------------------------------------------------------------
@pytest.mark.parametrize("name, steps, features", [("digits", 8, 8), ("synthetic", 32, 96)])
def test_sequence_kind_reads_one_image_row_per_step(name, steps, features):
    """Same splits, labels and train-only per-channel statistics as the image kind."""
    sequences, images = load_dataset(name, "sequence"), load_dataset(name, "image")
    assert sequences.input_shape == (steps, features)
    assert sequences.task == "classification" and sequences.num_classes == 10
    for split in ("train", "val", "test"):
        x, image = getattr(sequences, f"x_{split}"), getattr(images, f"x_{split}")
        assert x.shape == (len(image), steps, features) and x.dtype == np.float32
        np.testing.assert_array_equal(x, image.reshape(len(image), steps, features))
        y = getattr(sequences, f"y_{split}")
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, getattr(images, f"y_{split}"))
    np.testing.assert_array_equal(sequences.mean, images.mean)
    channels = sequences.x_train.reshape(-1, images.input_shape[-1])  # features in (W, C) order
    np.testing.assert_allclose(channels.mean(axis=0, dtype=np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(channels.std(axis=0, dtype=np.float64), 1, atol=1e-5)
    assert np.abs(sequences.x_test.mean(dtype=np.float64)) > 1e-3  # test statistics unused


def test_sequence_auto_is_digits_offline_and_unknown_names_are_refused(tmp_path):
    d = load_dataset("auto", "sequence", data_dir=tmp_path)
    assert d.name == "digits" and d.input_shape == (8, 8) and "--download" in d.extra["note"]
    assert not any(tmp_path.iterdir())
    with pytest.raises(DataError, match="unknown sequence dataset 'friedman'"):
        load_dataset("friedman", "sequence")


# -- command line --------------------------------------------------------------------------
def test_cell_bidirectional_and_the_learning_rate_default():
    parser = build_parser(run_rnn.MODULE, "sequence", "test")
    args = parse_args(parser, [])
    assert (args.cell, args.bidirectional, args.lr) == ("lstm", False, config.RNN_LEARNING_RATE)
    args = parse_args(parser, ["--cell", "gru", "--bidirectional", "--lr", "0.01"])
    assert (args.cell, args.bidirectional, args.lr) == ("gru", True, 0.01)
    image = parse_args(build_parser("torch_impl.run_cnn", "image", "test"), [])
    assert image.lr == config.LEARNING_RATE != config.RNN_LEARNING_RATE
    assert not hasattr(image, "cell")


def test_a_bad_cell_is_refused_by_argparse(tmp_path, capsys):
    assert call(run_rnn.main, ["--cell", "rnn", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "argument --cell: invalid choice: 'rnn'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cell_and_direction_take_effect(tmp_path):
    out = tmp_path / "gru-bi"
    argv = ["--cell", "gru", "--bidirectional", "--epochs", "1", "--device", "cpu"]
    assert call(run_rnn.main, [*argv, "--out", str(out)]) == 0
    m = metrics(out)
    assert (m["cell"], m["bidirectional"]) == ("gru", True)
    assert m["config"]["lr"] == config.RNN_LEARNING_RATE
    tensors, meta = read_weights(out / "weights.safetensors")
    assert (meta["cell"], meta["bidirectional"]) == ("gru", True)
    shapes = {k: v.shape for k, v in tensors.items()}
    assert shapes == config.rnn_parameter_shapes(F, 10, "gru", True)


# -- weights -----------------------------------------------------------------------------------
def save_model(path, cell, bidirectional=False, meta=True):
    """A fresh torch model's weights file for digits sequences, with or without the metadata."""
    dataset = load_dataset("digits", "sequence")
    options = {"cell": cell, "bidirectional": bidirectional}
    metadata = weights_metadata(dataset, "torch", options) if meta else {"task": dataset.task}
    save_weights(path, export_weights(build_rnn(F, 10, cell, bidirectional)), metadata)
    return path


@pytest.mark.parametrize("cell", config.RNN_CELLS)
def test_shared_weights_round_trip(cell, tmp_path):
    torch.manual_seed(3)
    model = build_rnn(F, 10, cell, bidirectional=True).eval()
    path = tmp_path / "w.safetensors"
    save_weights(path, export_weights(model), {"task": "classification", "cell": cell})
    tensors, _ = load_weights(path, "classification", (T, F), 10, cell=cell, bidirectional=True)
    fresh = import_weights(build_rnn(F, 10, cell, bidirectional=True), tensors).eval()
    x = torch.randn(B, T, F)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_load_weights_refuses_a_gru_file_for_an_lstm_run_in_one_sentence(tmp_path):
    path = save_model(tmp_path / "gru.safetensors", "gru")
    with pytest.raises(WeightsError) as refused:
        load_weights(path, "classification", (T, F), 10, cell="lstm")
    assert str(refused.value) == \
        f"{path} holds a gru model, this run builds a lstm: pass --cell gru"
    bare = save_model(tmp_path / "bare.safetensors", "gru", meta=False)  # no metadata: the shapes
    with pytest.raises(WeightsError, match="'rnn.weight_ih_l0' has shape \\(192, 8\\), expected"):
        load_weights(bare, "classification", (T, F), 10, cell="lstm")


@pytest.mark.parametrize("cell, bidirectional, argv, words", [
    ("gru", False, [], ["holds a gru model", "pass --cell gru"]),
    ("lstm", True, [], ["has unexpected tensor 'rnn.", "_l0_reverse'"]),
    ("lstm", False, ["--bidirectional"], ["lacks tensor 'rnn.weight_ih_l0_reverse'"]),
], ids=["gru-for-lstm", "bi-for-uni", "uni-for-bi"])
def test_unfit_weights_exit_2_from_the_entry_point(cell, bidirectional, argv, words, tmp_path,
                                                   capsys):
    path = save_model(tmp_path / "w.safetensors", cell, bidirectional)
    expect_exit(capsys, run_rnn.main, [*argv, "--eval-only", "--weights", str(path), "--device",
                                       "cpu", "--out", str(tmp_path / "run")], 2, str(path), *words)


# -- the command line, for real ----------------------------------------------------------------
def test_run_rnn_smoke_then_eval_only_reproduces_it(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch_impl.run_rnn", "--epochs", "2", "--device",
                           "cpu", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    m = metrics(out)
    assert (m["entry_point"], m["dataset"], m["cell"], m["bidirectional"]) == \
        ("torch_impl.run_rnn", "digits", "lstm", False)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2] and 0 <= m["test"]["accuracy"] <= 1
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + 359
    assert (out / "curves.png").is_file() and (out / "run.log").is_file()
    argv = ["--eval-only", "--weights", str(out / "weights.safetensors"), "--device", "cpu"]
    assert call(run_rnn.main, [*argv, "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "predictions.csv").read_text() == \
        (out / "predictions.csv").read_text()
