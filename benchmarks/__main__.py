"""Run every benchmark and write its JSON under --out (default results/bench)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks import timing

# Each module has main(argv) -> dict and writes <name>.json into --out.
BENCHMARKS = (
    "curvature",
    "steps",
    "phases",
    "kfac",
    "inverses",
    "compile_time",
    "time_to_target",
    "sharding",
    "charlm",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run just these")
    args = parser.parse_args(argv)
    timing.compilation_cache()
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        module.main(["--out", args.out] + (["--quick"] if args.quick else []))
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    from benchmarks import report

    report.main(["--out", args.out])  # REPORT.md over every JSON now in --out
    return 0


if __name__ == "__main__":
    sys.exit(main())
