"""natgrad against the 2026 lineup: the runner and kfac-jax's rows (the workloads, optimiser grids,
timed loop and report are shared with time to target: `benchmarks.workloads`, `benchmarks.grids`,
`benchmarks.timed_training`, `benchmarks.report`).

``python -m benchmarks.peers [--quick]`` (``make bench-peers[-quick]``); the protocol is in
docs/benchmarks.md and `benchmarks.peers.runner`.
"""
