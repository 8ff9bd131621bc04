"""Issue 18, files: corrupt checkpoints (8), an explicit --data-dir (9), file modes (10).

One small `natgrad train` run (sgd on synthetic data, a few seconds) under umask 027 writes
every kind of file; its checkpoint is then damaged in each way a user or a disk might damage it,
and `natgrad train --resume` must answer each with one line naming the file and exit status 2.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from natgrad.experiments import checkpoint, cli, data

SMALL = ["--dataset", "synthetic", "--hidden", "8", "--batch-size", "64", "--no-progress"]
TRAIN = ["train", "--optimizer", "sgd", *SMALL, "--epochs", "1", "--checkpoint-every", "4"]
UMASK = 0o027


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint dir, out dir) of one small run made under umask 027."""
    root = tmp_path_factory.mktemp("trained")
    ck, out = root / "ck", root / "out"
    previous = os.umask(UMASK)
    try:
        assert cli.main([*TRAIN, "--checkpoint-dir", str(ck), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    return ck, out


# --- 10: every file follows the umask -----------------------------------------------------


def test_results_checkpoints_and_figures_follow_the_umask(trained):
    ck, out = trained
    files = [ck / "checkpoint.npz", *(out / n for n in ("results.json", "table.md"))]
    files += [out / "curves.png", out / "params.npz"]
    modes = {path.name: oct(_mode(path)) for path in files}
    assert modes == {path.name: oct(0o666 & ~UMASK) for path in files}  # 0640, not 0600


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, mask):
    from natgrad.experiments import filemode

    previous = os.umask(mask)
    try:
        checkpoint.write_atomic(str(tmp_path / "atomic"), lambda f: f.write(b"x"))
        with open(tmp_path / "plain", "wb") as f:
            f.write(b"x")
        assert filemode.current_umask() == mask
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "atomic") == _mode(tmp_path / "plain") == 0o666 & ~mask


def test_umask_is_read_without_proc_too(monkeypatch):
    from natgrad.experiments import filemode

    expected = filemode.current_umask()
    monkeypatch.setattr(filemode, "_STATUS", "/nonexistent/status")
    assert filemode.current_umask() == expected
    assert filemode.current_umask() == expected  # and left unchanged by reading it


# --- 8: damaged checkpoints ---------------------------------------------------------------


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _saved(arrays):
    return json.loads(arrays["record"].tobytes().decode("utf-8"))


def _with_record(arrays, edit):
    """`arrays` with its JSON record changed by `edit(saved)` (in place)."""
    saved = _saved(arrays)
    edit(saved)
    text = json.dumps(saved).encode("utf-8")
    return {**arrays, "record": np.frombuffer(text, dtype=np.uint8)}


def _pop(*keys):
    def edit(saved):
        node = saved
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit


def _put(value, *keys):
    def edit(saved):
        node = saved
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


# case -> (bytes of the file, or a function of the good file's arrays giving new arrays)
DAMAGE = {
    "empty file": b"",
    "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "a pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    "truncated": lambda good: good[: len(good) // 2],
    "no record array": lambda a: {k: v for k, v in a.items() if k != "record"},
    "record not json": lambda a: {**a, "record": np.frombuffer(b"\xff{", dtype=np.uint8)},
    "record of floats": lambda a: {**a, "record": np.zeros(3)},
    "object leaf": lambda a: {**a, "leaf_00000": np.array([{"x": 1}], dtype=object)},
    "missing leaf": lambda a: {k: v for k, v in a.items() if k != "leaf_00001"},
    "wrong leaf shape": lambda a: {**a, "leaf_00000": np.zeros((3, 3), np.float32)},
    "wrong leaf dtype": lambda a: {**a, "leaf_00000": a["leaf_00000"].astype(np.float64)},
    "no header": lambda a: _with_record(a, _pop("header")),
    "num_leaves text": lambda a: _with_record(a, _put("5", "header", "num_leaves")),
    "record a list": lambda a: _with_record(a, _put([], "record")),
    "no identity": lambda a: _with_record(a, _pop("record", "identity")),
    "identity a list": lambda a: _with_record(a, _put([1], "record", "identity")),
    "no progress": lambda a: _with_record(a, _pop("record", "progress")),
    "step text": lambda a: _with_record(a, _put("8", "record", "progress", "step")),
    "step negative": lambda a: _with_record(a, _put(-8, "record", "progress", "step")),
    "extra progress key": lambda a: _with_record(a, _put(1, "record", "progress", "bogus")),
    "curve a number": lambda a: _with_record(a, _put(5, "record", "progress", "curve")),
    "curve empty": lambda a: _with_record(a, _put([], "record", "progress", "curve")),
    "curve point text": lambda a: _with_record(a, _put(["x"], "record", "progress", "curve")),
    "curve loss text": lambda a: _with_record(
        a, lambda s: s["record"]["progress"]["curve"][0].update(test_loss="low")
    ),
    "stat_sums a list": lambda a: _with_record(a, _put([], "record", "progress", "stat_sums")),
    "train_seconds null": lambda a: _with_record(
        a, _put(None, "record", "progress", "train_seconds")
    ),
    "epoch null": lambda a: _with_record(a, _put(None, "record", "epoch")),
}


def _damage(ck_dir, case):
    path = ck_dir / "checkpoint.npz"
    how = DAMAGE[case]
    if isinstance(how, bytes):
        path.write_bytes(how)
    elif case == "truncated":
        path.write_bytes(how(path.read_bytes()))
    else:
        arrays = how(_arrays(path))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return path


@pytest.fixture
def damaged_dir(trained, tmp_path):
    ck, _ = trained
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    return copy


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_it_and_exit_2(damaged_dir, tmp_path, case, capsys):
    path = _damage(damaged_dir, case)
    argv = [*TRAIN, "--checkpoint-dir", str(damaged_dir), "--out", str(tmp_path / "o"), "--resume"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], captured.err
    assert "Traceback" not in captured.err and "pickle" not in captured.err.lower()
    assert not captured.out


@pytest.mark.parametrize("case", ["empty file", "random bytes", "object leaf", "num_leaves text"])
def test_load_raises_checkpoint_error_a_value_error(damaged_dir, case):
    path = _damage(damaged_dir, case)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint") as info:
        checkpoint.load(str(path), {"any": np.zeros(1)})  # fails before the template matters
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_a_damaged_checkpoint_from_the_shell_has_no_traceback(damaged_dir, tmp_path):
    path = _damage(damaged_dir, "empty file")
    argv = [*TRAIN, "--checkpoint-dir", str(damaged_dir), "--out", str(tmp_path / "o"), "--resume"]
    proc = subprocess.run(
        [sys.executable, "-m", "natgrad", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_undamaged_checkpoint_still_resumes(damaged_dir, tmp_path, capsys):
    argv = [*TRAIN, "--checkpoint-dir", str(damaged_dir), "--out", str(tmp_path / "o"), "--resume"]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    assert "resumed from checkpoint at step 8" in capsys.readouterr().err


# --- 9: an explicit --data-dir is used or refused -----------------------------------------


def _idx(array):
    magic = 0x0800 + array.ndim
    return (
        magic.to_bytes(4, "big")
        + b"".join(d.to_bytes(4, "big") for d in array.shape)
        + (array.astype(np.uint8).tobytes())
    )


def _tiny_fashion(directory):
    """A complete (tiny) Fashion-MNIST in IDX files: 16 train, 8 test images."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for split, n in (("train", 16), ("t10k", 8)):
        images = rng.integers(0, 256, (n, 28, 28))
        (directory / f"{split}-images-idx3-ubyte").write_bytes(_idx(images))
        (directory / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    return directory


def test_fashion_mnist_with_an_empty_data_dir_is_refused_not_the_system_copy(
    tmp_path, monkeypatch, capsys
):
    system = _tiny_fashion(tmp_path / "system")  # what Debian's package would be
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(system))
    monkeypatch.delenv("NATGRAD_DATA_DIR", raising=False)
    given = tmp_path / "given"
    given.mkdir()
    args = ["compare", "--dataset", "fashion-mnist", "--optimizers", "sgd", "--no-progress"]
    args += ["--epochs", "1", "--batch-size", "4", "--hidden", "4"]
    assert cli.main([*args, "--data-dir", str(given), "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(given) in lines[0], captured.err
    assert not (tmp_path / "o" / "results.json").exists()
    # With the files there, they are used, and results.json says which (directory, SHA-256s).
    shutil.rmtree(given)
    _tiny_fashion(given)
    (given / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.arange(8)[::-1] % 10))  # not system's
    assert cli.main([*args, "--data-dir", str(given), "--out", str(tmp_path / "o")]) == 0
    with open(tmp_path / "o" / "results.json") as f:
        source = json.load(f)["config"]["data_source"]
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in given.iterdir()}
    assert source == {"kind": "idx", "directory": str(given), "files": expected}


def test_results_json_records_the_data_source(trained):
    _, out = trained
    with open(out / "results.json") as f:
        source = json.load(f)["config"]["data_source"]
    assert source["kind"] == "synthetic" and source["arguments"]["num_train"] == 512
