"""Atomic checkpoints: a pytree's leaves and a JSON record in one .npz file.

Writing is atomic: the file is written to a temporary file in the same directory, flushed and
fsync'ed, renamed over the target with `os.replace` (atomic on POSIX), and the directory is
fsync'ed so the rename itself survives a crash. A reader sees the old checkpoint or the new one,
never half of one; a killed writer leaves at worst a stray ``.*.tmp`` file, never a bad checkpoint.

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
from collections.abc import Callable
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

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


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temp files a killed writer of `path` left behind; returns their names."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    stale = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
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

    Raises CheckpointError when the file is unreadable or its leaves do not match `template`.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            saved = json.loads(bytes(archive["record"]).decode("utf-8"))
            header = saved["header"]
            leaves = [archive[f"leaf_{i:05d}"] for i in range(header["num_leaves"])]
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {header.get('format')!r}")

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
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), saved["record"]
