"""natgrad's benchmarks: `python -m benchmarks [--quick] --out results/bench` (or `make bench`)."""

import os as _os

# OpenBLAS (behind JAX's CPU LAPACK calls: K-FAC's inverses) spins its own threads against
# XLA's; on 2 cores a 785 × 785 inverse in a step took 200 ms with them, 27 ms without. Set
# before the first LAPACK call; an explicit setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
