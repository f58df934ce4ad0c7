# Set-up and the two jobs. Every target installs what it needs first, so each one works
# on a fresh machine; pip skips what is already installed.
#
# Packages go into the active venv if there is one, else into .venv/ (made here with
# python3 -m venv): a system Python such as Debian's refuses pip installs (PEP 668), and
# many systems have no `python` command at all.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PYTHON := $(VENV)/bin/python
# Recipes run the venv's commands (sail-fast, pytest, deepspeed) without activating it.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install install-latest constraints run lint test test-fast test-latest bench gpu-check

$(VENV)/bin/python:
	python3 -m venv $(VENV)

install: $(PYTHON)
	@echo "make: installing into $(VENV)/$(if $(VIRTUAL_ENV), (the active venv), (no venv is active: a venv of its own))"
	# torch first: 2.13.0 is the local CPU wheel on the development machines, and
	# deepspeed builds against the installed torch (hence --no-build-isolation).
	# Every package is pinned by constraints.txt, the set that last passed the tests.
	$(PYTHON) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PYTHON) -m pip install -q -c constraints.txt --no-build-isolation "deepspeed>=0.15"
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"

# The newest releases pyproject.toml's ranges allow (torch stays at the local wheel: an
# unpinned torch pulls several GB of CUDA packages). Use a fresh venv: it upgrades in place.
install-latest: $(PYTHON)
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -U --no-build-isolation "deepspeed>=0.15" "torch==2.13.0"
	$(PYTHON) -m pip install -q -U --upgrade-strategy eager -e ".[dev]" "torch==2.13.0"

# Re-pin: resolve the newest set in a fresh venv and write it to constraints.txt
# (then run `make test` on it before committing the new file).
constraints:
	rm -rf .venv-constraints
	python3 -m venv .venv-constraints
	$(MAKE) install-latest VIRTUAL_ENV=$(CURDIR)/.venv-constraints
	{ echo "# Every package make install resolved, pinned; regenerate with make constraints."; \
	  echo "# The ranges for library users stay in pyproject.toml."; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; \
	} > constraints.txt

# The SAIL loop on the offline toy world (about 9 minutes on a 2-core CPU); run again to
# resume an interrupted run from its last finished stage.
run: install
	sail-fast run --config configs/toy.yaml --resume

# importlib import mode (pyproject.toml) keeps the repository root off sys.path; kernels/
# hands the top-level name `kernels` to the Hugging Face package even where the root is on it.
# -n: tests run in parallel workers (pytest-xdist), one per core up to 4; worksteal keeps the minute-long
# tests from queueing behind one worker.
test: install lint
	HF_HUB_OFFLINE=1 pytest -p no:cacheprovider -n auto --maxprocesses 4 --dist worksteal --durations=15

# The unit tier: everything but the whole-run tests (tests/outcomes/) and the tests marked slow.
test-fast: install
	HF_HUB_OFFLINE=1 pytest -p no:cacheprovider -m "not slow" --durations=10

# Style that a tool keeps (pyproject.toml [tool.ruff]); `ruff format .` and `ruff check --fix .` mend it.
lint: install
	ruff format --check .
	ruff check .

# The suite on the newest releases instead of the pinned set (run it in a fresh venv).
test-latest: install-latest
	HF_HUB_OFFLINE=1 pytest -p no:cacheprovider --durations=15

bench: install
	mkdir -p bench/results
	HF_HUB_OFFLINE=1 pytest bench/ --benchmark-only --benchmark-json=bench/results/latest.json

# Everything that needs a GPU, in one run with one summary (DRY_RUN=1: the CPU rehearsal CI runs).
gpu-check: install
	bash bench/gpu_check.sh --out runs/gpu-check $(if $(DRY_RUN),--dry-run,)
