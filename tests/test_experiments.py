"""Experiments in-process: models, the lineup, the shared training loop, the report."""

import json
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natgrad
from natgrad.experiments import lineup, models, report, training


def _blobs(num_train=96, num_test=32, features=12, classes=3, seed=0):
    """Separable Gaussian blobs, float32 in [0, 1], as a Dataset-like namespace."""
    rng = np.random.default_rng(seed)
    centers = rng.integers(0, 2, (classes, features)).astype(np.float64)

    def draw(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        x = np.clip(centers[y] + 0.1 * rng.normal(size=(n, features)), 0, 1).astype(np.float32)
        return x, y

    (xt, yt), (xs, ys) = draw(num_train), draw(num_test)
    return SimpleNamespace(
        x_train=xt, y_train=yt, x_test=xs, y_test=ys, name="blobs", num_classes=classes
    )


# --- models -------------------------------------------------------------------------------


def test_mlp_is_he_initialised_float32_and_deterministic():
    model = models.mlp((784, 128, 10))
    params = model.init(jax.random.PRNGKey(0))
    assert [p["w"].shape for p in params] == [(784, 128), (128, 10)]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert np.std(params[0]["w"]) == pytest.approx(np.sqrt(2 / 784), rel=0.02)
    assert not np.any(params[0]["b"])
    again = model.init(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        assert np.array_equal(a, b)
    assert model.apply(params, jnp.ones((5, 784), jnp.float32)).shape == (5, 10)


def test_autoencoder_reconstructs_its_inputs_with_a_linear_code_layer():
    model = models.build("autoencoder", 20, 10, hidden=(8, 3, 8))
    assert model.sizes == (20, 8, 3, 8, 20) and not model.classifier
    assert model.loss.name == "sigmoid_cross_entropy"
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 20), jnp.float32)
    assert model.targets(x, None) is x
    assert model.apply(params, x).shape == (4, 20)
    # The code layer is linear: scaling the encoder's last layer scales the decoder's input.
    code = x
    for layer in params[:2]:
        code = code @ layer["w"] + layer["b"]
        code = jax.nn.relu(code) if layer is params[0] else code
    assert np.any(code < 0)  # a ReLU code could not be negative


def test_model_sizes_are_checked():
    with pytest.raises(ValueError, match="sizes"):
        models.autoencoder((10, 4, 9))
    with pytest.raises(ValueError, match="model"):
        models.build("cnn", 10, 2)


# --- lineup -------------------------------------------------------------------------------


def test_default_hyperparameters_are_visible():
    hyper = lineup.resolve(lineup.default_lineup())
    assert hyper["sgd"] == {
        "learning_rate": 0.1,
        "momentum": None,
        "nesterov": False,
        "accumulator_dtype": None,
    }
    assert hyper["adam"]["learning_rate"] == 1e-3 and hyper["adam"]["b2"] == 0.999
    assert hyper["ngd-empirical"]["curvature"] == "empirical_fisher"
    assert hyper["ngd-fisher-mc"]["curvature"] == "fisher_mc"
    assert hyper["ngd-fisher-mc"]["damping"] == 1e-2
    assert hyper["ngd-fisher"]["curvature"] == "fisher"
    assert hyper["ngd-fisher"]["step_rule"] == "kl" and hyper["ngd-fisher"]["damping"] is None
    assert hyper["hessian-free"]["curvature"] == "ggn"
    assert list(hyper)[:6] == [
        "sgd",
        "adam",
        "ngd-empirical",
        "ngd-fisher-mc",
        "ngd-fisher",
        "hessian-free",
    ]


def test_overrides_are_parsed_and_applied_per_optimizer():
    overrides = [
        lineup.parse_override("ngd-fisher.kl_radius=0.01"),
        lineup.parse_override("sgd.learning_rate=1"),
        lineup.parse_override("ngd-fisher.martens_stop=true"),
        lineup.parse_override("hessian-free.preconditioner=none"),
        lineup.parse_override("ngd-fisher.step_rule=quadratic"),
    ]
    hyper = lineup.resolve(["sgd", "ngd-fisher", "hessian-free"], overrides)
    assert hyper["ngd-fisher"]["kl_radius"] == 0.01
    assert hyper["sgd"]["learning_rate"] == 1.0 and isinstance(hyper["sgd"]["learning_rate"], float)
    assert hyper["ngd-fisher"]["martens_stop"] is True
    assert hyper["hessian-free"]["preconditioner"] is None
    assert hyper["ngd-fisher"]["step_rule"] == "quadratic"
    assert lineup.resolve(["ngd-fisher"])["ngd-fisher"]["kl_radius"] == 1e-3  # not shared


@pytest.mark.parametrize(
    "names, override, message",
    [
        (["sgd", "nope"], None, "unknown optimizer 'nope'; choose from sgd, adam"),
        (["sgd"], "adamw.learning_rate=1", "unknown optimizer 'adamw'"),
        (["sgd"], "adam.learning_rate=1", "'adam' is not in this run"),
        (["sgd"], "sgd.lr=1", "hyperparameter 'lr' for sgd; choose from learning_rate, momentum"),
        (["sgd"], "sgd.learning_rate=fast", "expected a number"),
        (["sgd"], "sgd-learning_rate=1", "expected OPTIMIZER.HYPERPARAMETER=VALUE"),
    ],
)
def test_bad_lineups_name_the_culprit(names, override, message):
    with pytest.raises(lineup.LineupError, match=message):
        overrides = [lineup.parse_override(override)] if override else []
        lineup.resolve(names, overrides)


def test_factory_errors_become_lineup_errors():
    hyper = lineup.resolve(["ngd-fisher"], [lineup.parse_override("ngd-fisher.kl_radius=-1")])
    with pytest.raises(lineup.LineupError, match="ngd-fisher: kl_radius"):
        lineup.build("ngd-fisher", hyper["ngd-fisher"], models.mlp((4, 3, 2)))


def test_kfac_ends_the_lineup_with_its_factory_defaults():
    import inspect

    assert (
        lineup.default_lineup()[-1] == "kfac" and lineup.registry()["kfac"].factory is natgrad.kfac
    )
    signature = inspect.signature(natgrad.kfac).parameters.values()
    defaults = {p.name: p.default for p in signature if p.default is not p.empty}
    assert lineup.resolve(["kfac"])["kfac"] == defaults


# --- the training loop --------------------------------------------------------------------


def test_batch_order_is_a_seeded_permutation_per_epoch():
    a = training.batch_order(100, 32, seed=3, epoch=0)
    assert a.shape == (3, 32) and len(set(a.ravel())) == 96
    assert np.array_equal(a, training.batch_order(100, 32, seed=3, epoch=0))
    assert not np.array_equal(a, training.batch_order(100, 32, seed=3, epoch=1))
    assert not np.array_equal(a, training.batch_order(100, 32, seed=4, epoch=0))


def test_eval_steps_cover_start_fractions_and_end():
    assert training.eval_steps(8, 2, 0.25) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert training.eval_steps(31, 2, 0.25) == [0, 8, 16, 23, 31, 39, 46, 54, 62]
    assert training.eval_steps(5, 1, 3.0) == [0, 5]


def test_every_optimizer_starts_from_the_same_parameters():
    model = models.mlp((12, 8, 3))
    names = ["sgd", "ngd-fisher"]
    hyper = lineup.resolve(names)
    states = [training.init_state(model, lineup.build(n, hyper[n], model), seed=5) for n in names]
    for a, b in zip(*(jax.tree.leaves(s.params) for s in states), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(states[0].key, states[1].key)


@pytest.fixture(scope="module")
def trained():
    data = _blobs()
    model = models.mlp((12, 8, 3))
    config = training.RunConfig(epochs=4, batch_size=8, seed=0, eval_every=0.5)
    names = ["sgd", "ngd-fisher"]
    hyper = lineup.resolve(names)
    return {
        n: training.train(lineup.build(n, hyper[n], model), model, data, config, progress_bar=False)
        for n in names
    }


def test_train_reports_metrics_and_curves(trained):
    sgd, ngd = trained["sgd"].metrics, trained["ngd-fisher"].metrics
    for m in (sgd, ngd):
        assert m["steps"] == 48 and m["epochs"] == 4
        assert m["test_accuracy"] > 0.6  # three separable blobs: chance is 1/3
        assert np.isfinite([m["test_loss"], m["train_loss"], m["train_seconds"]]).all()
        assert m["compile_seconds"] > 0
    assert sgd["mean_cg_iterations"] is None and sgd["rejected_steps"] is None
    assert 1 <= ngd["mean_cg_iterations"] <= 10 and ngd["rejected_steps"] == 0
    assert ngd["mean_step_kl"] > 0 and ngd["final_damping"] > 0
    curve = trained["ngd-fisher"].curve
    assert [p["step"] for p in curve] == [0, 6, 12, 18, 24, 30, 36, 42, 48]
    assert curve[0]["time_seconds"] == 0 and curve[-1]["epoch"] == 4
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]


def test_report_table_json_and_timing_strip(trained, tmp_path):
    results = {
        n: {"hyperparameters": r.hyperparameters, "metrics": r.metrics, "curve": r.curve}
        for n, r in trained.items()
    }
    paths = report.write_results(str(tmp_path), {"seed": 0}, results, total_seconds=1.0)
    table = open(paths["table"]).read().splitlines()
    assert table[0].startswith("| optimizer | test acc % | test loss | train loss | train time s")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["sgd", "ngd-fisher"]
    assert table[2].rstrip().endswith("| 48 | — |")
    document = report.load_results(paths["results"])
    assert {"platform", "cpu_count", "jax"} <= set(document["machine"])
    stripped = report.strip_timings(document)
    assert "total_seconds" not in stripped
    assert "train_seconds" not in stripped["results"]["sgd"]["metrics"]
    assert "time_seconds" not in stripped["results"]["sgd"]["curve"][0]
    assert stripped["results"]["sgd"]["metrics"]["steps"] == 48
    with open(paths["curves"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    json.dumps(document)  # plain JSON types only


def test_core_library_never_imports_the_experiments():
    code = (
        "import sys, natgrad, natgrad.optimizers;"
        "bad = [m for m in sys.modules if m.startswith('natgrad.experiments')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
