# natgrad: `make demo` and `make test` are the two set-up commands (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-fast bench bench-quick bench-peers bench-peers-quick kfac-jax-check lint data clean pinn

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.experiments: pyproject.toml | $(PY)
	$(PIP) install -e ".[experiments]"
	touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install -e ".[test]"
	touch $@

demo: $(VENV)/.experiments
	$(VENV)/bin/natgrad compare --dataset mnist-5k --epochs 2 --batch-size 128 --out results/demo

# Physics-informed 2D Poisson: ENGD (natgrad.dense) vs Adam, L-BFGS, GD, CG natural gradient, HF.
pinn: $(VENV)/.experiments
	$(VENV)/bin/natgrad pinn --problem poisson2d --budget 180 --out results/pinn-poisson2d

# The full suite (what CI runs), on 2 xdist workers, one test file each: ~16 min on 2 cores.
test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q -n 2 --dist loadfile

# The inner loop: every test but those marked slow (end-to-end runs, subprocesses, compiles of
# full-size models), on the same 2 workers; under 2 min on a quiet 2-core machine.
test-fast: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

bench: $(VENV)/.test data
	$(PY) -m benchmarks --out results/bench

bench-quick: $(VENV)/.test
	$(PY) -m benchmarks --quick --out results/bench

# natgrad against the 2026 lineup (issue 15). kfac-jax 0.0.8 needs jax 0.9.0.1: its rows run in
# .venv-peers; if that cannot be built, its rows say "failed: ..." instead.
PEERS_VENV := .venv-peers
$(VENV)/.peers: pyproject.toml | $(PY)
	$(PIP) install -e ".[test,peers]"
	touch $@

$(PEERS_VENV)/.stamp:
	$(PYTHON) -m venv $(PEERS_VENV) && $(PEERS_VENV)/bin/python -m pip install -q \
	  --disable-pip-version-check "jax==0.9.0.1" "jaxlib==0.9.0.1" "kfac-jax==0.0.8" numpy optax tqdm \
	  && touch $@ || echo "kfac-jax: $(PEERS_VENV) could not be built; its rows will say failed"

# natgrad's conv2d and repeated-dense Kronecker blocks against kfac-jax's (in .venv-peers).
kfac-jax-check: $(PEERS_VENV)/.stamp
	PYTHONPATH=src:. $(PEERS_VENV)/bin/python -m benchmarks.kfac_jax_check results/kfac-jax-check.json

# The full protocol in two parts side by side, one core each (XLA and BLAS single-threaded):
# the CNN and the batch scaling | the MLPs and the autoencoder; then one merged result/report.
PARTS := results/peers-parts
ONE_CORE := OPENBLAS_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
bench-peers: $(VENV)/.peers $(PEERS_VENV)/.stamp data
	mkdir -p $(PARTS)
	$(ONE_CORE) $(PY) -m benchmarks.peers --workloads cnn --out $(PARTS)/a > $(PARTS)/a.log 2>&1 & a=$$!; \
	$(ONE_CORE) $(PY) -m benchmarks.peers --workloads mlp deep-mlp autoencoder --no-scaling \
	  --out $(PARTS)/b; b=$$?; wait $$a && [ $$b = 0 ] || \
	  { echo "bench-peers: a part failed (logs in $(PARTS))"; exit 1; }
	$(PY) -m benchmarks.peers --merge $(PARTS)/a/peers.json $(PARTS)/b/peers.json --out results

bench-peers-quick: $(VENV)/.peers $(PEERS_VENV)/.stamp data
	$(PY) -m benchmarks.peers --quick --out results

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

# Fashion-MNIST (60k/10k IDX files) from Debian's dataset-fashion-mnist, for the benchmarks.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "fashion-mnist: found in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "fashion-mnist: apt-get install dataset-fashion-mnist failed; benchmarks needing it will be skipped"; \
	else \
	  echo "fashion-mnist: not root or no apt-get; run 'sudo apt-get install dataset-fashion-mnist'" \
	       "or put the IDX files in \$$NATGRAD_DATA_DIR; benchmarks needing it will be skipped"; \
	fi

clean:
	rm -rf $(VENV) $(PEERS_VENV) results .pytest_cache .ruff_cache .hypothesis
