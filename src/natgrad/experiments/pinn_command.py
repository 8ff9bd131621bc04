"""``natgrad pinn``: optimisers on a physics-informed network, one wall-clock budget each.

    natgrad pinn [--problem poisson2d] [--budget 120] [--optimizers engd-dense,ngd-cg,...]
                 [--hidden 32,32] [--interior N] [--boundary N] [--seed 0]
                 [--max-steps N] [--out results/pinn-<problem>]

Runs the optimisers one after another in float64 (see ``natgrad.experiments.pinn_run``) and writes
results.json (configuration, machine, every curve), table.md (final relative L² error and time
to 1e-3 … 1e-7 per optimiser) and curves.png (error vs steps and vs seconds) to --out.
Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from natgrad.experiments import options
from natgrad.experiments.options import UsageError

__all__ = ["HELP", "add_arguments", "build_parser", "main", "markdown_table", "plot_curves", "run"]


HELP = "PINN (2D/5D Poisson): exact-solve energy natural gradient vs baselines"
# The names of pinn.PROBLEMS and pinn_run.OPTIMIZERS, spelled out so that building the
# parser (natgrad --help) imports no JAX; tests/test_pinn.py checks that they agree.
PROBLEMS = ("poisson2d", "poisson5d")
OPTIMIZERS = ("engd-dense", "ngd-dense", "ngd-cg", "hessian-free", "adam", "lbfgs", "gd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `natgrad pinn`."""
    p.add_argument("--problem", choices=PROBLEMS, default="poisson2d")
    p.add_argument(
        "--budget",
        type=options.positive_float,
        default=120.0,
        help="seconds of stepping per optimiser",
    )
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma-separated names; adam and gd expand to a learning-rate grid",
    )
    p.add_argument("--adam-lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--gd-lrs", default="1e-4,1e-3")
    p.add_argument("--hidden", type=options.widths, default=(32, 32), help="hidden widths")
    p.add_argument(
        "--interior",
        type=options.positive_int,
        default=None,
        help="interior collocation points (default: the problem's, 900 in 2D)",
    )
    p.add_argument(
        "--boundary",
        type=options.positive_int,
        default=None,
        help="boundary collocation points (default: the problem's, 120 in 2D)",
    )
    p.add_argument("--seed", type=options.seed, default=0)
    p.add_argument("--max-steps", type=options.positive_int, default=1_000_000)
    p.add_argument("--out", default=None, help="output directory (default: results/pinn-<problem>)")


def build_parser(prog: str = "natgrad pinn") -> argparse.ArgumentParser:
    """A stand-alone parser for `main` (the natgrad command builds its own)."""
    p = options.Parser(prog=prog, description=HELP, formatter_class=options.HelpFormatter)
    add_arguments(p)
    return p


def _rates(text: str, flag: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise UsageError(f"{flag}: expected positive learning rates, got {text!r}")
    return rates


def _fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per optimiser: steps, final and best relative L² error, seconds to each threshold."""
    from natgrad.experiments.pinn_run import THRESHOLDS

    head = ["optimizer", "steps", "final rel. L2", "best rel. L2"]
    head += [f"s to {t:g}" for t in THRESHOLDS] + ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        times = [_fmt_seconds(r["time_to_seconds"][f"{t:g}"]) for t in THRESHOLDS]
        row = [name, str(r["steps"]), f"{r['final_rel_l2']:.2e}", f"{r['best_rel_l2']:.2e}"]
        lines.append("| " + " | ".join(row + times + [r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> None:
    """Relative L² error against steps (left) and seconds (right), log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results.items():
        pts = [c for c in r["curve"] if math.isfinite(c["rel_l2"])]
        style = "-" if name.startswith(("engd", "ngd", "hessian")) else "--"
        axes[0].plot(
            [max(c["step"], 1) for c in pts], [c["rel_l2"] for c in pts], style, label=name
        )
        axes[1].plot(
            [max(c["seconds"], 1e-2) for c in pts], [c["rel_l2"] for c in pts], style, label=name
        )
    for ax, xlabel in zip(axes, ("steps", "seconds (stepping only)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative L2 error")
        ax.grid(True, which="major", alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """`natgrad pinn` on its own: parse `argv`, `run`; a user error is one line, exit 2."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help
            return exit_.code if isinstance(exit_.code, int) else 0
        return run(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Run every optimiser; write results.json / table.md / curves.png to --out."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the natgrad command: XLA owns the cores
    adam_lrs = _rates(args.adam_lrs, "--adam-lrs")
    gd_lrs = _rates(args.gd_lrs, "--gd-lrs")
    out = args.out or os.path.join("results", f"pinn-{args.problem}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create directory {out!r} ({e.strerror})") from None
    import jax

    jax.config.update("jax_enable_x64", True)  # the run is float64; natgrad's import is not
    from natgrad.experiments import pinn, pinn_run, report
    from natgrad.experiments.session import say

    try:
        names = pinn_run.optimizer_names(
            [n for n in args.optimizers.split(",") if n], adam_lrs, gd_lrs
        )
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    work = pinn.make_workload(
        args.problem,
        hidden=args.hidden,
        interior=args.interior,
        boundary=args.boundary,
        seed=args.seed,
    )
    n = sum(x.size for x in jax.tree.leaves(work.params))
    rows = work.batch[1].shape[0]
    say(f"{args.problem}: {n} parameters, {rows} residuals, budget {args.budget:g} s each")
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for name in names:
        say(f"{name}:")
        stepper = pinn_run.make_stepper(name, work)
        results[name] = pinn_run.run(
            stepper, work, budget_seconds=args.budget, max_steps=args.max_steps, log=say
        )
    config = {
        "command": "pinn",
        "problem": args.problem,
        "hidden": list(args.hidden),
        "parameters": n,
        "residuals": rows,
        "interior": args.interior,
        "boundary": args.boundary,
        "budget_seconds": args.budget,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "optimizers": names,
    }
    title = f"{args.problem}, tanh {'-'.join(map(str, (work.problem.dim, *args.hidden, 1)))}"
    seconds = time.perf_counter() - start
    files = dict(total_seconds=seconds, title=title, table=markdown_table, plot=plot_curves)
    report.write_results(out, config, results, **files)
    print(markdown_table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
