"""CIFAR-10, python version: download, verify, extract safely, read safely.

The archive is kept where it extracts, ``<data-dir>/cifar-10-batches-py/``, the
same place torchvision's ``CIFAR10`` and the usual Keras scripts use, so a copy
they downloaded is reused. Nothing is downloaded unless the caller asks.

Safety, in the order it applies:
1. the archive's checksum is verified before anything is extracted;
2. extraction refuses any member that would land outside the data directory
   (absolute paths, ``..``, links, devices);
3. it extracts into a temporary directory beside the target and renames it into
   place, so a failure leaves nothing half-written;
4. batch files are unpickled with ``RestrictedUnpickler``, which only rebuilds
   plain data (dict, list, str, bytes, int, float, numpy arrays) and refuses any
   other global without calling it;
5. shapes, dtypes and label ranges are validated.
"""
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from common.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]

# The globals a CIFAR batch pickle may name: numpy's array reconstruction only.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data and numpy arrays, nothing else."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def restricted_load(data):
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def is_present(data_dir):
    folder = Path(data_dir) / FOLDER
    return all((folder / name).is_file() for name in TRAIN_BATCHES + [TEST_BATCH])


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(data_dir, url=URL, md5=MD5):
    """Fetch the archive (unless a verified copy is there), verify it, extract it."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / ARCHIVE_NAME
    if not archive.is_file() or file_md5(archive) != md5:
        fd, tmp = tempfile.mkstemp(prefix=f".{ARCHIVE_NAME}.", suffix=".part", dir=data_dir)
        os.close(fd)
        try:
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as exc:
                raise DataError(
                    f"could not download CIFAR-10 from {url} ({exc}); check the network, "
                    f"or place {ARCHIVE_NAME} in {data_dir} yourself") from None
            got = file_md5(tmp)
            if got != md5:
                raise DataError(
                    f"the downloaded CIFAR-10 archive has checksum {got}, expected {md5}; "
                    f"it is corrupt or tampered with: download it again")
            os.replace(tmp, archive)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    extract(archive, data_dir, md5)


def _check_member(member, root):
    target = (root / member.name).resolve()
    if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
        raise DataError(f"the CIFAR-10 archive member {member.name!r} is a link or special file; "
                        f"refusing to extract it: delete the archive and download it again")
    if os.path.isabs(member.name) or root not in target.parents and target != root:
        raise DataError(f"the CIFAR-10 archive member {member.name!r} would land outside "
                        f"{root}; refusing to extract: delete the archive and download it again")


def extract(archive, data_dir, md5=MD5):
    """Verify `archive`, then extract it into `data_dir` atomically."""
    archive, data_dir = Path(archive), Path(data_dir)
    got = file_md5(archive)
    if got != md5:
        raise DataError(f"{archive} has checksum {got}, expected {md5}; it is corrupt or "
                        f"tampered with: delete it and download it again (--download)")
    staging = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=data_dir))
    try:
        root = staging.resolve()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, root)
                # Python's own "data" filter (3.10.12+) re-checks each member as well.
                options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                for member in members:
                    tar.extract(member, root, set_attrs=False, **options)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive} is truncated or not a tar.gz archive ({exc}); "
                            f"delete it and download it again (--download)") from None
        extracted = staging / FOLDER
        if not extracted.is_dir():
            raise DataError(f"{archive} has no {FOLDER}/ folder; it is not the CIFAR-10 python archive")
        _read_split(extracted, TRAIN_BATCHES)  # validate before it lands
        _read_split(extracted, [TEST_BATCH])
        final = data_dir / FOLDER
        if final.exists():
            shutil.rmtree(final)
        os.replace(extracted, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_batch(path):
    try:
        batch = restricted_load(path.read_bytes())
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} is not a plain-data CIFAR-10 batch ({exc}); "
                        f"delete {path.parent} and download again") from None
    except Exception as exc:
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {exc}); "
                        f"delete {path.parent} and download again") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} lacks the 'data' and 'labels' entries of a CIFAR-10 batch; "
                        f"delete {path.parent} and download again")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" \
            or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9")
    return data, labels.astype(np.int64)


def _read_split(folder, names):
    parts = [_read_batch(Path(folder) / name) for name in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # The rows are (3, 32, 32) planes (channel-major); the canonical layout is NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load(data_dir):
    """(x_train, y_train, x_test, y_test) as uint8 NHWC images and int64 labels."""
    folder = Path(data_dir) / FOLDER
    for name in TRAIN_BATCHES + [TEST_BATCH]:
        if not (folder / name).is_file():
            raise DataError(f"CIFAR-10 is not in {folder} ({name} is missing); "
                            f"run again with --download, or use --dataset digits")
    x_train, y_train = _read_split(folder, TRAIN_BATCHES)
    x_test, y_test = _read_split(folder, [TEST_BATCH])
    return x_train, y_train, x_test, y_test
