"""The round score: what a run can see of each stage with nothing but its own data (the human pairs it held
out, the base model, the stage's policy and samples), never a judge. ``sail.select`` and ``sail.early_stop``
(``sail_fast.sail.selection``) read it; the toy writes it beside its oracle columns so their relation shows.

- ``heldout_dpo_loss``: the Diffusion-DPO loss of the held-out human pairs with the base as the reference,
  ``-log sigmoid(r_w - r_l)`` where ``r`` is the implicit reward (the mean over ``HELDOUT_DRAWS`` uniform-t
  draws, shared by a pair's two images and fixed across stages). The base scores log 2; a stage below it
  predicts the held-out labels better than chance. It is the validation loss of the reward the policy has
  become: it falls while the policy moves the way the labels point, and rises once the move is larger than
  the labels support (the wrong-side pairs cost in proportion to the reward's size), as on overshoot.
- ``heldout_accuracy``: the share of those pairs whose winner gets the higher reward (same draws), of
  ``heldout_pairs`` pairs (``select: tested`` tests it against chance at that count).
- ``heldout_margins``: each held-out pair's ``r_w - r_l``, in the pairs' order: the same pairs on the same
  draws at every stage, so stages pair pair by pair (and a loss calibrated per stage can be fitted later).
- ``heldout_drift``: the policy's denoising error on the held-out images (winners and losers) at the same
  draws, relative to the base's (0 at the base): it rises when the policy leaves the images people label.
- ``prompt_consistency``: the base UNet as a zero-shot judge of whether the stage's evaluation samples
  show their prompt: the base's error on a sample under ``OTHER_PROMPTS`` other evaluation prompts,
  relative to under its own (``mean other / mean own - 1``, every condition on the same draws). It falls
  when samples drift off their prompt (the toy's wrong digit; on Stable Diffusion, prompt fidelity).
- ``prompt_choice_accuracy``: the share of samples whose own prompt gives the base its lowest error of
  the ``1 + OTHER_PROMPTS``. It compares the prompts' errors sample by sample, so a change that raises the
  base's error under every prompt alike (a new style) leaves it alone, where it lowers the ratio above.
- ``prompt_choice_by_prompt``: that share per evaluation prompt (``select: tested`` pairs it with the base's).
- ``prompt_consistency_by_prompt``: the same ratio per evaluation prompt, in the prompts' order. Every stage
  samples the same prompts from the same seeds and is denoised on the same draws, so a stage's values pair
  with the base's prompt by prompt (``select: paired`` tests the drop against its SE).

The chosen pairs' reward margins (``reward_spread_mean``, over-confident self-labels) are the ranking's own
record (``ranking.json``); ``metric_rows`` puts them in the same row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.latent_pairs import LatentPairs
from ..diffusion.noising import noised_and_target
from ..diffusion.stack import DiffusionStack
from ..reward.scorer import ImplicitRewardScorer
from ..runs.seeding import ROUND_SCORE_CONSISTENCY, ROUND_SCORE_CONSISTENCY_DRAWS, ROUND_SCORE_HELDOUT, derive_seed

HELDOUT_DRAWS = 16  # per held-out pair: 100 pairs x 2 images x 16 draws x 2 UNets is 6,400 forwards
CONSISTENCY_DRAWS = 2  # per evaluation sample, shared by its own and its other prompts
OTHER_PROMPTS = 3  # the other evaluation prompts each sample is also denoised under
SCORE_KEYS = (
    "heldout_dpo_loss",
    "heldout_accuracy",
    "heldout_drift",
    "prompt_consistency",
    "prompt_choice_accuracy",
    "prompt_consistency_by_prompt",
    "prompt_choice_by_prompt",
    "heldout_pairs",
    "heldout_margins",
)


@torch.no_grad()
def heldout_fit(policy, base, scheduler, pairs: LatentPairs, *, beta: float, seed: int, micro_batch: int) -> dict:
    """``heldout_dpo_loss``, ``heldout_accuracy`` and ``heldout_drift`` of ``policy`` (module docstring)."""
    if policy is base:  # the reward is 0 on every pair: the loss is log 2, the drift 0
        return {
            "heldout_dpo_loss": math.log(2.0),
            "heldout_accuracy": 0.5,
            "heldout_drift": 0.0,
            "heldout_pairs": len(pairs),
            "heldout_margins": [0.0] * len(pairs),
        }
    scorer = ImplicitRewardScorer(
        policy, base, scheduler, beta=beta, num_draws=HELDOUT_DRAWS, micro_batch=micro_batch, estimator="mean"
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, ROUND_SCORE_HELDOUT))
    mse_policy, mse_ref = (m.double() for m in scorer.pair_mse(pairs, generator=generator))  # [P, 2, K]
    reward = -0.5 * beta * (mse_policy - mse_ref).mean(-1)  # [P, 2]: winner, loser
    margin = reward[:, 0] - reward[:, 1]
    return {
        "heldout_dpo_loss": float(-F.logsigmoid(margin).mean()),
        "heldout_accuracy": float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean()),  # a tie is chance
        "heldout_drift": float(mse_policy.mean() / mse_ref.mean() - 1.0),
        "heldout_pairs": len(margin),
        "heldout_margins": margin.tolist(),
    }


def other_prompts(num_prompts: int, seed: int) -> torch.Tensor:
    """[P, OTHER_PROMPTS] indices: for each prompt, distinct other prompts, the same at every stage."""
    others = min(OTHER_PROMPTS, num_prompts - 1)
    generator = torch.Generator().manual_seed(derive_seed(seed, ROUND_SCORE_CONSISTENCY))
    shifts = torch.randperm(num_prompts - 1, generator=generator)[:others] + 1  # 1..P-1: never the prompt itself
    return (torch.arange(num_prompts)[:, None] + shifts[None]) % num_prompts


@torch.no_grad()
def prompt_consistency(
    stack: DiffusionStack, base, latents: torch.Tensor, prompts: list[str], *, seed: int, batch: int
) -> dict:
    """``prompt_consistency`` and ``prompt_choice_accuracy`` of samples ``latents`` [P, n, C, H, W] of ``prompts``."""
    num_prompts, n = latents.shape[:2]
    if num_prompts < 2:
        return {}
    conditions = torch.cat([torch.arange(num_prompts)[:, None], other_prompts(num_prompts, seed)], 1)  # [P, 1 + O]
    embeds = stack.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(derive_seed(seed, *ROUND_SCORE_CONSISTENCY_DRAWS))
    samples = latents.flatten(0, 1).float()  # [P * n, ...], prompt p's samples at rows p * n ...
    timesteps = torch.randint(
        0, stack.scheduler.config.num_train_timesteps, (len(samples), CONSISTENCY_DRAWS), generator=generator
    )
    noise = torch.randn((len(samples), CONSISTENCY_DRAWS, *samples.shape[1:]), generator=generator)
    # One row per (sample, condition, draw), every condition of a sample on the same draws.
    s, c, d = torch.meshgrid(
        torch.arange(len(samples)), torch.arange(conditions.shape[1]), torch.arange(CONSISTENCY_DRAWS), indexing="ij"
    )
    s, c, d = s.flatten(), c.flatten(), d.flatten()
    prompt_of = conditions[s // n, c]
    errors = torch.empty(len(s), dtype=torch.float64)
    device, dtype = stack.device, next(base.parameters()).dtype
    for start in range(0, len(s), batch):
        rows = slice(start, start + batch)
        t = timesteps[s[rows], d[rows]].to(device)
        x_t, target = noised_and_target(
            stack.scheduler, samples[s[rows]].to(device), noise[s[rows], d[rows]].to(device), t
        )
        chosen = embeds.index(prompt_of[rows].tolist()).to(device, dtype)
        added = stack.added_cond_kwargs(chosen, *samples.shape[-2:])
        pred = base(x_t.to(dtype), t, encoder_hidden_states=chosen.prompt_embeds, added_cond_kwargs=added).sample
        errors[rows] = (pred.float() - target.float()).pow(2).flatten(1).mean(1).double().cpu()
    errors = errors.view(len(samples), conditions.shape[1], CONSISTENCY_DRAWS).mean(-1)  # [P * n, 1 + O]
    own, other = errors[:, 0], errors[:, 1:]
    own_p, other_p = own.view(num_prompts, n).mean(1), other.reshape(num_prompts, -1).mean(1)
    chose_own = (own < other.min(1).values).double()  # [P * n]
    return {
        "prompt_consistency": float(other.mean() / own.mean() - 1.0),
        "prompt_choice_accuracy": float(chose_own.mean()),
        "prompt_consistency_by_prompt": (other_p / own_p - 1.0).tolist(),
        "prompt_choice_by_prompt": chose_own.view(num_prompts, n).mean(1).tolist(),
    }
