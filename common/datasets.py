"""Datasets as numpy arrays: deterministic splits, train-only normalisation.

``load_dataset(name, ...)`` returns a ``Dataset`` with train/val/test arrays and
metadata. Kinds: "image" (CNN), "tabular" (MLP) and "sequence" (the recurrent
program: an image dataset read one image row per time step). The canonical in-memory image layout is **NHWC float32** (samples,
height, width, channels), normalised per channel; torch converts it to NCHW with
``common.layout.nhwc_to_nchw``, TF uses it as it is. Tabular features are
float32 (samples, features), normalised per feature. Classification labels are
int64 class indices; regression targets are float32 of shape (samples,) in their
original units (each implementation reshapes them to its model's (samples, 1)).

Splits depend only on the dataset and the seed, never on the framework.
Normalisation statistics come from the training split only.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import cifar10
from common.errors import DataError

IMAGE_DATASETS = ("auto", "cifar10", "digits", "synthetic")
TABULAR_DATASETS = ("auto", "california", "friedman", "diabetes")
SEQUENCE_DATASETS = IMAGE_DATASETS  # the same images, read as sequences of rows
DATASETS = {"image": IMAGE_DATASETS, "tabular": TABULAR_DATASETS, "sequence": SEQUENCE_DATASETS}
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
CIFAR_VAL_SIZE = 5000
SYNTHETIC_SIZE = 1200
CALIFORNIA_CACHE = "cal_housing_py3.pkz"  # scikit-learn's cache file name


@dataclass
class Dataset:
    name: str
    task: str  # "classification" or "regression"
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: list = None
    feature_names: list = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self):
        return len(self.class_names) if self.class_names else 0

    def metadata(self):
        """JSON-friendly description shared by metrics.json and weights files."""
        return {
            "dataset": self.name,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "feature_names": self.feature_names,
            "mean": np.asarray(self.mean, dtype=float).ravel().tolist(),
            "std": np.asarray(self.std, dtype=float).ravel().tolist(),
            "sizes": {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)},
        }


def split_indices(n, seed, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION):
    """Disjoint (train, val, test) index arrays; a function of (n, seed) only."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return np.sort(train), np.sort(val), np.sort(test)


def batch_indices(n, batch_size, seed, epoch, shuffle=True):
    """The mini-batches of one epoch as index arrays, identical in every framework.

    The order depends on (seed, epoch) only, so a resumed run sees the same batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _check_finite(name, *arrays):
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise DataError(f"dataset {name!r} contains NaN or infinite values; "
                            f"clean or impute the features before training")


def _standardise(x_train, axis):
    mean = x_train.mean(axis=axis, dtype=np.float64)
    std = x_train.std(axis=axis, dtype=np.float64)
    std = np.where(std < 1e-8, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def _finish(name, task, x, y, splits, source, class_names=None, feature_names=None,
            image=False):
    """Normalise with train statistics and package the three splits."""
    _check_finite(name, x, y)
    train, val, test = splits
    x = x.astype(np.float32)
    axis = (0, 1, 2) if image else 0
    mean, std = _standardise(x[train], axis)
    x = (x - mean) / std
    y = y.astype(np.int64 if task == "classification" else np.float32)
    return Dataset(name, task, x[train], y[train], x[val], y[val], x[test], y[test], mean, std,
                   class_names=class_names, feature_names=feature_names, source=source)


def _finish_official_test(name, x_train_all, y_train_all, x_test, y_test, seed, val_size, source,
                          class_names):
    """Image data with an official test set: validation comes from train."""
    order = np.random.default_rng(seed).permutation(len(x_train_all))
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    x = np.concatenate([x_train_all, x_test])
    y = np.concatenate([y_train_all, y_test])
    test = np.arange(len(x_train_all), len(x))
    return _finish(name, "classification", x, y, (train, val, test), source, class_names,
                   image=True)


def from_arrays(name, task, x, y, seed, class_names=None, feature_names=None):
    """A dataset from your own arrays: images (N, H, W, C) or tabular (N, features).

    Split and normalised exactly like the built-in datasets; NaN or inf refused.
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise DataError(f"dataset {name!r} has {len(x)} samples but {len(y)} targets; "
                        f"give one target per sample")
    return _finish(name, task, x, y, split_indices(len(x), seed), f"arrays given for {name!r}",
                   class_names=class_names, feature_names=feature_names, image=x.ndim == 4)


def load_digits(seed):
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    x = bunch.images.reshape(-1, 8, 8, 1)  # NHWC with one channel
    return _finish("digits", "classification", x, bunch.target,
                   split_indices(len(x), seed), "scikit-learn's bundled 8x8 digits",
                   [str(c) for c in bunch.target_names], image=True)


def make_synthetic_images(n, seed=1234, shape=(32, 32, 3), num_classes=10):
    """Deterministic CIFAR-shaped uint8 images: a fixed pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(40, 215, size=(num_classes, *shape))
    labels = np.arange(n) % num_classes
    noise = rng.normal(0.0, 40.0, size=(n, *shape))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def load_synthetic(seed, n=SYNTHETIC_SIZE):
    x, y = make_synthetic_images(n)
    return _finish("synthetic", "classification", x, y, split_indices(n, seed),
                   f"{n} synthetic CIFAR-shaped images",
                   [f"class{i}" for i in range(10)], image=True)


def load_cifar10(data_dir, seed, download=False):
    if not cifar10.is_present(data_dir):
        if not download:
            raise DataError(f"CIFAR-10 is not in {Path(data_dir) / cifar10.FOLDER}; run again with "
                            f"--download to fetch it (170 MB), or use --dataset digits")
        cifar10.download(data_dir)
    x_train, y_train, x_test, y_test = cifar10.load(data_dir)
    dataset = _finish_official_test("cifar10", x_train, y_train, x_test, y_test, seed,
                                    min(CIFAR_VAL_SIZE, len(x_train) // 10),
                                    f"CIFAR-10 from {data_dir}", cifar10.CLASS_NAMES)
    dataset.extra["mirror"] = True  # a mirrored photograph shows the same class (--augment)
    return dataset


def load_friedman(seed):
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(n_samples=5000, n_features=10, noise=1.0, random_state=0)
    return _finish("friedman", "regression", x, y, split_indices(len(x), seed),
                   "scikit-learn's make_friedman1 (5000 rows, noise 1.0)",
                   feature_names=[f"x{i}" for i in range(10)])


def load_diabetes(seed):
    from sklearn.datasets import load_diabetes as sk_diabetes
    bunch = sk_diabetes()
    return _finish("diabetes", "regression", bunch.data, bunch.target,
                   split_indices(len(bunch.data), seed), "scikit-learn's bundled diabetes",
                   feature_names=list(bunch.feature_names))


def california_present(data_dir):
    return (Path(data_dir) / CALIFORNIA_CACHE).is_file()


def load_california(data_dir, seed, download=False):
    if not california_present(data_dir) and not download:
        raise DataError(f"California housing is not cached in {data_dir}; run again with "
                        f"--download to fetch it, or use --dataset friedman")
    from sklearn.datasets import fetch_california_housing
    try:
        bunch = fetch_california_housing(data_home=str(data_dir), download_if_missing=download)
    except OSError as exc:
        raise DataError(f"could not fetch California housing into {data_dir} ({exc}); "
                        f"check the network or use --dataset friedman") from None
    return _finish("california", "regression", bunch.data, bunch.target,
                   split_indices(len(bunch.data), seed), f"California housing from {data_dir}",
                   feature_names=list(bunch.feature_names))


def as_sequences(dataset):
    """Image rows as time steps: x (N, H, W, C) -> (N, H, W*C), each step's features in
    (W, C) order (digits: 8 steps of 8; CIFAR-10: 32 steps of 32x3). Same splits and
    the same train-only per-channel normalisation as the images (``mean``/``std``)."""
    for split in ("x_train", "x_val", "x_test"):
        x = getattr(dataset, split)
        setattr(dataset, split, np.ascontiguousarray(x.reshape(len(x), x.shape[1], -1)))
    dataset.extra["sequence"] = "one image row per time step, features in (width, channel) order"
    return dataset


def resolve_auto(kind, data_dir):
    """(dataset name, one line saying which was used and how to fetch the real one)."""
    if kind in ("image", "sequence"):
        if cifar10.is_present(data_dir):
            return "cifar10", f"dataset auto: using CIFAR-10 found in {data_dir}"
        return "digits", ("dataset auto: CIFAR-10 is not in "
                          f"{data_dir}, using the bundled digits; fetch CIFAR-10 with "
                          "--dataset cifar10 --download")
    if california_present(data_dir):
        return "california", f"dataset auto: using California housing cached in {data_dir}"
    return "friedman", ("dataset auto: California housing is not cached in "
                        f"{data_dir}, using make_friedman1; fetch it with "
                        "--dataset california --download")


def load_dataset(name, kind, data_dir="data", seed=0, download=False):
    """Load dataset `name` for a task `kind` ("image", "tabular" or "sequence")."""
    choices = DATASETS[kind]
    if name not in choices:
        raise DataError(f"unknown {kind} dataset {name!r}; choose one of {', '.join(choices)}")
    note = ""
    if name == "auto":
        name, note = resolve_auto(kind, data_dir)
    loaders = {
        "digits": lambda: load_digits(seed),
        "synthetic": lambda: load_synthetic(seed),
        "cifar10": lambda: load_cifar10(data_dir, seed, download),
        "friedman": lambda: load_friedman(seed),
        "diabetes": lambda: load_diabetes(seed),
        "california": lambda: load_california(data_dir, seed, download),
    }
    dataset = loaders[name]()
    if kind == "sequence":
        dataset = as_sequences(dataset)
    dataset.extra["note"] = note
    return dataset
