"""Sharded step throughput on 4 emulated CPU devices vs 1 device, same total batch.

On CPU, "devices" made by --xla_force_host_platform_device_count share the same two cores, so
this measures the overhead of SPMD partitioning and of the all-reduces, not a speed-up. The
JSON also carries a paper estimate of the communication a natural-gradient step needs at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# Paper estimate: with the batch sharded and parameters replicated, a curvature product's only
# cross-device traffic is the all-reduce of its vjp output (n floats); the jvp needs none, and
# CG's inner products are scalars. Ring all-reduce moves 2 (D − 1) / D · n · bytes per device.
ESTIMATE = {"parameters": 100_000_000, "devices": 8, "bytes_per_float": 4, "cg_iterations": 10}


def communication_estimate(parameters, devices, bytes_per_float, cg_iterations) -> dict:
    per_allreduce = 2 * (devices - 1) / devices * parameters * bytes_per_float
    # Per step: the gradient, the warm-start residual product and one product per CG iteration.
    allreduces = 1 + 1 + cg_iterations
    return {
        "bytes_per_device_per_cg_iteration": per_allreduce,
        "allreduces_per_step": allreduces,
        "bytes_per_device_per_step": allreduces * per_allreduce,
        "seconds_per_cg_iteration_at_100GBps": per_allreduce / 100e9,
        "assumptions": "float32, ring all-reduce, batch-sharded data parallelism, replicated "
        "parameters; the K-FAC / diagonal statistics add one parameter-sized all-reduce per "
        "refresh",
    }


def worker(devices: int, batch_size: int, repeats: int) -> dict:
    import jax

    import natgrad
    from benchmarks.timing import median_seconds, setup
    from natgrad.experiments import training

    params, apply_fn, data, loss = setup((784, 512, 512, 10), batch_size)
    opt = natgrad.natural_gradient(apply_fn, loss)

    step = jax.jit(training.make_step(opt, apply_fn, loss))
    mesh = natgrad.sharding.batch_mesh(devices)
    p = natgrad.sharding.replicate(params, mesh)
    s = natgrad.sharding.replicate(opt.init(params), mesh)
    d = natgrad.sharding.shard_batch(data, mesh)
    seconds = median_seconds(step, p, s, d, None, repeats=repeats)
    return {
        "devices": devices,
        "step_seconds": seconds,
        "examples_per_second": batch_size / seconds,
    }


def run(quick: bool) -> dict:
    batch_size, repeats = (256, 3) if quick else (1024, 10)
    rows = []
    for devices in (1, 4):
        env = dict(
            os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.sharding",
                "--worker",
                str(devices),
                "--batch-size",
                str(batch_size),
                "--repeats",
                str(repeats),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "benchmark": "sharding",
        "model": [784, 512, 512, 10],
        "batch_size": batch_size,
        "optimizer": "natural_gradient defaults",
        "note": "emulated CPU devices share 2 cores: this measures SPMD overhead, not speed-up",
        "runs": rows,
        "throughput_4_over_1": rows[1]["examples_per_second"] / rows[0]["examples_per_second"],
        "estimate_100M_params_8_devices": communication_estimate(**ESTIMATE),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.batch_size, args.repeats)
        print(json.dumps(result))
        return result
    from benchmarks.timing import write_json

    payload = run(args.quick)
    path = write_json(args.out, "sharding.json", payload)
    print(f"  throughput 4 emulated devices / 1 device: {payload['throughput_4_over_1']:.2f}")
    est = payload["estimate_100M_params_8_devices"]
    print(
        f"  100M params on 8 devices: {est['bytes_per_device_per_cg_iteration'] / 1e6:.0f} MB "
        f"per device per CG iteration"
    )
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
