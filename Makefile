# Two commands do all set-up on a fresh machine:  make demo  and  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[test,logging]"
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -p no:cacheprovider

bench: setup
	$(PY) scripts/benchmark.py --reps 3 --warmup 1 --out bench/benchmark.json
	$(PY) scripts/bench_samplers.py
	$(PY) scripts/bench_data.py

clean:
	rm -rf runs bench lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
