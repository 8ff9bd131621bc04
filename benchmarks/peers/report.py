"""The lineup's report: per workload a table, curves and a verdict; the batch-scaling plot.

``write(json_path)`` writes ``REPORT-peers[-quick].md`` and PNGs beside the JSON. The verdict
of a workload takes its highest target reached (median over seeds) by any optimiser and names
the fastest in wall time and in steps, the best peer and the best natgrad optimiser, and the
ratio natgrad ÷ best peer (< 1: natgrad is faster).
"""

from __future__ import annotations

import json
import os

__all__ = ["write", "verdict"]


def _fmt(cell: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not cell or cell["median"] is None:
        return "—"
    lo, hi = cell["spread"]
    text = f"{cell['median'] * scale:.{digits}f}"
    return text if lo == hi else f"{text} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def _best(rows: dict, field: str, natgrad: bool | None):
    """(keys, value) of the smallest median `field` among ok rows (natgrad only / peers only);
    tied keys joined by " = "."""
    pick = [
        (r["summary"][field]["median"], key)
        for key, r in rows.items()
        if r["status"] == "ok"
        and r["summary"][field]["median"] is not None
        and (natgrad is None or key.startswith("natgrad") == natgrad)
    ]
    if not pick:
        return None, None
    value = min(pick)[0]
    return " = ".join(k for v, k in pick if v == value), value


def verdict(name: str, wl: dict) -> str:
    rows, unit = wl["optimizers"], {"seconds": "s", "steps": "steps"}
    label = {"seconds": "wall time", "steps": "steps"}
    for t in reversed(wl["targets"]):
        if _best(rows, f"seconds_to_target:{t}", None)[0] is not None:
            break
    else:
        return f"**{name}**: no optimiser reached {wl['targets'][0]} within the budget."
    steps = "steps are read at evaluations 1.25× apart, so close step counts are ties"
    parts = [f"**{name}** (target {t}):"]
    for kind in ("seconds", "steps"):
        field = f"{kind}_to_target:{t}"
        win, wv = _best(rows, field, None)
        peer, pv = _best(rows, field, False)
        ours, ov = _best(rows, field, True)
        text = f"In {label[kind]} {win} {'tie' if ' = ' in win else 'wins'} ({wv:.4g} {unit[kind]})"
        if ours is None:
            text += f"; best peer {peer}; no natgrad optimiser reaches {t}"
        elif peer is None:
            text += f"; best natgrad {ours}; no peer reaches {t}"
        else:
            ahead = "tie" if ov == pv else ("natgrad" if ov < pv else peer) + " ahead"
            text += (
                f"; best peer {peer} {pv:.4g}, best natgrad {ours} {ov:.4g}: natgrad ÷ peer "
                f"= {ov / pv:.2f}× ({ahead})"
            )
        parts.append(text + ".")
    return " ".join(parts) + f" ({steps})."


def _table(wl: dict) -> list[str]:
    t1, t2 = wl["targets"][0], wl["targets"][-1]
    head = (
        f"| optimiser | status | chosen | s to {t1} | steps to {t1} | s to {t2} | steps to {t2} "
        "| final | ms/step | compile s | diverged |"
    )
    lines = [head, "|" + "---|" * 11]
    for key, r in wl["optimizers"].items():
        s, runs = r.get("summary", {}), r.get("runs", [])
        if r["status"] != "ok":
            lines.append(f"| {key} | {r['status']} |" + " |" * 9)
            continue
        final = "—" if s["final_metric"] is None else f"{s['final_metric']:.4g}"
        ms = "—" if not s["step_seconds"] else f"{1e3 * s['step_seconds']:.1f}"
        comp = max(run["compile_seconds"] for run in runs)
        div = sum(run["diverged"] for run in runs)
        chosen = ", ".join(f"{k}={v:g}" for k, v in r["chosen"].items())
        lines.append(
            f"| {key} | ok | {chosen} | {_fmt(s[f'seconds_to_target:{t1}'])} | "
            f"{_fmt(s[f'steps_to_target:{t1}'], digits=0)} | {_fmt(s[f'seconds_to_target:{t2}'])}"
            f" | {_fmt(s[f'steps_to_target:{t2}'], digits=0)} | {final} | {ms} | {comp:.1f} | "
            f"{div}/{len(runs)} |"
        )
    return lines


def _plots(result: dict, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, wl in result["workloads"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, r in wl["optimizers"].items():
            if r["status"] == "ok" and r["runs"]:
                c = r["runs"][0]["curve"]
                style = "-" if key.startswith("natgrad") else "--"
                axes[0].plot(c["seconds"], c["metric"], style, label=key)
                axes[1].plot(c["step"], c["metric"], style, label=key)
        for ax, xlabel in zip(axes, ("training seconds", "steps"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(wl["metric"])
            ax.set_xscale("symlog")
            for t in wl["targets"]:
                ax.axhline(t, color="grey", lw=0.5)
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{name} (seed 0, chosen grid point)")
        written.append(f"{stem}-{name}.png")
        fig.savefig(written[-1], dpi=90, bbox_inches="tight")
        plt.close(fig)
    bs = result.get("batch_scaling")
    if bs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in bs["optimizers"].items():
            xy = [(p["batch_size"], p["steps_to_target"]) for p in points if p["steps_to_target"]]
            if xy:
                ax.plot(*zip(*xy, strict=True), "o-", label=key)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target")
        ax.set_title(f"seed MLP: steps to {bs['target']} test accuracy")
        ax.legend(fontsize=8)
        written.append(f"{stem}-batch-scaling.png")
        fig.savefig(written[-1], dpi=90, bbox_inches="tight")
        plt.close(fig)
    return written


def write(json_path: str) -> list[str]:
    """REPORT-peers[-quick].md and the PNGs beside `json_path`; the paths written."""
    with open(json_path) as f:
        result = json.load(f)
    out = os.path.dirname(json_path) or "."
    stem = os.path.join(out, os.path.basename(json_path)[: -len(".json")])
    pngs = _plots(result, stem)
    lines = [
        f"# natgrad against the 2026 lineup ({result['mode']} mode)",
        "",
        "Protocol: docs/benchmarks.md. Cells: median over seeds [min, max]; — = not reached.",
        f"Whole run: {result['total_seconds']:.0f} s.",
        "",
    ]
    for name, wl in result["workloads"].items():
        lines += [f"## {name} (batch {wl['batch_size']}, {wl['metric']})", ""]
        lines += ([f"Note: {wl['note']}.", ""] if wl["note"] else []) + _table(wl)
        lines += ["", verdict(name, wl), "", f"![{name}]({os.path.basename(stem)}-{name}.png)", ""]
    bs = result.get("batch_scaling")
    if bs:
        lines += [f"## Batch-size scaling (seed MLP, steps to {bs['target']}; — = not reached)", ""]
        lines += ["| optimiser | " + " | ".join(str(b) for b in bs["batch_sizes"]) + " |"]
        lines += ["|---|" + "---|" * len(bs["batch_sizes"])]
        for key, points in bs["optimizers"].items():
            cells = [str(p["steps_to_target"] or "—") for p in points]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines += ["", f"![scaling]({os.path.basename(stem)}-batch-scaling.png)", ""]
    report = os.path.join(out, f"REPORT-{os.path.basename(stem)}.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    return [report, *pngs]
