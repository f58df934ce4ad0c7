#!/usr/bin/env bash
# Everything that needs a GPU in one run (see bench/gpu_check.py); --dry-run rehearses it on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_check.py "$@"
