"""Full-label Diffusion-DPO on the toy with SDPO's winner-preserving scale (mu 0.9): is the collapse seen on
SAIL's rounds SAIL's or the scale's? The experiment's dpo-full overrides plus the scale, for one seed of an
existing `sail-fast toy experiment` folder (its labelled pairs are reused):

    python bench/toy_dpo_winner_preserving.py runs/experiment 0   # -> runs/experiment/seed-0/dpo-full-winner-preserving
"""

import sys
from pathlib import Path

from sail_fast.commands.train import run_sail
from sail_fast.runs.config import load_config
from sail_fast.toy.studies.experiment import condition_overrides

out, seed = Path(sys.argv[1]), int(sys.argv[2])
seed_dir = out / f"seed-{seed}"
overrides = [
    o
    for o in condition_overrides("dpo-full", seed, seed_dir, load_config("configs/toy.yaml"), 2)
    if not o.startswith("output_dir=")
]
overrides += [
    f"output_dir={seed_dir / 'dpo-full-winner-preserving'}",
    "train.winner_preserving_mu=0.9",
    "train.progress=false",
]
run_sail(load_config("configs/toy.yaml", overrides))
