"""``python -m benchmarks.peers``: `benchmarks.peers.runner.main`."""

from benchmarks.peers.runner import main

main()
