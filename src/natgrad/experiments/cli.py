"""The `natgrad` command: one module per subcommand, chosen by name.

    natgrad compare    train every optimizer of the lineup, then report    (compare.py)
    natgrad train      train one optimizer, with checkpoints if asked       (train.py)
    natgrad spectrum   curvature spectrum before and after training        (spectrum.py)
    natgrad lineup     the optimizers and every default hyperparameter     (lineup.py)
    natgrad pinn       PINN: exact-solve natural gradient vs baselines     (pinn_command.py)
    natgrad --version

Each command module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit status``.
Only the chosen command's options are built (they read the lineup, the datasets, ...), so
``natgrad --help`` and ``--version`` import no JAX. Every training command takes ``--devices N``:
each batch is split over N devices (jit + NamedSharding).

User errors (an unknown name, a bad path, unreadable data, a checkpoint of another run) print one
line to stderr and exit with status 2, never a traceback.

Compiled steps are kept across runs in JAX's persistent compilation cache (`compilation_cache`):
``$NATGRAD_CACHE_DIR``, by default ``$XDG_CACHE_HOME/natgrad/jax`` (``~/.cache/natgrad/jax``),
so a second run of the same command loads its steps instead of compiling them.
``NATGRAD_CACHE_DIR=off`` or ``natgrad --no-compile-cache ...`` turns it off. Only this entry
point sets it: ``import natgrad`` leaves JAX's configuration alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import natgrad
from natgrad.experiments import compare, lineup, options, pinn_command, spectrum, train
from natgrad.experiments.options import UsageError

__all__ = ["main", "build_parser", "cache_dir", "compilation_cache", "COMMANDS", "PROG"]

PROG = "natgrad"
COMMANDS = {
    "compare": compare,
    "train": train,
    "spectrum": spectrum,
    "lineup": lineup,
    "pinn": pinn_command,
}


def build_parser(command: str | None = None) -> options.Parser:
    """The `natgrad` parser with the options of `command` (None: of every command)."""
    parser = options.Parser(prog=PROG, description="natgrad experiments: optimizers side by side.")
    parser.add_argument("--version", action="version", version=f"{PROG} {natgrad.__version__}")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="compile every step afresh (default: reuse compiled steps from $NATGRAD_CACHE_DIR, "
        "~/.cache/natgrad/jax)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=options.Parser)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, formatter_class=options.HelpFormatter)
        if command is None or command == name:
            module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


# Steps compiling for less than this are not worth a disk round trip (JAX's default is 1 s, which
# would miss the small models' steps, ~0.3-1 s each on 2 CPU cores).
MIN_COMPILE_SECONDS = 0.2


def cache_dir() -> str | None:
    """``$NATGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/natgrad/jax`` or ``~/.cache/natgrad/jax``;
    None when that is "off", "0" or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.environ.get("NATGRAD_CACHE_DIR", os.path.join(base, "natgrad", "jax"))
    return None if directory.strip().lower() in ("", "off", "0") else directory


def compilation_cache(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache in `directory` (None: leave it off). Programs
    that take at least `MIN_COMPILE_SECONDS` to compile are written there and read back by later
    processes (the key covers the program, the devices, the flags and the jax version). Sets
    global JAX configuration: entry points only."""
    if directory is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors of a run that cannot go as asked: one line, exit 2 (read after one arose)."""
    from natgrad.experiments.checkpoint import CheckpointError
    from natgrad.experiments.data import DataError
    from natgrad.experiments.lineup import LineupError
    from natgrad.experiments.training import RunError

    return CheckpointError, DataError, LineupError, RunError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `natgrad` command with `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # JAX's CPU LAPACK calls (K-FAC's factor inverses) go through OpenBLAS, whose own threads
    # fight XLA's for the cores: a 785 × 785 inverse inside a training step measured 200 ms
    # with OpenBLAS threading, 27 ms without (2 cores). Read when OpenBLAS first loads, which
    # is at the first LAPACK call, so setting it here is in time. A user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = build_parser(command).parse_args(argv)
        compilation_cache(None if args.no_compile_cache else cache_dir())
        return args.handler(args)
    except UsageError as err:
        print(err, file=sys.stderr)
    except ValueError as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
