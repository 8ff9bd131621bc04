"""Results of a comparison: results.json, table.md and curves.png.

results.json holds the configuration (every hyperparameter of every optimizer), the machine, and
per optimizer its metrics and curve. Fields that measure time end in ``_seconds``
(`TIMING_SUFFIX`); everything else is a deterministic function of the configuration, so two runs
with the same seed give the same file once `strip_timings` has removed them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from natgrad.experiments.checkpoint import write_atomic

__all__ = [
    "TIMING_SUFFIX",
    "machine_info",
    "markdown_table",
    "plot_curves",
    "result_files",
    "strip_timings",
    "write_results",
    "write_text",
]

TIMING_SUFFIX = "_seconds"
COLUMNS = (
    "optimizer",
    "test acc %",
    "test loss",
    "train loss",
    "train time s",
    "compile s",
    "steps",
    "mean CG iters",
)


def machine_info() -> dict[str, Any]:
    """Where the run happened: platform, CPUs, versions, JAX devices."""
    import optax

    import natgrad

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "numpy": np.__version__,
        "optax": optax.__version__,
        "natgrad": natgrad.__version__,
    }


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per optimizer: `results[name]["metrics"]` formatted as a markdown table."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    for name, result in results.items():
        m = result["metrics"]
        accuracy = None if m["test_accuracy"] is None else 100 * m["test_accuracy"]
        cells = [
            name,
            _fmt(accuracy, ".2f"),
            _fmt(m["test_loss"], ".4f"),
            _fmt(m["train_loss"], ".4f"),
            _fmt(m["train_seconds"], ".2f"),
            _fmt(m["compile_seconds"], ".2f"),
            _fmt(m["steps"], "d"),
            _fmt(m["mean_cg_iterations"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> None:
    """curves.png: test accuracy (or loss) vs training time and vs epoch; train loss vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: r["curve"] for name, r in results.items()}
    classifier = all(p["test_accuracy"] is not None for c in curves.values() for p in c)
    key, label = ("test_accuracy", "test accuracy %") if classifier else ("test_loss", "test loss")
    scale = 100.0 if classifier else 1.0

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8), constrained_layout=True)
    panels = [
        (axes[0], "time_seconds", "training time (s, excluding compile and eval)", key, label),
        (axes[1], "epoch", "epoch", key, label),
        (axes[2], "epoch", "epoch", "train_loss", "train loss (full training set)"),
    ]
    for ax, xkey, xlabel, ykey, ylabel in panels:
        for name, curve in curves.items():
            xs = [p[xkey] for p in curve]
            ys = [p[ykey] * (scale if ykey == key else 1.0) for p in curve]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if classifier:
        # Zoom on the interesting range: from the worst final accuracy minus a margin.
        finals = [c[-1][key] * scale for c in curves.values() if math.isfinite(c[-1][key])]
        if finals:
            for ax in axes[:2]:
                ax.set_ylim(max(0.0, min(finals) - 10.0), min(100.0, max(finals) + 2.0))
    else:
        for ax in axes[:2]:
            ax.set_yscale("log")
    axes[2].set_yscale("log")
    _plot_step_kl(axes[3], curves)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_step_kl(ax, curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Measured output KL of the step before each evaluation (solid) and ½dᵀFd (dashed)."""
    for i, (name, curve) in enumerate(curves.items()):
        color = f"C{i}"
        for key, style in (("step_kl", "-"), ("step_kl_predicted", "--")):
            points = [(p["epoch"], p.get(key)) for p in curve]
            points = [(x, y) for x, y in points if y is not None and y > 0]
            if points:
                xs, ys = zip(*points, strict=True)
                label = name if style == "-" else None
                ax.plot(xs, ys, style, color=color, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("step KL: measured (solid), ½ dᵀF d (dashed)")
    ax.grid(alpha=0.3)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


def result_files(
    config: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
    *,
    total_seconds: float | None = None,
    title: str = "",
    table: Callable[[Mapping], str] = markdown_table,
    plot: Callable[[Mapping, str, str], None] = plot_curves,
) -> dict[str, tuple[str, Callable[[str], None]]]:
    """``{"results" | "table" | "curves": (file name, write(path))}``: results.json, table.md
    (`table` of the results) and curves.png (`plot`), each written by its own function (so one
    failing spares the others)."""
    document = {
        "config": config,
        "machine": machine_info(),
        "results": results,
        "total_seconds": total_seconds,
    }
    text = json.dumps(document, indent=2, default=_json_default) + "\n"
    markdown = table(results)
    return {
        "results": ("results.json", lambda path: write_text(path, text)),
        "table": ("table.md", lambda path: write_text(path, markdown)),
        "curves": ("curves.png", lambda path: plot(results, path, title)),
    }


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_results(out_dir: str, config, results, **options) -> dict:
    """Write results.json, table.md and curves.png to `out_dir` (`options` as `result_files`);
    returns their paths."""
    paths = {}
    for kind, (name, write) in result_files(config, results, **options).items():
        paths[kind] = os.path.join(out_dir, name)
        write(paths[kind])
    return paths


def strip_timings(document: Any) -> Any:
    """`document` without the fields that measure time (keys ending in ``_seconds``)."""
    if isinstance(document, Mapping):
        return {k: strip_timings(v) for k, v in document.items() if not k.endswith(TIMING_SUFFIX)}
    if isinstance(document, Sequence) and not isinstance(document, str):
        return [strip_timings(v) for v in document]
    return document


def load_results(path: str) -> dict[str, Any]:
    """A results.json as written by `write_results`."""
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read())
