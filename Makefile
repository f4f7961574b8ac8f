# Every target creates .venv and installs the project when needed: a fresh clone needs
# nothing but `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test check bench install mlff clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel; any other version pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/steer demo --out demo_out

check: $(STAMP)
	$(BIN)/ruff check simulations consumers model_server steering tests
	$(BIN)/ruff format --check simulations consumers model_server steering tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

# pytest exits 5 when it collected nothing: that must fail, and it does (any non-zero).
test: check
	$(BIN)/python -m pytest -q -m "not mlff" tests

bench: $(STAMP)
	mkdir -p bench-results
	$(BIN)/python -m pip install --quiet atheris==3.0.0 || echo "atheris did not install: bench_fuzz skips its coverage-guided phase"
	$(BIN)/python -m pytest -q -s tests/benchmarks -o python_files='bench_*.py' -o python_functions='bench_*' -p no:cacheprovider

# Optional: the ML force fields that rebuild the reference FCs (simulate reference).
mlff: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps chgnet==0.4.2 sevenn==0.13.0 e3nn==0.6.0 \
		opt-einsum==3.4.0 opt-einsum-fx==0.1.4 torch-geometric==2.8.1
	$(BIN)/python -m pip install --quiet -e '.[dev,mlff]'

clean:
	rm -rf $(VENV) bench-results demo_out .pytest_cache .mypy_cache .ruff_cache
