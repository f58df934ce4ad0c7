"""Ranking a round's candidates: the ``Ranker`` protocol and its two kinds, and SmPO soft labels.

SAIL ranks with its own implicit reward (``ImplicitRanker``: ``reward.ImplicitRewardScorer`` against
the reference). OnlineDPO, the paper's Table 4 baseline, ranks the same candidates with an external
scorer instead (``ExternalRanker``: any ``sail_fast.metrics`` metric, on the decoded pictures). Either
way the pair is best against worst (or two at random, the ablation), and SmPO-style smoothing can turn
the two chosen candidates' scores into the probability that the winner is preferred.
"""

from __future__ import annotations

from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..diffusion.images import decode_latents
from ..diffusion.stack import DiffusionStack, PromptEmbeds
from ..metrics import Metric
from ..reward.scorer import Draws, ImplicitRewardScorer
from ..runs.config import SailConfig
from ..runs.seeding import ROUND_RANDOM_PAIRS, ROUND_RANKING_DRAWS, derive_seed
from .context import RunContext


def implicit_scorer(sail: SailConfig, beta: float, scheduler, policy, reference) -> ImplicitRewardScorer:
    """The implicit-reward scorer as a SAIL run sets it up, for ranking and evaluation alike: K = sail.num_draws,
    sail.scoring_batch noised latents per UNet call, sail.compile, sail's estimator and timestep band."""
    return ImplicitRewardScorer(
        policy,
        reference,
        scheduler,
        beta=beta,
        num_draws=sail.num_draws,
        micro_batch=sail.scoring_batch,
        compile=sail.compile,
        **sail.scorer_options(),
    )


def external_scores(
    metric: Metric, stack: DiffusionStack, prompts: list[str], latents: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """``metric``'s score of every candidate: latents [P, N, C, H, W] -> scores [P, N] (float32, CPU)."""
    num_prompts, n = latents.shape[:2]
    flat = latents.flatten(0, 1)
    per_image = [p for p in prompts for _ in range(n)]
    scores = []
    for start in range(0, len(flat), batch_size):
        pictures = decode_latents(flat[start : start + batch_size], stack.vae)
        scores.append(metric.score(pictures, per_image[start : start + batch_size]))
    return torch.cat(scores).view(num_prompts, n)


def finite_mean_std(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and (unbiased) std of scores [P, N] over the finite entries only: [P, 1] each."""
    finite = torch.isfinite(scores)
    count = finite.sum(dim=1, keepdim=True).clamp(min=1)
    mean = scores.where(finite, 0.0).sum(dim=1, keepdim=True) / count
    var = (scores - mean).where(finite, 0.0).pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    return mean, var.sqrt()


def soft_labels(
    scores: torch.Tensor,
    win: torch.Tensor,
    lose: torch.Tensor,
    temperature: float = 1.0,
    norm: str = "zscore",
    score_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """P(win preferred) per prompt: a two-way softmax over the pair's normalised scores,
    p = exp(n_w / T) / (exp(n_w / T) + exp(n_l / T)) = sigmoid((n_w - n_l) / T).

    ``norm="zscore"``: n = (s - mean) / std over the prompt's N candidates (scores [P, N]), so the label
    does not depend on the scorer's scale; a prompt whose candidates all score the same gets p = 0.5,
    and NaN scores (dropped candidates, ``drop_non_finite``) are left out of the mean and std.
    ``norm="minmax"``: SmPO-Diffusion's fixed map n = (s - lo) / (hi - lo), ``score_range = (lo, hi)``
    in the scorer's units, the same for every prompt (the authors' PickScore range:
    ``metrics.clip_metrics.PICKSCORE_COSINE_RANGE``).
    """
    scores = scores.double()
    if norm == "minmax":
        if score_range is None:
            raise ValueError("minmax soft labels need the score range (lo, hi); set sail.soft_label_range")
        lo, hi = score_range
        n = (scores - lo) / (hi - lo)
    elif norm == "zscore":
        mean, std = finite_mean_std(scores)
        n = (scores - mean) / torch.where(std > 0, std, torch.ones_like(std))
    else:
        raise ValueError(f"unknown soft label normalisation {norm!r}; choose zscore or minmax")
    rows = torch.arange(len(scores))
    return torch.sigmoid((n[rows, win] - n[rows, lose]) / temperature).float()


def drop_non_finite(
    scores: torch.Tensor, latents: torch.Tensor, win: torch.Tensor, lose: torch.Tensor, best_worst: bool = True
):
    """Keep non-finite candidates out of the pairs.

    A candidate is dropped when its score or any of its latent values is NaN or infinite (one NaN
    pixel would otherwise make it both the best and the worst of its prompt). Best/worst pairs are
    re-chosen among the finite candidates; random pairs that drew a dropped candidate are dropped.
    Returns (scores with NaN for the dropped, win, lose, keep [P] bool: prompts with a pair left,
    the number of dropped candidates)."""
    finite = torch.isfinite(scores) & torch.isfinite(latents.flatten(2).float()).all(-1).to(scores.device)
    dropped = int((~finite).sum())
    scores = scores.float().masked_fill(~finite, float("nan"))
    keep = finite.sum(1) >= 2
    if dropped == 0:
        return scores, win, lose, keep, 0
    if best_worst:
        win = scores.masked_fill(~finite, float("-inf")).argmax(1)
        lose = scores.masked_fill(~finite, float("inf")).argmin(1)
    else:
        rows = torch.arange(len(scores))
        keep &= finite[rows, win] & finite[rows, lose]
    return scores, win, lose, keep, dropped


class Ranker(Protocol):
    score_range: tuple[float, float] | None  # the scores' published (lo, hi), for minmax soft labels

    def rank(self, r: int, prompts: list[str], embeds: PromptEmbeds, latents: torch.Tensor, policy, reference):
        """Scores [P, N] of every candidate of latents [P, N, ...] and the (winner, loser) index per prompt
        (``embeds``: the prompts' text embeddings, one row each)."""


class _Pairing:
    """Best against worst, or the ablation: two random candidates per prompt, ordered by their score."""

    score_range = None

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def choose(self, r: int, idx: list[int], scores: torch.Tensor):
        if self.ctx.sail.pairing == "best_worst":
            return scores.argmax(1), scores.argmin(1)
        win, lose = [], []
        for row, i in enumerate(idx):
            gen = torch.Generator().manual_seed(
                derive_seed(self.ctx.seed, ROUND_RANDOM_PAIRS + r, self.ctx.global_position(i))
            )
            a, b = torch.randperm(self.ctx.sail.candidates, generator=gen)[:2].tolist()
            if scores[row, b] > scores[row, a]:
                a, b = b, a
            win.append(a)
            lose.append(b)
        return torch.tensor(win), torch.tensor(lose)


class ExternalRanker(_Pairing):
    """OnlineDPO: ``sail.ranker_metric`` scores the decoded candidates."""

    def __init__(self, ctx: RunContext) -> None:
        from ..metrics import load_metric

        super().__init__(ctx)
        name = ctx.sail.ranker_metric
        self.metric = load_metric(name, ctx.sail.ranker_weights, device=ctx.device, **ctx.world.metric_options(name))
        self.score_range = self.metric.soft_label_range

    def rank(self, r, prompts, embeds, latents, policy, reference):
        scores = external_scores(
            self.metric, self.ctx.stack, prompts, latents, batch_size=self.ctx.sail.generation_batch
        )
        return scores, *self.choose(r, list(range(len(prompts))), scores)


class ImplicitRanker(_Pairing):
    """SAIL: the policy's implicit reward against ``reference``, K shared draws per prompt."""

    def rank(self, r, prompts, embeds, latents, policy, reference):
        ctx, sail = self.ctx, self.ctx.sail
        scorer = implicit_scorer(sail, ctx.beta, ctx.stack.scheduler, policy, reference)
        height, width = latents.shape[-2:]
        chunk = max(1, sail.scoring_batch // (sail.candidates * sail.num_draws))
        rewards, win, lose = [], [], []
        with scorer.scoring_layout():  # the weights copied to channels_last once for all chunks, not per chunk
            for start in tqdm(
                range(0, len(prompts), chunk), desc=f"round {r} rank", unit="chunk", disable=not ctx.progress
            ):
                idx = list(range(start, min(start + chunk, len(prompts))))
                draws = self.draws(r, idx, latents.shape[2:], scorer)
                part = embeds.index(idx).to(ctx.device, scorer.dtype)
                added = ctx.stack.added_cond_kwargs(part, height, width)
                chosen = scorer.best_worst(
                    latents[idx].to(ctx.device),
                    part.prompt_embeds,
                    added_cond_kwargs=added,
                    timesteps=draws.timesteps,
                    noise=draws.noise,
                    adaptive=sail.adaptive and sail.pairing == "best_worst",
                )
                scores = chosen.rewards.float().cpu()
                rewards.append(scores)
                if sail.pairing == "best_worst":
                    win.append(chosen.best.cpu())
                    lose.append(chosen.worst.cpu())
                else:
                    w, lo = self.choose(r, idx, scores)
                    win.append(w)
                    lose.append(lo)
        return torch.cat(rewards), torch.cat(win), torch.cat(lose)

    def draws(self, r: int, idx: list[int], latent_shape, scorer: ImplicitRewardScorer) -> Draws:
        """K draws per prompt, a function of (seed, round, the prompt's global position) only."""
        per_prompt = [
            scorer.sample_draws(
                1,
                tuple(latent_shape),
                generator=torch.Generator().manual_seed(
                    derive_seed(self.ctx.seed, ROUND_RANKING_DRAWS + r, self.ctx.global_position(i))
                ),
            )
            for i in idx
        ]
        return Draws(torch.cat([d.timesteps for d in per_prompt]), torch.cat([d.noise for d in per_prompt]))


def make_ranker(ctx: RunContext) -> Ranker:
    return ExternalRanker(ctx) if ctx.sail.ranker == "external" else ImplicitRanker(ctx)
