"""natgrad against the 2026 lineup (issue 15): workloads, optimiser grids, runner, report.

``python -m benchmarks.peers [--quick]`` (``make bench-peers[-quick]``); the protocol is in
docs/benchmarks.md and `benchmarks.peers.runner`.
"""
