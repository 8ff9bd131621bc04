import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/jax load (shared 2-core CPUs)

from benchmarks.peers.runner import main  # noqa: E402

main()
