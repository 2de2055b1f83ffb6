"""The shared data layer: splits, normalisation, CIFAR-10 download path, bad input,
the command line, and the import-order guard."""
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common import cifar10, cli, datasets
from common.errors import DataError, UserError
from common.runner import run_main

REPO = Path(__file__).resolve().parents[1]


# -- splits and normalisation -------------------------------------------------------------
def test_split_is_deterministic_and_disjoint():
    a = datasets.split_indices(1797, seed=3)
    b = datasets.split_indices(1797, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    train, val, test = a
    assert len(set(train) | set(val) | set(test)) == 1797
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    other = datasets.split_indices(1797, seed=4)
    assert not np.array_equal(other[0], train)


def _split_digest(seed):
    d = datasets.load_dataset("digits", "image", seed=seed)
    return hashlib.sha256(d.x_train.tobytes() + d.y_test.tobytes()).hexdigest()


def test_split_identical_across_processes():
    code = ("from parity_tests.test_foundation import _split_digest; print(_split_digest(5))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == _split_digest(5)


def test_batches_depend_on_seed_and_epoch_only():
    a = datasets.batch_indices(250, 100, seed=1, epoch=3)
    b = datasets.batch_indices(250, 100, seed=1, epoch=3)
    assert [len(x) for x in a] == [100, 100, 50]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], datasets.batch_indices(250, 100, seed=1, epoch=4)[0])
    np.testing.assert_array_equal(np.concatenate(datasets.batch_indices(250, 100, 1, 1, shuffle=False)),
                                  np.arange(250))


def test_normalisation_uses_train_split_only():
    from sklearn.datasets import make_friedman1
    x, _ = make_friedman1(n_samples=5000, n_features=10, noise=1.0, random_state=0)
    d = datasets.load_dataset("friedman", "tabular", seed=0)
    train, val, test = datasets.split_indices(5000, 0)
    np.testing.assert_allclose(d.mean, x[train].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(d.std, x[train].std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0, atol=1e-5)
    assert np.abs(d.x_test.mean(axis=0)).max() > 1e-3  # test statistics were not used
    assert d.x_train.shape == (3500, 10) and d.y_train.dtype == np.float32


def test_image_layout_is_nhwc_normalised_per_channel():
    d = datasets.load_dataset("synthetic", "image", seed=0)
    assert d.input_shape == (32, 32, 3) and d.x_train.dtype == np.float32
    np.testing.assert_allclose(d.x_train.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(axis=(0, 1, 2), dtype=np.float64), 1, atol=1e-5)
    assert d.mean.shape == (3,) and d.num_classes == 10
    digits = datasets.load_dataset("digits", "image", seed=0)
    assert digits.input_shape == (8, 8, 1) and digits.y_train.dtype == np.int64


def test_auto_uses_bundled_data_and_says_how_to_fetch(tmp_path):
    d = datasets.load_dataset("auto", "image", data_dir=tmp_path)
    assert d.name == "digits" and "--download" in d.extra["note"]
    d = datasets.load_dataset("auto", "tabular", data_dir=tmp_path)
    assert d.name == "friedman" and "--download" in d.extra["note"]
    assert not any(tmp_path.iterdir())


# -- CIFAR-10 through the real download path ----------------------------------------------
def _batch_bytes(n, label_offset, obj=None):
    rng = np.random.default_rng(label_offset)
    batch = {b"batch_label": b"tiny", b"labels": [int((i + label_offset) % 10) for i in range(n)],
             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    if obj is not None:
        batch[b"data"] = obj
    return pickle.dumps(batch, protocol=2)


def make_cifar_archive(path, n=12, members=None, obj=None):
    """A tiny archive in the official layout: cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    members = members or {}
    with tarfile.open(path, "w:gz") as tar:
        names = cifar10.TRAIN_BATCHES + [cifar10.TEST_BATCH]
        for i, name in enumerate(names):
            data = _batch_bytes(n, i, obj if name == "data_batch_1" else None)
            info = tarfile.TarInfo(f"{cifar10.FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return cifar10.file_md5(path)


def test_cifar10_download_extract_and_load(tmp_path):
    served = tmp_path / "served.tar.gz"
    md5 = make_cifar_archive(served, n=12)
    data_dir = tmp_path / "data"
    cifar10.download(data_dir, url=served.as_uri(), md5=md5)
    assert cifar10.is_present(data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([cifar10.ARCHIVE_NAME, cifar10.FOLDER])
    x_train, y_train, x_test, y_test = cifar10.load(data_dir)
    assert x_train.shape == (60, 32, 32, 3) and x_test.shape == (12, 32, 32, 3)
    # row layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    raw = pickle.loads(_batch_bytes(12, 0))[b"data"]
    np.testing.assert_array_equal(x_train[0, 0, 1], raw[0, [1, 1025, 2049]])
    d = datasets.load_dataset("auto", "image", data_dir=data_dir, seed=0)
    assert d.name == "cifar10" and d.input_shape == (32, 32, 3)
    assert len(d.x_test) == 12  # the official test set is kept


def _assert_nothing_left(data_dir):
    left = [p.name for p in Path(data_dir).iterdir()] if Path(data_dir).exists() else []
    assert left == [] or left == [cifar10.ARCHIVE_NAME], left


def test_cifar10_tampered_archive_refused_before_extraction(tmp_path):
    served = tmp_path / "served.tar.gz"
    md5 = make_cifar_archive(served)
    served.write_bytes(served.read_bytes() + b"tampered")
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="checksum .* expected .*corrupt or tampered"):
        cifar10.download(data_dir, url=served.as_uri(), md5=md5)
    assert not any(data_dir.iterdir())


def test_cifar10_truncated_archive(tmp_path):
    archive = tmp_path / "data" / cifar10.ARCHIVE_NAME
    archive.parent.mkdir()
    make_cifar_archive(archive)
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated or not a tar.gz archive"):
        cifar10.extract(archive, archive.parent, md5=cifar10.file_md5(archive))
    _assert_nothing_left(archive.parent)


def test_cifar10_member_escaping_directory(tmp_path):
    archive = tmp_path / "data" / cifar10.ARCHIVE_NAME
    archive.parent.mkdir()
    md5 = make_cifar_archive(archive, members={"../escaped.txt": b"x"})
    with pytest.raises(DataError, match="would land outside"):
        cifar10.extract(archive, archive.parent, md5=md5)
    assert not (tmp_path / "escaped.txt").exists()
    _assert_nothing_left(archive.parent)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_pickle_that_builds_an_object_is_refused(tmp_path):
    archive = tmp_path / "data" / cifar10.ARCHIVE_NAME
    archive.parent.mkdir()
    md5 = make_cifar_archive(archive, obj=_Payload())
    with pytest.raises(DataError, match="not a plain-data CIFAR-10 batch .*refusing to load global"):
        cifar10.extract(archive, archive.parent, md5=md5)
    assert not (archive.parent / "pwned").exists() and not Path("pwned").exists()
    _assert_nothing_left(archive.parent)


def test_cifar10_bad_labels_refused(tmp_path):
    folder = tmp_path / cifar10.FOLDER
    folder.mkdir()
    for name in cifar10.TRAIN_BATCHES + [cifar10.TEST_BATCH]:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="'labels' must be 2 integers in 0..9"):
        cifar10.load(tmp_path)


def test_cifar10_missing_offline(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 is not in .*--download.*--dataset digits"):
        datasets.load_dataset("cifar10", "image", data_dir=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_nan_or_inf_features_refused():
    x = np.ones((20, 3))
    x[4, 1] = np.nan
    with pytest.raises(DataError, match="NaN or infinite values; clean or impute"):
        datasets.from_arrays("mine", "regression", x, np.ones(20), seed=0)
    x[4, 1] = np.inf
    with pytest.raises(DataError, match="NaN or infinite"):
        datasets.from_arrays("mine", "regression", x, np.ones(20), seed=0)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown image dataset 'nosuch'; choose one of auto, cifar10"):
        datasets.load_dataset("nosuch", "image")


# -- command line --------------------------------------------------------------------------
def _parser():
    return cli.build_parser("torch_impl.run_cnn", "image", "test")


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "must be at least 1"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--lr", "-1"], "must be a positive finite number"),
    (["--lr", "0"], "must be a positive finite number"),
    (["--lr", "1e38"], "must be at most 1e+37 (float32 overflows"),
    (["--dataset", "nosuch"], "invalid choice: 'nosuch' (choose from"),
    (["--device", "tpu"], "invalid choice"),
])
def test_parser_rejects_nonsense(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(_parser(), argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_defaults_follow_the_manual():
    args = cli.parse_args(_parser(), [])
    assert (args.epochs, args.batch_size, args.lr, args.data_dir) == (50, 100, 1e-3, "./data")
    assert args.out.startswith(os.path.join("runs", "torch_impl-run_cnn-auto-"))


def test_eval_only_needs_weights():
    with pytest.raises(UserError, match="--eval-only needs --weights"):
        cli.parse_args(_parser(), ["--eval-only"])


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def main(argv):
        datasets.load_dataset("cifar10", "image", data_dir="/nonexistent/dl-rosetta")
    with pytest.raises(SystemExit) as exc:
        run_main(main, [])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 is not in") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# -- import order --------------------------------------------------------------------------
def _run_python(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_import_order_guard_tensorflow_first():
    """User code imports tensorflow first; a later torch optimizer and torch.compile
    must not abort the process (without the guard: LLVM 'registered more than once')."""
    out = _run_python("""
        import tensorflow as tf
        import common
        import torch
        model = torch.nn.Linear(3, 2)
        torch.optim.Adam(model.parameters()).step()
        f = torch.compile(lambda x: x * 2 + 1)
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
        print("survived", float(tf.reduce_sum(tf.ones(2))))
    """)
    assert "survived 2.0" in out


def test_import_order_guard_keeps_triton_when_common_comes_first():
    out = _run_python("""
        import sys
        import common
        import tensorflow as tf
        import torch
        torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
        print("triton loaded", sys.modules.get("triton") is not None, float(tf.reduce_sum(tf.ones(2))))
    """)
    assert "triton loaded True 2.0" in out
