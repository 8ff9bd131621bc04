"""What the training commands do with their options: devices, output directory, data, model,
the run configuration; training every optimizer asked for; the results on disk and on screen.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from natgrad.experiments.options import UsageError

__all__ = [
    "say",
    "use_devices",
    "writable_dir",
    "load_data",
    "build_model",
    "run_config",
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


def load_data(args):
    """The dataset of ``--dataset`` (and ``--data-dir``)."""
    from natgrad.experiments import data

    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    if args.dataset == "synthetic":
        return data.synthetic()
    # A --data-dir names where the files are: look there (and in $NATGRAD_DATA_DIR), never
    # download behind the user's back; without one, mnist may be downloaded into the cache.
    options = {"download": False} if args.dataset == "mnist" and args.data_dir else {}
    return data.load_dataset(args.dataset, data_dir=args.data_dir, **options)


def build_model(args, dataset):
    """The model of ``--model`` and ``--hidden`` for `dataset`."""
    from natgrad.experiments import models

    try:
        return models.build(
            args.model, dataset.x_train.shape[1], dataset.num_classes, hidden=args.hidden
        )
    except ValueError as err:
        raise UsageError(f"--hidden: {err}") from None


def run_config(args):
    """The `training.RunConfig` of the run options."""
    from natgrad.experiments.training import RunConfig

    return RunConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        devices=args.devices,
        max_steps=args.steps,
    )


def config_record(command: str, args, dataset, model, hyper: dict[str, Any]) -> dict[str, Any]:
    """What results.json records about the run's configuration."""
    return {
        "command": command,
        "dataset": dataset.name,
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
    """Resolve, load, build and train every optimizer of `names` with the options `args`.

    Returns (config record, {name: result record}, seconds, the last `training.RunResult`).
    """
    from natgrad.experiments import lineup, training

    overrides = [lineup.parse_override(text) for text in args.set]
    hyper = lineup.resolve(names, overrides)
    use_devices(args.devices)
    writable_dir(out, "--out")
    if train_kwargs.get("checkpoint_dir"):
        writable_dir(train_kwargs["checkpoint_dir"], "--checkpoint-dir")
    dataset = load_data(args)
    model = build_model(args, dataset)
    optimizers = [lineup.build(name, hyper[name], model) for name in names]
    config = run_config(args)
    training.steps_per_epoch(len(dataset.x_train), config.batch_size)  # fail before any training
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


def report(out, record, results, seconds) -> None:
    """Write results.json, table.md and curves.png to `out`; print the table and the paths."""
    from natgrad.experiments import report as report_lib

    model = f"{record['model']} {'-'.join(map(str, record['sizes']))}"
    title = f"{model} on {record['dataset']}, batch {record['batch_size']}"
    paths = report_lib.write_results(out, record, results, total_seconds=seconds, title=title)
    print(report_lib.markdown_table(results))
    print(f"total time: {seconds:.1f} s (training, compilation and evaluation)")
    print(f"results: {paths['results']}  table: {paths['table']}  curves: {paths['curves']}")
