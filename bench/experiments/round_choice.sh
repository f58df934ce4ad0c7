#!/usr/bin/env bash
# One world-seed of the round-choice experiment (bench/results/round_choice.md): the SAIL rounds held to
# the base, DPO-6% and DPO-100% under the loop's own sampler (DDIM 10), then every stage sampled again
# under DDPM 50 (`sail-fast toy transfer`). One CPU thread. Finished stages are kept, so running it again
# resumes where it stopped. `nice` below ranks it only within its own session: where the kernel groups each
# session (sched_autogroup, as on the development machines), a job started with setsid takes an equal share
# whatever its nice; lower it with `echo 19 > /proc/PID/autogroup`.
#
#   bench/experiments/round_choice.sh WORLD SEED [OUT [--set KEY=VALUE ...]]   WORLD: builtin, bold or thin; OUT: exp
#   sail-fast toy round-choice --worlds built-in=OUT/builtin-default bold=OUT/bold-default \
#       thin=OUT/thin-default --seeds SEED [--variant ddpm-50]
#
# The numbers depend on the CPU kernels torch dispatches to (run.json records them). The records in
# round_choice.md up to seed 3 ran AVX2 kernels; on an AVX-512 machine, export ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 first to reproduce them (checked: built-in seed 1's
# iter0 row to every printed digit; without them its held-out loss is 3.0291 instead of 3.0364), at about
# 1.25x the time.
#
# Run it from the checkout it belongs to, with that checkout's own venv (`make install` there): an editable
# install elsewhere imports that other tree, and the runs would not be of the commit they name.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd -P)
imported=$(python3 -c 'import pathlib, sail_fast; print(pathlib.Path(sail_fast.__file__).resolve().parents[1])')
if [[ $imported != "$here" ]]; then
    echo "python3 here imports sail_fast from $imported, not from this checkout ($here): activate $here's venv" >&2
    exit 2
fi
world=${1:?world: builtin, bold or thin} seed=${2:?seed}
out=${3:-exp}/$world-default
extra=("${@:4}") # more config overrides for the SAIL run, e.g. --set sail.soup=true (plan, addendum 13)
case $world in
    builtin) human=() code=() ;;
    # The stroke humans are code (configs/preferences/strokes.py); the transfer reads the preference back
    # from the run's recorded config, which it runs only when told to.
    bold | thin)
        human=(--set "toy.preference=configs/preferences/strokes.py:$world" --set toy.temperature=auto)
        code=(--trust-code)
        ;;
    *) echo "unknown world '$world': use builtin, bold or thin" >&2 && exit 2 ;;
esac
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
# The label-quality diagnostic (how well each stage's reward ranks its own samples by the judge) is about a sixth
# of a round's UNet calls; nothing on the round-choice page reads it, and its draws are a stream of their own.
nice -n 5 sail-fast toy experiment --config configs/toy.yaml --out "$out" --seeds "$seed" \
    --conditions sail dpo-6 dpo-full --set sail.training_reference=base --set sail.eval_label_quality=false \
    "${human[@]}" "${extra[@]}"
nice -n 5 sail-fast toy transfer "$out" --seeds "$seed" --sampler ddpm --steps 50 --batch-size 64 "${code[@]}"
