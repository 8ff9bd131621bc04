r"""Why measure steps in KL: the two figures of the README.

    python examples/why_kl.py [--out docs/figures/]

(a) ``two_gaussians.png``: two pairs of 1-D Gaussians, each pair one unit apart in the Euclidean
    distance of their parameters (μ, σ), yet with KL 50 (σ = 0.1) and 0.005 (σ = 10):
    KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) = log(σ₂/σ₁) + (σ₁² + (μ₁ − μ₂)²)/(2σ₂²) − ½.
    A parameter distance says nothing about how much the distribution changed.

(b) ``proximal_paths.png``: fit a Gaussian's θ = (μ, s = log σ) to data by maximum likelihood.
    With n samples of mean m and (biased) variance v, the mean negative log-likelihood is
        L(θ) = s + (v + (m − μ)²) / (2e^{2s}) + ½ log 2π,
        ∇L  = (−(m − μ)/σ²,  1 − (v + (m − μ)²)/σ²),
    minimised by the MLE μ* = m, σ* = √v. Both methods are proximal steps:
      * gradient descent:  θ⁺ = argmin_d ∇Lᵀd + ‖d‖²/(2η)       →  d = −η ∇L;
      * natural gradient:  θ⁺ = argmin_d ∇Lᵀd + KL(p_θ ‖ p_{θ+d})/η, with the KL to second order
        ½dᵀF(θ)d and the Fisher of the family in (μ, log σ) F = diag(1/σ², 2)
                                                               →  d = −η F⁻¹∇L.
    In these coordinates the natural step is (η(m − μ), η(v_μ/σ² − 1)/2) with v_μ = v + (m − μ)²:
    with η = 1 it lands on μ = m at once, and s converges quadratically, whatever σ is, while
    gradient descent's steps scale with 1/σ² and its stable step size is set by the sharpest
    curvature it meets. Each method runs from every start with its best stable step size from
    `STEP_SIZES` (the fewest iterations to ‖∇L‖ ≤ `TOL`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

METHODS = ("gd", "ngd")
STEP_SIZES = tuple(2.0**-k for k in range(13))  # 1, 1/2, ..., 1/4096: the tuning grid
TOL = 1e-8  # convergence: ‖∇L‖₂ ≤ TOL
MAX_ITERATIONS = 20_000
STARTS = ((-4.0, 3.0), (6.0, 2.5), (-3.0, 8.0), (5.0, 6.0), (1.0, 0.7), (7.0, 4.0))  # (μ, σ)
_BOUND = 30.0  # |log σ| or |μ| beyond this is divergence, not progress


class FitResult(NamedTuple):
    path: np.ndarray  # (iterations + 1, 2): the iterates (μ, log σ)
    iterations: int  # steps taken until ‖∇L‖ ≤ tol (or until it stopped)
    converged: bool
    step_size: float


def sample_data(seed: int = 0, size: int = 200) -> np.ndarray:
    """The data of figure (b): `size` draws of N(1, 2²)."""
    return np.random.default_rng(seed).normal(1.0, 2.0, size)


def gaussian_kl(mu_p: float, sigma_p: float, mu_q: float, sigma_q: float) -> float:
    """KL(N(μ_p, σ_p²) ‖ N(μ_q, σ_q²))."""
    return math.log(sigma_q / sigma_p) + (sigma_p**2 + (mu_p - mu_q) ** 2) / (2 * sigma_q**2) - 0.5


def _statistics(data) -> tuple[float, float]:
    data = np.asarray(data, dtype=float).ravel()
    if data.size < 2 or not np.all(np.isfinite(data)) or data.var() == 0:
        raise ValueError("data: expected at least two finite, not all equal, numbers")
    return float(data.mean()), float(data.var())


def nll(theta, data) -> float:
    """L(μ, s): the mean negative log-likelihood of `data` under N(μ, e^{2s})."""
    m, v = _statistics(data)
    mu, s = theta
    return s + (v + (m - mu) ** 2) / (2 * math.exp(2 * s)) + 0.5 * math.log(2 * math.pi)


def gradient(theta, m: float, v: float) -> tuple[float, float]:
    """∇L at θ = (μ, s) from the data's mean m and variance v."""
    mu, s = theta
    precision = math.exp(-2 * s)
    return -(m - mu) * precision, 1.0 - (v + (m - mu) ** 2) * precision


def fisher(theta) -> np.ndarray:
    """F(μ, s) = diag(1/σ², 2): the Fisher of N(μ, σ²) in the coordinates (μ, log σ)."""
    return np.diag([math.exp(-2 * theta[1]), 2.0])


def fit(
    method: str,
    start,
    data,
    step_size: float,
    *,
    tol: float = TOL,
    max_iterations: int = MAX_ITERATIONS,
) -> FitResult:
    """Fit (μ, log σ) from `start` = (μ₀, σ₀) by `method` ("gd" or "ngd") at a fixed step size."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not (isinstance(step_size, int | float) and step_size > 0):
        raise ValueError(f"step_size: expected a number > 0, got {step_size!r}")
    if len(start) != 2 or not start[1] > 0:
        raise ValueError(f"start: expected (μ, σ) with σ > 0, got {start!r}")
    m, v = _statistics(data)
    theta = (float(start[0]), math.log(start[1]))
    path = [theta]
    for k in range(max_iterations):
        g_mu, g_s = gradient(theta, m, v)
        if math.hypot(g_mu, g_s) <= tol:
            return FitResult(np.array(path), k, True, step_size)
        if method == "gd":  # d = −η ∇L
            d = (-step_size * g_mu, -step_size * g_s)
        else:  # d = −η F⁻¹ ∇L, F⁻¹ = diag(σ², ½)
            d = (-step_size * math.exp(2 * theta[1]) * g_mu, -step_size * g_s / 2)
        theta = (theta[0] + d[0], theta[1] + d[1])
        path.append(theta)
        if not (abs(theta[0]) < _BOUND and abs(theta[1]) < _BOUND):
            break
    return FitResult(np.array(path), len(path) - 1, False, step_size)


def tune(method: str, start, data, step_sizes: Sequence[float] = STEP_SIZES) -> FitResult:
    """The converged fit with the fewest iterations over `step_sizes`."""
    fits = [fit(method, start, data, eta) for eta in step_sizes]
    converged = [f for f in fits if f.converged]
    if not converged:
        raise ValueError(f"step_sizes: {method} converges from {start} with none of {step_sizes}")
    return min(converged, key=lambda f: (f.iterations, -f.step_size))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def two_gaussians_figure(path: str) -> list[float]:
    """Figure (a) to `path`; returns the two KL values."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    kls = []
    for ax, sigma in zip(axes, (0.1, 10.0), strict=True):
        kl = gaussian_kl(0.0, sigma, 1.0, sigma)
        kls.append(kl)
        x = np.linspace(-0.5 - 4 * sigma, 1.5 + 4 * sigma, 800)
        for mu, color in ((0.0, "tab:blue"), (1.0, "tab:orange")):
            pdf = np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            ax.plot(x, pdf, color=color, label=f"N({mu:g}, {sigma:g}²)")
            ax.fill_between(x, pdf, color=color, alpha=0.15)
        ax.set_title(f"σ = {sigma:g}: ‖Δ(μ, σ)‖ = 1,  KL = {kl:.3g}", fontsize=10)
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Same parameter distance, very different distributions", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return kls


def proximal_figure(path: str, data, starts=STARTS) -> dict[str, list[FitResult]]:
    """Figure (b) to `path`: tuned GD and NGD paths over the loss contours, and iterations."""
    plt = _pyplot()
    fits = {method: [tune(method, start, data) for start in starts] for method in METHODS}
    m, v = _statistics(data)
    mus = np.linspace(-5.5, 8.5, 240)
    logs = np.linspace(-0.7, 3.3, 200)
    grid_mu, grid_s = np.meshgrid(mus, logs)
    loss = grid_s + (v + (m - grid_mu) ** 2) / (2 * np.exp(2 * grid_s))

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4.4), width_ratios=(1.6, 1))
    levels = np.quantile(loss, np.linspace(0.002, 0.9, 14))
    ax.contour(grid_mu, grid_s, loss, levels=levels, colors="0.75", linewidths=0.7)
    styles = {"gd": ("tab:red", "--", "gradient descent"), "ngd": ("tab:blue", "-", "natural")}
    for method, results in fits.items():
        color, ls, label = styles[method]
        for i, result in enumerate(results):
            ax.plot(*result.path.T, ls=ls, color=color, lw=1.2, marker=".", ms=2.5,
                    label=label if i == 0 else None)  # fmt: skip
    delta, t = 0.02, np.linspace(0, 2 * np.pi, 100)
    for i, (mu, sigma) in enumerate(starts):
        ax.plot(mu, math.log(sigma), "ko", ms=4)
        # the sets each proximal term allows at a start: ½‖d‖² = δ and ½dᵀF(θ)d = δ
        r = math.sqrt(2 * delta)
        ball = (mu + r * np.cos(t), math.log(sigma) + r * np.sin(t))
        kl_ball = (mu + r * sigma * np.cos(t), math.log(sigma) + r / math.sqrt(2) * np.sin(t))
        ax.plot(*ball, color="tab:red", lw=0.7, label="½‖d‖² = δ" if i == 0 else None)
        ax.plot(*kl_ball, color="tab:blue", lw=0.7, label="½dᵀFd = δ (KL)" if i == 0 else None)
    ax.plot(m, 0.5 * math.log(v), "k*", ms=11, label="MLE")
    ax.set(xlim=(mus[0], mus[-1]), ylim=(logs[0], logs[-1]), ylabel="log σ")
    ax.set_xlabel("μ   (axes not to scale)")
    ax.set_title("Fitting N(μ, σ²): paths over the loss contours", fontsize=10)
    ax.legend(fontsize=8, loc="lower right", ncol=2)

    index = np.arange(len(starts))
    for offset, method in ((-0.2, "gd"), (0.2, "ngd")):
        color, _, label = styles[method]
        counts = [r.iterations for r in fits[method]]
        bars.bar(index + offset, counts, width=0.4, color=color, label=label)
    bars.set_xticks(index, [f"({s[0]:g}, {s[1]:g})" for s in starts], rotation=30, fontsize=8)
    most = max(r.iterations for results in fits.values() for r in results)
    bars.set(yscale="log", ylim=(1, 8 * most), xlabel="start (μ₀, σ₀)")
    bars.set_ylabel(f"iterations to ‖∇L‖ ≤ {TOL:g}")
    bars.set_title("each with its best step size from 1, ½, …, 1/4096", fontsize=10)
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fits


def main(argv: Sequence[str] | None = None) -> dict[str, list[FitResult]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("docs", "figures"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data of figure (b)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    kls = two_gaussians_figure(os.path.join(args.out, "two_gaussians.png"))
    print(f"two Gaussians one unit apart: KL {kls[0]:.4g} (σ = 0.1) vs {kls[1]:.4g} (σ = 10)")
    data = sample_data(args.seed)
    fits = proximal_figure(os.path.join(args.out, "proximal_paths.png"), data)
    print(f"MLE μ = {data.mean():.4f}, σ = {data.std():.4f}; iterations (step size):")
    for i, start in enumerate(STARTS):
        gd, ngd = fits["gd"][i], fits["ngd"][i]
        print(
            f"  start (μ, σ) = {start}: gradient descent {gd.iterations} ({gd.step_size:g}), "
            f"natural gradient {ngd.iterations} ({ngd.step_size:g})"
        )
    print(f"figures: {args.out}")
    return fits


if __name__ == "__main__":
    main()
