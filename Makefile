# natgrad: `make demo` and `make test` are the two set-up commands (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench bench-quick lint data clean

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

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q

bench: $(VENV)/.test data
	$(PY) -m benchmarks --out results/bench

bench-quick: $(VENV)/.test
	$(PY) -m benchmarks --quick --out results/bench

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
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
