"""The command line's building blocks: one-line errors, checked numbers, the shared options.

Importing this module imports neither JAX nor natgrad's optimizers: `natgrad --help` and
`natgrad --version` stay fast. The choices of the shared options (datasets, models) are read
when a command's parser is built, i.e. only for the command that runs.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "UsageError",
    "Parser",
    "HelpFormatter",
    "number",
    "positive_int",
    "seed",
    "positive_float",
    "widths",
    "add_common",
]


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) raised as UsageError."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        trivial = action.default in (None, [], argparse.SUPPRESS) or action.default is False
        if not trivial and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def number(kind: type, ok, expected: str):
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


positive_int = number(int, lambda v: v >= 1, "a positive integer")
seed = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: 0 < v < math.inf, "a number > 0")


def widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 128 or 256,64, got {text!r}"
        ) from None


def add_common(p: argparse.ArgumentParser) -> None:
    """The data, model and run options every training command takes."""
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
        type=widths,
        help="hidden widths, comma-separated (default: mlp 128; autoencoder 256,64,16,64,256)",
    )
    p.add_argument("--epochs", type=positive_int, default=2, help="passes over the training set")
    p.add_argument(
        "--steps",
        type=positive_int,
        help="train this many steps instead of --epochs epochs (the batch order goes on "
        "epoch after epoch)",
    )
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per step")
    p.add_argument("--seed", type=seed, default=0, help="initial parameters, batch order, sampling")
    p.add_argument(
        "--eval-every", type=positive_float, default=0.25, help="epochs between evaluations"
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
        type=positive_int,
        help="split each batch over N devices (jit + NamedSharding; on a CPU-only machine, "
        "N emulated host devices)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
