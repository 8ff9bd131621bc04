"""The PINN workload: residuals and Laplacian against independent oracles; Gauss-Newton vs Adam."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from natgrad import dense, losses
from natgrad.experiments import pinn, pinn_command, pinn_run


def test_laplacian_of_the_exact_solutions():
    x = jnp.array([0.3, 0.7])
    p2 = pinn.problem("poisson2d")
    np.testing.assert_allclose(pinn.laplacian(p2.u_star, x), -p2.source(x), rtol=1e-12)
    y = jnp.array([0.1, 0.2, 0.3, 0.4, 0.9])
    p5 = pinn.problem("poisson5d")
    np.testing.assert_allclose(pinn.laplacian(p5.u_star, y), -p5.source(y), rtol=1e-12)


def test_collocation_points_lie_where_they_should():
    inputs = pinn.collocation(pinn.problem("poisson2d"))
    x, on_edge = inputs["x"], inputs["boundary"]
    assert x.shape == (1020, 2) and int(on_edge.sum()) == 120
    edge_dist = jnp.minimum(x, 1 - x).min(axis=1)
    assert jnp.all(edge_dist[on_edge] == 0) and jnp.all(edge_dist[~on_edge] > 0)
    five = pinn.collocation(pinn.problem("poisson5d"), interior=50, boundary=20)
    dist5 = jnp.minimum(five["x"], 1 - five["x"]).min(axis=1)
    assert jnp.all(dist5[five["boundary"]] == 0) and jnp.all(dist5[~five["boundary"]] > 0)


def test_mean_squared_error_of_residuals_is_the_pinn_loss():
    # The paper's loss, with the Laplacian as the trace of jax.hessian (an independent oracle).
    work = pinn.make_workload("poisson2d", hidden=(5,), interior=16, boundary=8, seed=1)
    inputs, targets = work.batch
    got = jax.jit(lambda p: losses.squared_error().mean(work.apply_fn(p, inputs), targets))(
        work.params
    )
    x, edge = inputs["x"], inputs["boundary"]

    def u(y):
        return pinn.mlp(work.params, y)

    lap = jax.jit(jax.vmap(lambda y: jnp.trace(jax.hessian(u)(y))))(x[~edge])
    f = jax.vmap(work.problem.source)(x[~edge])
    g = jax.vmap(work.problem.u_star)(x[edge])
    expected = 0.5 * jnp.mean((lap + f) ** 2) + 0.5 * jnp.mean((jax.vmap(u)(x[edge]) - g) ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_woodbury_and_primal_agree_on_a_pinn():
    work = pinn.make_workload("poisson2d", hidden=(6,), interior=9, boundary=8)
    loss = losses.squared_error()

    @jax.jit
    def directions(params):
        grads = jax.grad(lambda p: loss.mean(work.apply_fn(p, work.batch[0]), work.batch[1]))(
            params
        )
        return [
            ravel_pytree(
                dense.dense_direction(
                    "ggn", work.apply_fn, loss, params, work.batch, grads, 1e-6, method=m
                )[0]
            )[0]
            for m in ("primal", "woodbury")
        ]

    primal, woodbury = directions(work.params)
    np.testing.assert_allclose(primal, woodbury, rtol=1e-6, atol=1e-8 * jnp.abs(primal).max())


def test_gauss_newton_reaches_an_error_adam_cannot_in_as_many_steps():
    work = pinn.make_workload("poisson2d", hidden=(16,), interior=64, boundary=32)
    steps = 25
    engd = pinn_run.run(
        pinn_run.engd_dense(work, damping=1e-6), work, budget_seconds=1e9, max_steps=steps
    )
    adam_best = min(
        pinn_run.run(
            pinn_run.make_stepper(f"adam-{lr:g}", work), work, budget_seconds=1e9, max_steps=steps
        )["best_rel_l2"]
        for lr in (1e-2, 1e-1)
    )
    assert engd["final_rel_l2"] < 1e-3
    assert adam_best > 10 * engd["final_rel_l2"]


def test_command_writes_table_json_and_plot(tmp_path):
    code = pinn_command.main(
        [
            "--budget",
            "30",
            "--max-steps",
            "3",
            "--optimizers",
            "engd-dense,gd",
            "--gd-lrs",
            "1e-3",
            "--hidden",
            "4",
            "--interior",
            "9",
            "--boundary",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["results"]) == {"engd-dense", "gd-0.001"}
    assert doc["results"]["engd-dense"]["steps"] == 3
    assert "| engd-dense | 3 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--optimizers", "sgd"], "optimizers"),
        (["--budget", "-1"], "budget"),
        (["--problem", "heat"], "problem"),
        (["--hidden", "a"], "hidden"),
    ],
)
def test_command_bad_arguments_exit_2_with_one_line(argv, word, capsys):
    assert pinn_command.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and word in err


def test_optimizer_names_expand_grids():
    assert pinn_run.optimizer_names(["adam", "lbfgs"], adam_lrs=(1e-3, 1e-2)) == [
        "adam-0.001",
        "adam-0.01",
        "lbfgs",
    ]
    with pytest.raises(ValueError, match="optimizers"):
        pinn_run.optimizer_names(["newton"])
    assert optax  # the baselines are optax's own


def test_command_names_agree_with_the_modules():
    assert pinn_command.PROBLEMS == tuple(pinn.PROBLEMS)
    assert pinn_command.OPTIMIZERS == pinn_run.OPTIMIZERS


def test_natgrad_command_dispatches_pinn(capsys):
    from natgrad.experiments import cli

    assert cli.main(["pinn", "--problem", "heat"]) == 2
    assert "problem" in capsys.readouterr().err
    assert "pinn" in cli.build_parser().format_help()
