# Set-up and the two jobs. Every target installs what it needs first, so each one works
# on a fresh machine; pip skips what is already installed.
PYTHON ?= python

.PHONY: install run test bench gpu-check

install:
	# torch first: 2.13.0 is the local CPU wheel on the development machines, and
	# deepspeed builds against the installed torch (hence --no-build-isolation).
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(PYTHON) -m pip install -q -e ".[dev]"

# The SAIL loop on the offline toy world (about 9 minutes on a 2-core CPU); run again to
# resume an interrupted run from its last finished stage.
run: install
	sail-fast run --config configs/toy.yaml --resume

# `pytest`, not `python -m pytest`: the latter puts the repository root on sys.path,
# where kernels/ would shadow the Hugging Face `kernels` package.
test: install
	HF_HUB_OFFLINE=1 pytest -p no:cacheprovider --durations=15

bench: install
	mkdir -p bench/results
	HF_HUB_OFFLINE=1 pytest bench/ --benchmark-only --benchmark-json=bench/results/latest.json

# Everything that needs a GPU, in one run with one summary (DRY_RUN=1: the CPU rehearsal CI runs).
gpu-check: install
	bash bench/gpu_check.sh --out runs/gpu-check $(if $(DRY_RUN),--dry-run,)
