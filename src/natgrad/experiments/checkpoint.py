"""Atomic checkpoints: a pytree's leaves and a JSON record in one .npz file.

Writing is atomic: the file is written to a temporary file in the same directory, flushed and
fsync'ed, renamed over the target with `os.replace` (atomic on POSIX), and the directory is
fsync'ed so the rename itself survives a crash. A reader sees the old checkpoint or the new one,
never half of one; a killed writer leaves at worst a stray ``.*.tmp`` file, never a bad checkpoint.
The file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), not mkstemp's 0600.

Leaves are stored with their dtypes (``leaf_00000``, ...). Loading needs a template, a freshly
built pytree of the same structure (e.g. the initial training state): the leaves are checked
against it (count, structure, shapes, dtypes) and put back with its treedef, so the loaded pytree
is exactly the saved one, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

from natgrad.experiments.filemode import default_file_mode

__all__ = [
    "CheckpointError",
    "FILENAME",
    "save",
    "load",
    "write_atomic",
    "path_in",
    "remove_stale_temporaries",
]

FILENAME = "checkpoint.npz"
FORMAT = 1

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the run (one-line message)."""


def path_in(directory: str) -> str:
    """The checkpoint file of a checkpoint directory."""
    return os.path.join(directory, FILENAME)


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _writer_alive(name: str, prefix: str) -> bool:
    """Whether the temp file `name` (``<prefix><pid>.<random>.tmp``) belongs to a live process
    other than this one; a name without a pid (an older writer's) counts as stale."""
    pid = name[len(prefix) :].split(".", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temp files killed writers of `path` left behind; returns their names.

    Temp names carry the writer's pid: the temp file of another live process is kept.
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    stale = [
        n
        for n in os.listdir(directory)
        if n.startswith(prefix) and n.endswith(".tmp") and not _writer_alive(n, prefix)
    ]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    return stale


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` atomically: ``write(f)`` fills a temp file that then replaces `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f"{_temporary_prefix(path)}{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), default_file_mode())  # mkstemp's 0600 -> the umask's mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def save(path: str, tree: PyTree, record: dict[str, Any] | None = None) -> None:
    """Save the leaves of `tree` and the JSON-serialisable `record` to `path`, atomically."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = {f"leaf_{i:05d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
    header = {"format": FORMAT, "treedef": str(treedef), "num_leaves": len(leaves)}
    text = json.dumps({"header": header, "record": record or {}})
    arrays["record"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load(path: str, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """The pytree saved at `path`, rebuilt with the structure of `template`, and its record.

    Raises CheckpointError, with a one-line message naming `path`, when the file is missing,
    empty, not an archive written by `save`, damaged, or when its leaves do not match `template`.
    """
    header, record, leaves = _read(path)
    expected, treedef = jax.tree.flatten(template)
    if len(leaves) != len(expected) or header["treedef"] != str(treedef):
        raise CheckpointError(
            f"checkpoint {path} holds a different structure ({len(leaves)} arrays) from this "
            f"run's state ({len(expected)} arrays): was it written by another optimizer or model?"
        )
    for i, (got, want) in enumerate(zip(leaves, expected, strict=True)):
        want_shape, want_dtype = tuple(np.shape(want)), np.dtype(jnp.result_type(want))
        if got.shape != want_shape or got.dtype != want_dtype:
            raise CheckpointError(
                f"checkpoint {path}: array {i} is {got.dtype}{list(got.shape)}, this run's state "
                f"needs {want_dtype}{list(want_shape)}"
            )
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), record


def _read(path: str) -> tuple[dict[str, Any], dict[str, Any], list[np.ndarray]]:
    """(header, record, leaves) of the checkpoint file `path`, every part checked.

    The file is looked at before numpy parses it: numpy reads a non-archive as a pickle and
    answers with advice to unpickle it, which is the last thing to do with an unknown file.
    """
    try:
        size = os.path.getsize(path)
        is_archive = zipfile.is_zipfile(path)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    if not is_archive:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a complete .npz archive ({size} bytes: "
            "truncated, or another kind of file)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            header, record = _parse_record(path, _array(path, archive, "record"))
            leaves = [_array(path, archive, f"leaf_{i:05d}") for i in range(header["num_leaves"])]
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(err)}") from None
    return header, record, leaves


def _array(path: str, archive, name: str) -> np.ndarray:
    """The array `name` of an open .npz `archive`; CheckpointError when missing or unreadable."""
    if name not in archive.files:
        raise CheckpointError(f"cannot read checkpoint {path}: it has no array {name!r}")
    try:
        return archive[name]
    except ValueError as err:  # numpy's wording may advise unpickling: never shown
        problem = "holds Python objects" if "allow_pickle" in str(err) else "is unreadable"
        raise CheckpointError(f"cannot read checkpoint {path}: array {name!r} {problem}") from None


def _parse_record(path: str, raw: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, record) from the JSON bytes `raw`, their types checked."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"cannot read checkpoint {path}: its record is not JSON text")
    try:
        saved = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: its record is not JSON ({_one_line(err)})"
        ) from None
    header = saved.get("header") if isinstance(saved, dict) else None
    record = saved.get("record") if isinstance(saved, dict) else None
    if not isinstance(header, dict) or not isinstance(record, dict):
        raise CheckpointError(
            f"cannot read checkpoint {path}: its record needs a 'header' and a 'record' object"
        )
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {header.get('format')!r}")
    count, treedef = header.get("num_leaves"), header.get("treedef")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise CheckpointError(
            f"cannot read checkpoint {path}: header 'num_leaves' is {count!r}, expected an "
            "integer >= 0"
        )
    if not isinstance(treedef, str):
        raise CheckpointError(
            f"cannot read checkpoint {path}: header 'treedef' is {treedef!r}, expected text"
        )
    return header, record


def _one_line(value) -> str:
    return " ".join(str(value).split())
