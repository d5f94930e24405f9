# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned again on every later pip call: an unpinned resolution can pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint venv cluster cluster-stop bench faults clean

$(BIN)/preemptible: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(TORCH) -e '.[test]'
	touch $@

venv: $(BIN)/preemptible

demo: venv
	$(BIN)/preemptible demo

# Two pytest-xdist workers: most tests wait on child processes (imports, DDP set-up, signals) or on the
# SLURM scheduler, so a second worker overlaps that waiting; the SLURM tests run one after the other in
# one worker (tests/conftest.py groups them). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: venv
	$(BIN)/python -m pytest -q -ra $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

# Lint and type checks (configured in pyproject.toml: [tool.ruff], [tool.mypy]); .ci/run runs them before the tests.
lint: venv
	$(BIN)/ruff check preemptible tests benchmarks
	$(BIN)/mypy

# Benchmarks (ratios measured side by side in one run) -> benchmarks/RESULTS.md
bench: venv
	$(BIN)/python benchmarks/run_all.py

# Fault-injection campaign (SIGKILL mid-write, damaged files, disk full, ...) -> benchmarks/FAULTS.md
faults: venv
	$(BIN)/python benchmarks/faults.py

cluster: venv
	bash docker/slurm/cluster.sh start --nodes 2

cluster-stop:
	bash docker/slurm/cluster.sh stop

clean:
	rm -rf $(VENV) build *.egg-info
