# Set-up and the two everyday commands. `make demo` runs the main job on the embedded model;
# `make test` runs lint and the test suite. Both create the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/main

.PHONY: demo test test-slow lint lock browser clean

# Every package is pinned by requirements.lock (a constraints file: it fixes versions, installs
# nothing by itself), so each machine gets the same set; re-run when either file changes.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls the multi-GB CUDA build onto a CPU machine.
	$(BIN)/pip install --quiet -c requirements.lock torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

# Refreshes requirements.lock: resolves the newest versions pyproject.toml allows, unconstrained,
# in a throwaway venv (so .venv is untouched), and freezes them. Then `make` updates .venv to it.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install --quiet --upgrade pip; \
	"$$tmp/venv/bin/pip" install --quiet torch==2.13.0; \
	"$$tmp/venv/bin/pip" install --quiet -e '.[dev]'; \
	py=$$("$$tmp/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	{ echo "# Exact versions of every package that rldiff with its dev extras installs, for Linux,"; \
	  echo "# Python $$py, CPU build of torch. The Makefile installs with it as a constraints file:"; \
	  echo "#   pip install -c requirements.lock torch==2.13.0"; \
	  echo "#   pip install -c requirements.lock -e '.[dev]'"; \
	  echo "# Generated: refresh with \`make lock\` (newest versions pyproject.toml allows)."; \
	  "$$tmp/venv/bin/pip" freeze --exclude-editable --exclude rldiff; } > "$$tmp/lock"; \
	mv "$$tmp/lock" requirements.lock; \
	echo "requirements.lock: $$(grep -vc '^#' requirements.lock) packages pinned"

# Trains moe and the ppo-single ablation on the embedded model, then the evaluation report. A
# second run resumes: no more training, a fresh evaluation.
demo: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/rldiff train --model embedded --out $(OUT) --resume

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's chromium and its driver for the playground's browser test (tests/test_playground.py),
# where missing: installed with apt-get when run as root; elsewhere that test is skipped and says
# why (CI sets RLDIFF_REQUIRE_BROWSER=1: there it fails instead).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null || echo "apt-get could not install chromium" >&2; \
	else echo "no chromium or chromedriver, and no root apt-get to install them" >&2; fi

test: lint browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -p no:cacheprovider; \
	  status=$$?; if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test-slow: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m 'slow or gpu' -s

clean:
	rm -rf $(VENV) .cache runs
