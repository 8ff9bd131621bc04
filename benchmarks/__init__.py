"""natgrad's benchmarks: `python -m benchmarks [--quick] --out results/bench` (or `make bench`)."""
