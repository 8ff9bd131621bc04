r"""Physics-informed networks: Poisson problems as a residual vector for natgrad.

Problem (Müller & Zeinhofer, ICML 2023): find u on Ω = [0, 1]^d with

    −Δu = f in Ω,   u = g on ∂Ω,

approximated by a tanh MLP u_θ. With N_Ω interior and N_∂ boundary collocation points the loss is

    L(θ) = 1/(2N_Ω) Σ_i (Δu_θ(x_i) + f(x_i))² + 1/(2N_∂) Σ_j (u_θ(x_j) − g(x_j))².

natgrad sees it as ``squared_error()`` (½ r² per example, mean over the B = N_Ω + N_∂ points) on
the residual vector r returned by ``residual_fn(params, inputs)``, with zero targets: the weight
w = √(B/N_Ω) (interior) or √(B/N_∂) (boundary) inside r makes the two losses equal. For a linear
PDE the Gauss-Newton matrix of this loss, JᵀJ/B with J = ∂r/∂θ, is the energy natural gradient's
Gramian, so ``natgrad.natural_gradient(residual_fn, squared_error(), curvature="ggn", ...)`` is
ENGD.

The Laplacian is forward-over-reverse: Δu(x) = Σ_k e_kᵀ ∇²u(x) e_k, each term one jvp of ∇u.

Problems (``PROBLEMS``):
* ``poisson2d``: u* = sin(πx)·sin(πy), f = 2π² u*, g = 0; 900 interior points on a 30×30 grid and
  120 on the boundary (30 per side), as in the paper.
* ``poisson5d``: u* = Σ_k cos(πx_k), f = π² u*, g = u* on ∂Ω; random uniform points (the
  paper's 5D example: 4000 interior, 500 boundary).

The metric is the relative L² error ‖u_θ − u*‖ / ‖u*‖ on a dense test set (a 100×100 grid in 2D,
10⁴ uniform points in 5D). Import this module with float64 enabled
(``jax.config.update("jax_enable_x64", True)``): the run does that, natgrad never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "PROBLEMS",
    "Problem",
    "Workload",
    "collocation",
    "init_mlp",
    "laplacian",
    "make_workload",
    "mlp",
    "problem",
    "relative_l2",
    "residual_fn",
    "test_points",
]

PyTree = Any


class Problem(NamedTuple):
    name: str
    dim: int
    u_star: Callable[[jax.Array], jax.Array]  # x of shape (d,) -> scalar
    source: Callable[[jax.Array], jax.Array]  # f = −Δu*
    interior: int  # default collocation sizes
    boundary: int
    grid: bool  # tensor grid (2D) or uniform random points


def _sin_product(x):
    return jnp.prod(jnp.sin(jnp.pi * x))


def _cos_sum(x):
    return jnp.sum(jnp.cos(jnp.pi * x))


PROBLEMS = {
    "poisson2d": Problem(
        "poisson2d", 2, _sin_product, lambda x: 2 * jnp.pi**2 * _sin_product(x), 900, 120, True
    ),
    "poisson5d": Problem(
        "poisson5d", 5, _cos_sum, lambda x: jnp.pi**2 * _cos_sum(x), 4000, 500, False
    ),
}


def problem(name: str) -> Problem:
    """The problem called `name` (one of ``PROBLEMS``)."""
    if name not in PROBLEMS:
        raise ValueError(f"problem: expected one of {tuple(PROBLEMS)}, got {name!r}")
    return PROBLEMS[name]


def collocation(
    prob: Problem,
    *,
    interior: int | None = None,
    boundary: int | None = None,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Points as `residual_fn`'s inputs: {"x": (B, d), "boundary": (B,), "weight": (B,)}.

    Interior points first. A tensor grid when ``prob.grid`` and `key` is None (interior: the
    ⌊√N⌋² inner nodes of a uniform grid; boundary: N/4 equispaced points per side), else uniform
    random points (boundary: a random face, its coordinate set to 0 or 1) drawn with `key`.
    """
    n_in = prob.interior if interior is None else int(interior)
    n_bd = prob.boundary if boundary is None else int(boundary)
    if n_in < 1 or n_bd < 1:
        raise ValueError(f"interior, boundary: expected counts >= 1, got {n_in} and {n_bd}")
    d = prob.dim
    if key is None and not prob.grid:
        key = jax.random.PRNGKey(0)
    if key is None:
        if d != 2:
            raise ValueError(f"key: a grid is only built in 2D, problem {prob.name} needs a key")
        m = max(1, math.isqrt(n_in))
        t = jnp.linspace(0.0, 1.0, m + 2)[1:-1]
        xs, ys = jnp.meshgrid(t, t, indexing="ij")
        x_in = jnp.stack([xs.ravel(), ys.ravel()], axis=1)
        per_side = max(1, n_bd // 4)
        s = jnp.linspace(0.0, 1.0, per_side, endpoint=False)
        zero, one = jnp.zeros_like(s), jnp.ones_like(s)
        x_bd = jnp.concatenate(
            [
                jnp.stack([s, zero], 1),
                jnp.stack([one, s], 1),
                jnp.stack([1 - s, one], 1),
                jnp.stack([zero, 1 - s], 1),
            ]
        )
    else:
        k_in, k_bd, k_face, k_side = jax.random.split(key, 4)
        x_in = jax.random.uniform(k_in, (n_in, d))
        x_bd = jax.random.uniform(k_bd, (n_bd, d))
        face = jax.random.randint(k_face, (n_bd,), 0, d)
        side = jax.random.bernoulli(k_side, 0.5, (n_bd,)).astype(x_bd.dtype)
        x_bd = jnp.where(jax.nn.one_hot(face, d, dtype=bool), side[:, None], x_bd)
    n_in, n_bd = x_in.shape[0], x_bd.shape[0]
    total = n_in + n_bd
    weight = jnp.concatenate(
        [jnp.full(n_in, math.sqrt(total / n_in)), jnp.full(n_bd, math.sqrt(total / n_bd))]
    )
    flag = jnp.concatenate([jnp.zeros(n_in, bool), jnp.ones(n_bd, bool)])
    return {"x": jnp.concatenate([x_in, x_bd]), "boundary": flag, "weight": weight}


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    """Glorot-normal weights and zero biases for a tanh MLP with layer `sizes`."""
    params = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.normal(jax.random.fold_in(key, i), (m, n)) * math.sqrt(2.0 / (m + n))
        params.append({"w": w, "b": jnp.zeros(n)})
    return params


def mlp(params: PyTree, x: jax.Array) -> jax.Array:
    """u_θ(x) for one point x of shape (d,): a scalar."""
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return (x @ params[-1]["w"] + params[-1]["b"])[0]


def laplacian(u: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Δu(x) = Σ_k ∂²u/∂x_k², forward-over-reverse (one jvp of ∇u per coordinate)."""
    grad = jax.grad(u)
    basis = jnp.eye(x.shape[0], dtype=x.dtype)
    second = jax.vmap(lambda e: jax.jvp(grad, (x,), (e,))[1] @ e)(basis)
    return jnp.sum(second)


def residual_fn(prob: Problem) -> Callable[[PyTree, dict[str, jax.Array]], jax.Array]:
    """apply_fn(params, inputs) -> residuals (B, 1): w·(−Δu − f) inside, w·(u − g) on ∂Ω."""

    def one(params, x, on_boundary, weight):
        u = lambda y: mlp(params, y)  # noqa: E731
        interior = -laplacian(u, x) - prob.source(x)
        edge = u(x) - prob.u_star(x)
        return weight * jnp.where(on_boundary, edge, interior)

    def apply(params, inputs):
        r = jax.vmap(one, in_axes=(None, 0, 0, 0))(
            params, inputs["x"], inputs["boundary"], inputs["weight"]
        )
        return r[:, None]

    return apply


def test_points(prob: Problem, *, size: int | None = None) -> jax.Array:
    """The test set: a size×size grid on [0, 1]² (default 100) or `size` uniform points (10⁴)."""
    if prob.grid:
        m = 100 if size is None else int(size)
        t = jnp.linspace(0.0, 1.0, m)
        xs, ys = jnp.meshgrid(t, t, indexing="ij")
        return jnp.stack([xs.ravel(), ys.ravel()], axis=1)
    count = 10_000 if size is None else int(size)
    return jax.random.uniform(jax.random.PRNGKey(12345), (count, prob.dim))


def relative_l2(params: PyTree, prob: Problem, points: jax.Array) -> jax.Array:
    """‖u_θ − u*‖ / ‖u*‖ over `points`."""
    u = jax.vmap(lambda x: mlp(params, x))(points)
    exact = jax.vmap(prob.u_star)(points)
    return jnp.linalg.norm(u - exact) / jnp.linalg.norm(exact)


class Workload(NamedTuple):
    """Everything a run needs: the residual apply_fn, the batch (inputs, zero targets), θ₀."""

    problem: Problem
    apply_fn: Callable
    batch: tuple[dict[str, jax.Array], jax.Array]
    params: PyTree
    test: jax.Array


def make_workload(
    name: str = "poisson2d",
    *,
    hidden: tuple[int, ...] = (32, 32),
    interior: int | None = None,
    boundary: int | None = None,
    seed: int = 0,
    random_points: bool = False,
) -> Workload:
    """The problem `name` with a tanh MLP d-`hidden`-1 initialised from `seed`."""
    prob = problem(name)
    if jnp.zeros(()).dtype != jnp.float64:
        raise ValueError("jax_enable_x64: the PINN workload runs in float64; enable it first")
    key = jax.random.PRNGKey(seed)
    k_net, k_pts = jax.random.split(key)
    inputs = collocation(
        prob,
        interior=interior,
        boundary=boundary,
        key=k_pts if (random_points or not prob.grid) else None,
    )
    targets = jnp.zeros((inputs["x"].shape[0], 1))
    params = init_mlp(k_net, (prob.dim, *hidden, 1))
    return Workload(prob, residual_fn(prob), (inputs, targets), params, test_points(prob))
