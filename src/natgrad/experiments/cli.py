"""The `natgrad` command: compare optimizers, train one with checkpoints, list the lineup.

    natgrad compare [--dataset mnist-5k] [--epochs 2] [--batch-size 128] [--optimizers a,b,...]
                    [--seed 0] [--out results/<dataset>] [--data-dir DIR] [--model mlp]
                    [--hidden 128] [--eval-every 0.25] [--set OPT.KEY=VALUE ...]
    natgrad train --optimizer NAME --checkpoint-dir DIR [--checkpoint-every 100] [--resume]
                  [--out results/<dataset>-<optimizer>] [same data/model/run options]
    natgrad spectrum [--optimizer ngd-fisher] [--curvature ggn] [--top-k 10] [--num-iterations 40]
                     [--num-probes 8] [--max-condition 1000] [--out results/<dataset>-spectrum]
                     [same data/model/run options]
    natgrad lineup    (the optimizers and every default hyperparameter)

Every command takes ``--devices N``: each batch is split over N devices (jit + NamedSharding).

User errors (an unknown name, a bad path, unreadable data, a checkpoint of another run) print one
line to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]

PROG = "natgrad"


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) raised as UsageError."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


class _Help(argparse.HelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        trivial = action.default in (None, [], argparse.SUPPRESS) or action.default is False
        if not trivial and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _number(kind: type, ok, expected: str):
    """An argparse type: `kind(text)` if `ok` of it, else an error saying `expected`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_seed = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 128 or 256,64, got {text!r}"
        ) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    from natgrad.experiments import data, models

    p.add_argument(
        "--dataset",
        default="mnist-5k",
        choices=(*data.DATASETS, "synthetic"),
        help="synthetic: small random data for tests",
    )
    p.add_argument("--data-dir", help="directory with the dataset's files (for mnist etc.)")
    p.add_argument("--model", default="mlp", choices=models.MODELS, help="the model to train")
    p.add_argument(
        "--hidden",
        type=_widths,
        help="hidden widths, comma-separated (default: mlp 128; autoencoder 256,64,16,64,256)",
    )
    p.add_argument("--epochs", type=_positive_int, default=2, help="passes over the training set")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="examples per step")
    p.add_argument(
        "--seed", type=_seed, default=0, help="initial parameters, batch order, sampling"
    )
    p.add_argument(
        "--eval-every", type=_positive_float, default=0.25, help="epochs between evaluations"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPT.KEY=VALUE",
        help="override a hyperparameter of one optimizer, e.g. ngd-fisher.kl_radius=0.01",
    )
    p.add_argument(
        "--devices",
        type=_positive_int,
        help="split each batch over N devices (jit + NamedSharding; on a CPU-only machine, "
        "N emulated host devices)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The `natgrad` argument parser."""
    from natgrad.experiments import lineup

    parser = _Parser(prog=PROG, description="natgrad experiments: optimizers side by side.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    compare = sub.add_parser(
        "compare",
        help="train every optimizer of the lineup, then report",
        formatter_class=_Help,
    )
    _add_common(compare)
    compare.add_argument(
        "--optimizers",
        help=f"comma-separated (default: all: {','.join(lineup.default_lineup())})",
    )
    compare.add_argument("--out", help="output directory (default: results/<dataset>)")
    compare.set_defaults(handler=_compare)

    train = sub.add_parser(
        "train",
        help="train one optimizer with checkpoints",
        formatter_class=_Help,
    )
    train.add_argument("--optimizer", required=True, choices=lineup.default_lineup())
    _add_common(train)
    train.add_argument("--checkpoint-dir", required=True, help="where checkpoint.npz is kept")
    train.add_argument(
        "--checkpoint-every", type=_positive_int, default=100, metavar="STEPS", help="steps"
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--out", help="output directory (default: results/<dataset>-<optimizer>)")
    train.set_defaults(handler=_train)

    from natgrad.experiments import spectrum

    spectrum.add_parser(sub, _add_common)

    show = sub.add_parser("lineup", help="list the optimizers and their default hyperparameters")
    show.set_defaults(handler=_lineup)
    return parser


def _writable_dir(path: str, flag: str) -> str:
    """Create `path` if needed and check that a file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return path


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


def _model(args, dataset):
    from natgrad.experiments import models

    try:
        return models.build(
            args.model, dataset.x_train.shape[1], dataset.num_classes, hidden=args.hidden
        )
    except ValueError as err:
        raise UsageError(f"--hidden: {err}") from None


def _run_config(args):
    from natgrad.experiments.training import RunConfig

    return RunConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        devices=args.devices,
    )


def _use_devices(count: int | None) -> None:
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


def _config_record(command: str, args, dataset, model, hyper: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "dataset": dataset.name,
        "num_train": len(dataset.x_train),
        "num_test": len(dataset.x_test),
        "model": model.name,
        "sizes": list(model.sizes),
        "loss": model.loss.name,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "eval_every": args.eval_every,
        "devices": args.devices,
        "optimizers": hyper,
    }


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(result) -> str:
    m = result.metrics
    accuracy = "" if m["test_accuracy"] is None else f"test acc {100 * m['test_accuracy']:.2f}%, "
    return (
        f"{result.name}: {accuracy}test loss {m['test_loss']:.4f}, "
        f"{m['steps']} steps in {m['train_seconds']:.2f} s (+{m['compile_seconds']:.2f} s compile)"
    )


def _train_all(args, names, overrides, out, **train_kwargs):
    """Resolve, load, build, train every optimizer; returns (config record, results, seconds)."""
    from natgrad.experiments import lineup, training

    hyper = lineup.resolve(names, overrides)
    _use_devices(args.devices)
    _writable_dir(out, "--out")
    if "checkpoint_dir" in train_kwargs:
        _writable_dir(train_kwargs["checkpoint_dir"], "--checkpoint-dir")
    dataset = _load_data(args)
    model = _model(args, dataset)
    optimizers = [lineup.build(name, hyper[name], model) for name in names]
    config = _run_config(args)
    training.steps_per_epoch(len(dataset.x_train), config.batch_size)  # fail before any training
    show_bars = not args.no_progress
    start = time.perf_counter()
    results = {}
    for optimizer in optimizers:
        result = training.train(
            optimizer, model, dataset, config, progress_bar=show_bars, log=_say, **train_kwargs
        )
        results[optimizer.name] = {
            "hyperparameters": result.hyperparameters,
            "metrics": result.metrics,
            "curve": result.curve,
        }
        if not (show_bars and sys.stderr.isatty()):
            _say(_summary(result))
    seconds = time.perf_counter() - start
    record = _config_record(args.command, args, dataset, model, hyper)
    return record, results, seconds, result


def _report(out, record, results, seconds) -> None:
    from natgrad.experiments import report

    model = f"{record['model']} {'-'.join(map(str, record['sizes']))}"
    title = f"{model} on {record['dataset']}, batch {record['batch_size']}"
    paths = report.write_results(out, record, results, total_seconds=seconds, title=title)
    print(report.markdown_table(results))
    print(f"total time: {seconds:.1f} s (training, compilation and evaluation)")
    print(f"results: {paths['results']}  table: {paths['table']}  curves: {paths['curves']}")


def _compare(args) -> int:
    from natgrad.experiments import lineup

    if args.optimizers is None:
        names = lineup.default_lineup()
    else:
        names = lineup.check_names(n.strip() for n in args.optimizers.split(",") if n.strip())
    overrides = [lineup.parse_override(text) for text in args.set]
    out = args.out or os.path.join("results", args.dataset)
    record, results, seconds, _ = _train_all(args, names, overrides, out)
    _report(out, record, results, seconds)
    return 0


def _train(args) -> int:
    from natgrad.experiments import checkpoint, lineup

    overrides = [lineup.parse_override(text) for text in args.set]
    out = args.out or os.path.join("results", f"{args.dataset}-{args.optimizer}")
    record, results, seconds, result = _train_all(
        args,
        [args.optimizer],
        overrides,
        out,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    params_path = os.path.join(out, "params.npz")
    checkpoint.save(params_path, result.state.params, {"optimizer": args.optimizer})
    _report(out, record, results, seconds)
    print(f"final parameters: {params_path}")
    return 0


def _lineup(args) -> int:
    from natgrad.experiments import lineup

    for name, entry in lineup.registry().items():
        hyper = json.dumps(entry.defaults(), default=repr)
        print(f"{name:14} {entry.summary}\n{'':14} {hyper}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `natgrad` command with `argv` (default: sys.argv[1:]); returns the exit status."""
    from natgrad.experiments.checkpoint import CheckpointError
    from natgrad.experiments.data import DataError
    from natgrad.experiments.lineup import LineupError
    from natgrad.experiments.training import RunError

    # JAX's CPU LAPACK calls (K-FAC's factor inverses) go through OpenBLAS, whose own threads
    # fight XLA's for the cores: a 785 × 785 inverse inside a training step measured 200 ms
    # with OpenBLAS threading, 27 ms without (2 cores). Read when OpenBLAS first loads, which
    # is at the first LAPACK call, so setting it here is in time. A user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as err:
        print(err, file=sys.stderr)
    except (LineupError, RunError, CheckpointError, DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
