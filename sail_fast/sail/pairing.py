"""A round's pairs. Self pairs: candidates from the policy (saved, so a resumed round does not redraw
them), ranked (``ranking``), best against worst (or two at random, the ablation), gathered across ranks
into round order, with ``ranking.json`` and ``candidates.png`` beside them; with RealAlign's pairs
(``real_pairs``) added or instead, as ``sail.pair_sources`` says."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.latent_pairs import LatentPairs
from ..diffusion.images import image_grid
from ..diffusion.sampling import generate_candidates
from ..diffusion.stack import PromptEmbeds
from ..runs.readback import DamagedFileError, load_checked_tensors, save_checked_tensors
from ..runs.run_folder import write_json
from ..runs.seeding import ROUND_CANDIDATES, derive_seed
from .context import RunContext
from .evaluation import sample_diversity
from .label_quality import label_quality
from .ranking import Ranker, drop_non_finite, finite_mean_std, make_ranker, soft_labels
from .real_pairs import real_pairs


def candidates(ctx: RunContext, r: int, prompts: list[str], policy, embeds: PromptEmbeds) -> torch.Tensor:
    """N latents per prompt from the current policy (``embeds``: the prompts' own), saved so a resumed round
    skips sampling."""
    file, n = ctx.layout.candidates(r, ctx.dist.rank), ctx.sail.candidates
    if file.exists():
        fix = f"delete {file.parent}/ and rerun with --resume to sample it again"
        return saved_candidates(file, (len(prompts), n), fix)
    # Each candidate's seed is a function of (seed, round, its prompt's place in the round):
    # the round samples the same candidates whatever the number of ranks.
    seeds = torch.tensor(
        [
            [derive_seed(ctx.seed, ROUND_CANDIDATES + r, ctx.global_position(i), k) for k in range(n)]
            for i in range(len(prompts))
        ],
        dtype=torch.int64,
    ).view(len(prompts), n)
    latents = generate_candidates(
        ctx.stack_with(policy),
        prompts,
        n,
        seeds=seeds,
        batch_size=ctx.sail.generation_batch,
        progress=ctx.progress,
        prompt_embeds=embeds,
        **ctx.sampling,
    ).latents
    save_checked_tensors({"latents": latents}, file)  # with the sha256 of its contents: checked when read back
    return latents


def saved_candidates(file: Path, shape: tuple[int, int], fix: str) -> torch.Tensor:
    """A round's saved candidates [P, N, ...], checked against the sha256 written with them and the round's shape."""
    tensors, _ = load_checked_tensors(file, fix, require_digest=True)
    latents = tensors.get("latents")
    if latents is None or tuple(latents.shape[:2]) != shape:
        found = "no latents" if latents is None else f"latents {tuple(latents.shape)}"
        raise DamagedFileError(
            f"{file} holds {found}, not the round's {shape[0]} prompts x {shape[1]} candidates; {fix}"
        )
    return latents


def chosen_pairs(
    ctx: RunContext,
    prompts: list[str],
    embeds: PromptEmbeds,
    latents: torch.Tensor,
    win: torch.Tensor,
    lose: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> LatentPairs:
    """The (winner, loser) candidates of each prompt as LatentPairs, with ``embeds``: the prompts' and the
    empty prompt's embeddings (the last row, for caption dropout)."""
    rows = torch.arange(len(prompts))
    embeds = embeds.to("cpu", torch.float32)
    added = ctx.stack.added_cond_kwargs(embeds.index(list(range(len(prompts)))), *latents.shape[-2:])  # SDXL only
    time_ids = None if added is None else added["time_ids"].float().cpu()
    return LatentPairs(
        win=latents[rows, win].float(),
        lose=latents[rows, lose].float(),
        prompt_index=rows.clone(),
        prompts=list(prompts) + [""],
        prompt_embeds=embeds.prompt_embeds,
        pooled_prompt_embeds=embeds.pooled_prompt_embeds,
        time_ids_win=time_ids,
        time_ids_lose=None if time_ids is None else time_ids.clone(),
        label=torch.ones(len(prompts)) if labels is None else labels.float().cpu(),
        source=["online_dpo" if ctx.sail.ranker == "external" else "sail"] * len(prompts),
    )


def ranked_pairs(
    ctx: RunContext, ranker: Ranker, r: int, prompts: list[str], policy, reference, judge=None
) -> LatentPairs:
    """SAIL's (or OnlineDPO's) pairs: candidates of the round's prompts from ``policy``, ranked (by ``judge``'s
    implicit reward where given, else ``policy``'s), best against worst."""
    sail, dist = ctx.sail, ctx.dist
    mine = prompts[dist.rank :: dist.world_size]
    ctx.log(
        f"round {r}: {len(prompts)} prompts x {sail.candidates} candidates"
        + (f", dealt round-robin to {dist.world_size} ranks" if dist.enabled else "")
    )
    # The round's one text-encoder call: its prompts and the empty one, carried with the candidates to
    # sampling, ranking and the pairs.
    embeds = ctx.stack.encode_prompts(list(mine) + [""])
    own = embeds.index(list(range(len(mine))))
    latents = candidates(ctx, r, mine, policy, own)
    rewards, win, lose = ranker.rank(r, mine, own, latents, policy if judge is None else judge, reference)
    rewards, win, lose, keep, _ = drop_non_finite(rewards, latents, win, lose, best_worst=sail.pairing == "best_worst")
    judged = ctx.world.judge(latents, mine)  # the toy's noiseless human: a diagnostic the pairs never see
    quality = (
        None
        if judged is None
        else label_quality(
            {k: v[keep] for k, v in judged.items()}, rewards[keep], win[keep], lose[keep], ctx.world.reward_correlates
        )
    )
    labels = None
    if sail.soft_labels:
        labels = soft_labels(
            rewards,
            win,
            lose,
            sail.soft_label_temperature,
            sail.label_norm(),
            sail.soft_label_range or ranker.score_range,
        )
    gathered, order = ctx.gather_in_order(
        chosen_pairs(ctx, mine, embeds, latents, win, lose, labels), mine, rewards, keep
    )
    all_rewards = torch.cat([g[2] for g in gathered])[order]
    all_keep = torch.cat([g[3] for g in gathered])[order]
    # Prompts left with fewer than two finite candidates give no pair (counted and logged).
    pairs = LatentPairs.cat([g[0] for g in gathered]).subset(order[all_keep].tolist())
    all_prompts = [p for g in gathered for p in g[1]]
    dropped = int((~torch.isfinite(all_rewards)).sum())
    if dropped:
        ctx.log(
            f"round {r}: WARNING {dropped} candidates had a non-finite reward or latent and were dropped; "
            f"{int((~all_keep).sum())} prompts were left without a pair"
        )
    finite = all_rewards[all_keep]
    spread = finite.nan_to_num(float("-inf")).max(1).values - finite.nan_to_num(float("inf")).min(1).values
    ranking = {
        "prompts": [all_prompts[i] for i in order.tolist()],
        "rewards": [[v if math.isfinite(v) else None for v in row] for row in all_rewards.tolist()],
        "dropped_candidates": dropped,
        "prompts_without_pair": int((~all_keep).sum()),
        "reward_spread_mean": float(spread.mean()),
        "reward_spread_std": float(spread.std()) if len(spread) > 1 else 0.0,
        "reward_std_within_prompt": float(finite_mean_std(finite.double())[1].mean()) if len(finite) else float("nan"),
        "diversity": sample_diversity(latents),
        "reference": sail.ranking_reference,
        "frozen_judge": sail.frozen_judge,
        "pairing": sail.pairing,
        "ranker": sail.ranker_metric if sail.ranker == "external" else "implicit",
        "labels": pairs.label.tolist(),
        "label_norm": sail.label_norm() if sail.soft_labels else None,
    }
    if quality is not None:  # this rank's prompts (every prompt on a single process)
        ranking["label_quality"] = quality
    if dist.is_main:
        write_json(ctx.layout.ranking(r), ranking)
        candidate_grid(ctx, ctx.layout.candidate_grid(r), mine, latents, rewards, win, lose)
    ctx.log(
        f"round {r}: {len(pairs)} ranked pairs; reward spread {ranking['reward_spread_mean']:.3g} "
        f"(mean best - worst per prompt)"
    )
    return pairs


def candidate_grid(ctx: RunContext, path: Path, prompts, latents, rewards, win, lose) -> None:
    """Each row one prompt's candidates, best to worst, with W and L marked and the prompt under the first."""
    rows = min(ctx.sail.grid_prompts, len(prompts))
    order = rewards[:rows].argsort(dim=1, descending=True)  # each row best to worst
    picked = torch.stack([latents[p, order[p]] for p in range(rows)]).flatten(0, 1)
    images = ctx.pictures(picked)
    if images is None:
        return
    captions = []
    for p in range(rows):
        for k, n in enumerate(order[p].tolist()):
            mark = "W " if n == int(win[p]) else "L " if n == int(lose[p]) else ""
            captions.append((f"{prompts[p]}: " if k == 0 else "") + f"{mark}{rewards[p, n]:+.2f}")
    image_grid(images, columns=latents.shape[1], captions=captions).save(path)


def round_pairs(ctx: RunContext, real_set, r: int, prompts: list[str], policy, reference, judge=None) -> LatentPairs:
    """Every pair round r trains on (besides the seed), from each of ``sail.pair_sources`` (``judge``: the
    UNet whose implicit reward ranks the candidates, when not the policy that sampled them)."""
    parts = []
    if "self" in ctx.sail.pair_sources:
        parts.append(ranked_pairs(ctx, make_ranker(ctx), r, prompts, policy, reference, judge))
    if "real" in ctx.sail.pair_sources:
        parts.append(real_pairs(ctx, real_set, r, policy))
    return parts[0] if len(parts) == 1 else LatentPairs.cat(parts)
