"""`benchmarks.compile_time`: the kernel count it reports and its first-step rows."""

import jax
import jax.numpy as jnp
from benchmarks import compile_time, report


def test_kernels_counts_what_xla_emits_code_for():
    x = jnp.ones((64, 64))
    one = jax.jit(lambda a: jnp.sin(a) * 2).lower(x).compile().as_text()
    # A matrix product, a reduction and a non-fusible data dependency: more kernels.
    many = jax.jit(lambda a: jnp.sum(jnp.tanh(a @ a) @ a, axis=0) + jnp.max(a)).lower(x)
    assert compile_time.kernels(one) == 1
    # argmax fuses into one multi-output kernel, whose shape is a tuple: (f32[64], s32[64]).
    tuple_shaped = jax.jit(lambda a: jnp.argmax(jnp.sin(a) * 2, axis=0)).lower(x)
    assert compile_time.kernels(tuple_shaped.compile().as_text()) == 1
    assert compile_time.kernels(many.compile().as_text()) > 1


def test_first_step_rows_and_their_report(monkeypatch):
    # Two of the optimisers, one round: the rows, the ratio to Adam's, and the verdict.
    full = compile_time.optimizers
    monkeypatch.setattr(
        compile_time,
        "optimizers",
        lambda apply_fn, loss: {
            k: v for k, v in full(apply_fn, loss).items() if k in ("adam", "kfac")
        },
    )
    fs = compile_time.first_step(rounds=1)
    adam, kfac = fs["optimizers"]["adam"], fs["optimizers"]["kfac"]
    assert adam["over_adam"] == 1.0 and "met" not in adam
    assert kfac["over_adam"] == kfac["total_seconds"] / adam["total_seconds"]
    assert kfac["met"] == (kfac["over_adam"] <= compile_time.TARGET_RATIO)
    assert kfac["kernels"] > adam["kernels"] > 0
    payload = {
        "first_step": fs,
        "cache": {
            "command": "natgrad compare ...",
            "target_seconds": 1.0,
            "optimizers": {"kfac": {"first_seconds": 2.0, "second_seconds": 0.3, "met": True}},
        },
    }
    text = "\n".join(report.compile_section(payload))
    assert "| kfac |" in text and "| 2 | 0.3 | yes |" in text
