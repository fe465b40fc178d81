# Set-up and the two everyday commands. `make demo` runs the main job on the embedded model;
# `make test` runs lint and the test suite. Both create the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/main

.PHONY: demo test test-slow lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls the multi-GB CUDA build onto a CPU machine.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Trains moe and the ppo-single ablation on the embedded model, then the evaluation report. A
# second run resumes: no more training, a fresh evaluation.
demo: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/rldiff train --model embedded --out $(OUT) --resume

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider; \
	  status=$$?; if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test-slow: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m 'slow or gpu' -s

clean:
	rm -rf $(VENV) .cache runs
