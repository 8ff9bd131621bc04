"""The CNN and the character-level transformer of the experiments: shapes, declarations, data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natgrad
from natgrad.experiments import charlm, models
from natgrad.experiments.training import make_step


def test_cnn_declared_and_plain_convolutions_agree_and_only_declared_get_blocks():
    declared, plain = models.build("cnn", 784, 10), models.cnn(declared=False)
    params = declared.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 784))
    np.testing.assert_allclose(declared.apply(params, x), plain.apply(params, x), atol=1e-5)
    assert declared.apply(params, x).shape == (4, 10)
    y = jax.random.randint(jax.random.PRNGKey(2), (4,), 0, 10)
    kinds = {}
    for model in (declared, plain):
        opt = natgrad.kfac(model.apply, model.loss)
        state = opt.init(params)
        _, state, loss = jax.jit(make_step(opt, model.apply, model.loss))(
            params, state, (x, y), jax.random.PRNGKey(3)
        )
        assert jnp.isfinite(loss)
        kinds[model is declared] = {
            k: int(v) for k, v in state.preconditioner_state.registered_by_kind.items()
        }
    assert kinds[True]["conv2d"] == 2 and kinds[True]["dense"] == 1
    assert kinds[False]["conv2d"] == 0 and kinds[False]["dense"] == 1


def test_cnn_rejects_inputs_that_are_not_28_by_28():
    with pytest.raises(ValueError, match="model"):
        models.build("cnn", 100, 10)


def test_charlm_encoding_and_windows():
    ids = charlm.encode("a b\n\tZ~é")
    assert ids.tolist() == [65, 0, 66, 95, 96, 58, 94, 96]
    assert ids.max() < charlm.VOCAB
    data = np.arange(1000, dtype=np.int32)
    x, t = charlm.windows(data, 3, 8, seed=0)
    assert x.shape == t.shape == (3, 8)
    np.testing.assert_array_equal(t, x + 1)  # next-character targets
    x2, _ = charlm.windows(data, 3, 8, seed=0)
    np.testing.assert_array_equal(x, x2)  # the seed fixes the windows


def test_charlm_corpus_is_the_standard_library_and_checks_its_size():
    corpus = charlm.corpus(5000)
    assert len(corpus.train) + len(corpus.valid) == 5000
    assert len(corpus.valid) == 500
    with pytest.raises(ValueError, match="max_chars"):
        charlm.corpus(10)


def test_transformer_is_causal_and_declares_its_layers():
    model = charlm.transformer(width=16, depth=1, heads=2, length=6)
    params = model.init(jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, charlm.VOCAB)
    logits = model.apply(params, ids)
    assert logits.shape == (2, 6, charlm.VOCAB)
    changed = ids.at[:, 4].set((ids[:, 4] + 1) % charlm.VOCAB)
    later = model.apply(params, changed)
    np.testing.assert_allclose(logits[:, :4], later[:, :4], atol=1e-6)  # no look-ahead
    assert not np.allclose(logits[:, 4:], later[:, 4:])
    opt = natgrad.kfac(model.apply, model.loss, weight_sharing="expand")
    state = opt.init(params)
    targets = jnp.roll(ids, -1, axis=1)
    _, state, loss = jax.jit(make_step(opt, model.apply, model.loss))(
        params, state, (ids, targets), jax.random.PRNGKey(2)
    )
    assert jnp.isfinite(loss)
    assert (
        int(state.preconditioner_state.registered_by_kind["dense"]) == 5
    )  # qkv, out, up, down, head
    with pytest.raises(ValueError, match="heads"):
        charlm.transformer(width=10, heads=4)


def test_charlm_benchmark_run_and_its_report_section():
    from benchmarks import charlm as bench
    from benchmarks import report

    model = charlm.transformer(width=8, depth=1, heads=2, length=8)
    data = charlm.corpus(5000)
    params = model.init(jax.random.PRNGKey(0))
    run = bench.run("adam", 1e-3, model, params, data, steps=4, eval_every=2, batch=4)
    assert [c[0] for c in run["curve"]] == [0, 2, 4]
    assert run["curve"][0][1] == 0.0 and run["curve"][-1][1] >= run["curve"][1][1]
    assert run["final_loss"] == run["curve"][-1][2] and not run["diverged"]
    slower = {
        **run,
        "final_loss": run["final_loss"] + 1,
        "per_step_seconds": 2 * run["per_step_seconds"],
    }
    slower["curve"] = [(s, t, loss + 1) for s, t, loss in run["curve"]]
    payload = {
        "steps": 4,
        "batch": 4,
        "optimizers": {
            "adam": {"knob": "learning_rate", "runs": [run], "best": 0},
            "natgrad-kfac-expand": {"knob": "kl_radius", "runs": [slower], "best": 0},
        },
    }
    text = "\n".join(report.charlm_section(payload))
    assert "| natgrad-kfac-expand | kl_radius=0.001 |" in text
    assert "not reached" in text and "| 2.00 |" in text
    assert "Lowest final loss: **adam**" in text
    assert "First to the target in wall time: **adam** — natgrad loses here" in text
    assert "natgrad-kfac-expand: step 2.00× Adam's, target not reached" in text
