"""Seeds derived from a run's seed and a position, so every random draw is reproducible
from the config alone and independent of batching, rank count or resumption."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (well mixed, no collisions in practice)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(derive_seed(*parts))


# Seed streams: each kind of draw takes ``derive_seed(run seed, STREAM, position...)``, so no two kinds share
# random numbers. The values are the ones runs have always used: changing one changes what every run draws.
# "+ r": the round number is added (rounds 1..99 stay inside their hundred).
STAGE_TRAINING = 100  # + the stage (0 iter0, r round r): the seed a DPO stage trains with (sail/loop.py)
TOY_PROMPT_SPLIT = 7001  # the toy prompt pool's order: evaluation prompts and the rest (toy/world.py)
TOY_CLASSIFIER_SPLIT = 7002  # the digit classifier's held-out split and batches (toy/pretrain.py)
TOY_CLASSIFIER_INIT = 7003  # the digit classifier's initial weights
TOY_PRETRAIN_BATCHES = 7004  # the toy UNet's pretraining batches, timesteps and noise
TOY_LABEL_SAMPLES = 7010  # the two base samples per labelled prompt (toy/labels.py)
TOY_LABEL_CHOICES = 7011  # the simulated human's Bradley-Terry choices
TOY_REAL_DIGITS = 7020  # which real digits the toy's RealAlign folder holds (toy/world.py)
TOY_ROUND_PROMPTS = 8001  # the order the toy rounds take their prompts in (toy/run.py)
ROUND_CANDIDATES = 8100  # + r: each candidate's sampling seed (sail/pairing.py)
ROUND_RANKING_DRAWS = 8200  # + r: the K shared (t, eps) ranking draws per prompt (sail/ranking.py)
ROUND_RANDOM_PAIRS = 8300  # + r: the two candidates sail.pairing: random picks (sail/ranking.py)
ROUND_REAL_LOSERS = 8400  # + r: the seeds of RealAlign's regenerated losers (sail/real_pairs.py)
ROUND_REAL_MASKS = 8500  # + r: the regions RealAlign's losers regenerate
AUDIT_CANDIDATES = 8800  # the reward audit's candidates (toy/reward_audit.py)
AUDIT_DRAW_BANK = 8801  # the audit's bank of draws for its candidates
AUDIT_HELDOUT_BANK = 8802  # the audit's bank of draws for the held-out human pairs
AUDIT_SUBSETS = 8850  # the k-draw subsets the audit resamples from its bank
AUDIT_HELDOUT_SUBSETS = 8860  # the same for the held-out agreement
EVAL_SAMPLE_SEEDS = 9000  # every stage's evaluation samples: the same seeds at every stage (sail/evaluation.py)
EVAL_AGREEMENT_DRAWS = 9001  # the draws scoring the held-out human pairs (self-label agreement)
EVAL_LABEL_QUALITY_DRAWS = 9002  # the draws scoring a stage's own samples against the judge (sail/label_quality.py)
ROUND_SCORE_HELDOUT = 9003  # the draws the round score fits the held-out human pairs with (sail/round_score.py)
ROUND_SCORE_CONSISTENCY = 9004  # the round score's other prompts per sample
ROUND_SCORE_CONSISTENCY_DRAWS = (ROUND_SCORE_CONSISTENCY, 1)  # and its (t, eps) draws: a sub-stream of it
HELDOUT_SPLIT = 9005  # which seed pairs sail.heldout_split holds out of training (sail/loop.py)
