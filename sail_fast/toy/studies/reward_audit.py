"""``sail-fast toy reward-audit RUN``: what a finished toy run's implicit reward measures, policy by policy.

For iter0 and every round's policy: candidates of prompts no round used, sampled the loop's way (the
same seeds for every policy, and for the base, so a candidate's distance from the base is the distance
between the two models' pictures of one seed), judged by the noiseless human, and a fixed bank of
``draws`` shared (t, eps) draws per prompt, scored once (policy and reference MSE per candidate and
draw). Every estimator is then a choice of draws from the bank and a way to combine them
(``sail_fast.reward.estimators``), repeated ``repeats`` times on fresh subsets:

- by K: the plain estimator (mean over uniform t) with K draws; its test-retest (two disjoint
  subsets); the noise-corrected correlation with the human (rho_K / sqrt(retest_K));
- by timestep band and stratified (one draw per 1000/K slice of t);
- a draw's spread across candidates by t;
- every estimator, with uniform t and with t in [0, 250), at the loop's K and at 10;
- what the reward tracks, with all draws: stroke width (ink), legibility (the classifier's log p of
  the prompted digit), distance from the base, a regression on human score and width together, the
  "least ink" ranker, and wrong digits picked as best or worst;
- agreement with the run's held-out human pairs, the only criterion a real run could use;
- each K's cost in UNet forwards (policy and reference, per prompt).

Standard errors are bootstrapped over prompts. Writes a Markdown report and its numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...reward.estimators import ESTIMATORS, combine_draws
from ...reward.scorer import Draws, ImplicitRewardScorer
from ...runs.layout import RunLayout
from ...runs.seeding import (
    AUDIT_CANDIDATES,
    AUDIT_DRAW_BANK,
    AUDIT_HELDOUT_BANK,
    AUDIT_HELDOUT_SUBSETS,
    AUDIT_SUBSETS,
    derive_seed,
)
from ...sail.label_quality import rowwise_spearman
from .estimator_choice import RULE_KS, SELECTION_RULE, apply_selection_rule, setting_name

BANDS = ((0, 100), (0, 250), (250, 500), (500, 750), (750, 1000))
SPREAD_BANDS = ((0, 100), (100, 250), (250, 500), (500, 750), (750, 900), (900, 1000))
LOW_BAND = (0, 250)

# ----------------------------------------------------------------------------- per-prompt statistics


def choice_stats(rewards: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    """Per prompt: Spearman with the human, best-worst accuracy (ties half) and the chosen pair's human gap;
    NaN for a prompt without rewards (a band that holds none of its draws)."""
    rows, ok = np.arange(len(rewards)), np.isfinite(rewards).all(1)
    gap = score[rows, rewards.argmax(1)] - score[rows, rewards.argmin(1)]
    accuracy = (gap > 0) + 0.5 * (gap == 0)
    return {
        "spearman": rowwise_spearman(rewards, score),
        "accuracy": np.where(ok, accuracy, np.nan),
        "gap": np.where(ok, gap, np.nan),
    }


def bootstrap_se(values: np.ndarray, rng: np.random.Generator, times: int = 200) -> float:
    """Standard error of the mean over prompts (NaN prompts left out), by resampling prompts."""
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan")
    means = values[rng.integers(0, len(values), (times, len(values)))].mean(1)
    return float(means.std(ddof=1))


def _rng(seed: int, *key) -> np.random.Generator:
    """A generator fixed by the run's seed and a key of ints and names (a name enters by its CRC-32)."""
    parts = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(derive_seed(seed, *parts) % 2**32)


# ----------------------------------------------------------------------------- draw subsets


def random_subsets(num_prompts: int, bank: int, k: int, rng: np.random.Generator, *, pool=None) -> list[np.ndarray]:
    """Per prompt, k bank indices drawn without replacement (from ``pool[p]`` when given; all of a pool
    smaller than k)."""
    out = []
    for p in range(num_prompts):
        choices = np.arange(bank) if pool is None else pool[p]
        out.append(rng.choice(choices, size=min(k, len(choices)), replace=False))
    return out


def stratified_subsets(
    timesteps: np.ndarray, k: int, rng: np.random.Generator, num_train: int = 1000
) -> list[np.ndarray]:
    """Per prompt, one bank draw from each of k equal slices of [0, num_train) (an empty slice: any draw)."""
    edges = np.linspace(0, num_train, k + 1)
    out = []
    for row in timesteps:
        picks = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = np.flatnonzero((row >= lo) & (row < hi))
            picks.append(rng.choice(inside if len(inside) else np.arange(len(row))))
        out.append(np.array(picks))
    return out


def rewards_of(
    mse_pol: torch.Tensor, mse_ref: torch.Tensor, subsets: list[np.ndarray], beta: float, estimator: str
) -> np.ndarray:
    """Rewards [P, N] of each prompt's candidates from its own subset of bank draws (NaN: an empty subset)."""
    return np.stack(
        [
            combine_draws(mse_pol[p : p + 1, :, idx], mse_ref[p : p + 1, :, idx], beta, estimator)[0].double().numpy()
            if len(idx)
            else np.full(mse_pol.shape[1], np.nan)
            for p, idx in enumerate(map(torch.as_tensor, subsets))
        ]
    )


# ----------------------------------------------------------------------------- one policy


class PolicyAudit:
    """The bank's MSE tables for one policy's candidates and every statistic drawn from them."""

    def __init__(self, mse_pol, mse_ref, timesteps, judged, distance, beta, *, repeats, seed) -> None:
        self.mse_pol, self.mse_ref, self.beta = mse_pol.double(), mse_ref.double(), beta
        self.t = timesteps.numpy()
        self.judged = {k: v.double().numpy() for k, v in judged.items()}
        self.distance = distance.double().numpy()
        self.repeats, self.seed = repeats, seed
        self.num_prompts, self.bank = mse_pol.shape[0], mse_pol.shape[2]

    def rng(self, *key) -> np.random.Generator:
        return _rng(self.seed, AUDIT_SUBSETS, *key)

    def _summary(self, per_prompt: dict[str, np.ndarray], rng) -> dict:
        score = self.judged["score"]
        own = float((score.max(1) - score.min(1)).mean())
        return {
            "spearman": float(np.nanmean(per_prompt["spearman"])),
            "spearman_se": bootstrap_se(per_prompt["spearman"], rng),
            "accuracy": float(np.nanmean(per_prompt["accuracy"])),
            "accuracy_se": bootstrap_se(per_prompt["accuracy"], rng),
            "gap_share": float(np.nanmean(per_prompt["gap"]) / own) if own > 0 else float("nan"),
        }

    def estimate(
        self,
        k: int,
        *,
        estimator: str = "mean",
        band: tuple[int, int] | None = None,
        stratified: bool = False,
        retest: bool = True,
    ) -> dict:
        """Human agreement (mean over repeats, per prompt, then SE over prompts), test-retest and the
        correlations with width and log p, of ``estimator`` on k draws (uniform t, a band, or stratified)."""
        rng = self.rng(k, estimator, str(band), stratified)
        pool = None if band is None else [np.flatnonzero((row >= band[0]) & (row < band[1])) for row in self.t]
        stats, retests, width, log_prob, wrong = [], [], [], [], []
        for _ in range(self.repeats):
            if stratified:
                first = stratified_subsets(self.t, k, rng)
            else:
                both = random_subsets(self.num_prompts, self.bank, 2 * k if retest else k, rng, pool=pool)
                first = [idx[:k] for idx in both]
            rewards = rewards_of(self.mse_pol, self.mse_ref, first, self.beta, estimator)
            stats.append(choice_stats(rewards, self.judged["score"]))
            width.append(rowwise_spearman(rewards, self.judged["width"]))
            log_prob.append(rowwise_spearman(rewards, self.judged["log_prob"]))
            rows = np.arange(len(rewards))
            wrong.append(
                [
                    (self.judged["correct"][rows, rewards.argmax(1)] == 0).sum(),
                    (self.judged["correct"][rows, rewards.argmin(1)] == 0).sum(),
                ]
            )
            if retest and not stratified and all(len(idx) >= 2 * k for idx in both):
                second = [idx[k : 2 * k] for idx in both]
                retests.append(
                    rowwise_spearman(rewards, rewards_of(self.mse_pol, self.mse_ref, second, self.beta, estimator))
                )
        per_prompt = {key: np.nanmean(np.stack([s[key] for s in stats]), 0) for key in stats[0]}
        out = self._summary(per_prompt, rng) | {
            "k": k,
            "retest": float(np.nanmean(np.stack(retests))) if retests else float("nan"),
            "width_spearman": float(np.nanmean(np.stack(width))),
            "log_prob_spearman": float(np.nanmean(np.stack(log_prob))),
            "best_wrong_digit": float(np.mean([w[0] for w in wrong])),
            "worst_wrong_digit": float(np.mean([w[1] for w in wrong])),
            "unet_forwards_per_prompt": 2 * self.mse_pol.shape[1] * k,
        }
        if pool is not None:
            out["band_draws_per_prompt"] = float(np.mean([len(p) for p in pool]))
        return out

    def spread_by_t(self) -> dict[str, float]:
        """Mean over prompts and draws of a draw's std of the reward gap across candidates, per t band."""
        gap = -0.5 * self.beta * (self.mse_pol - self.mse_ref)
        spread = gap.std(1).numpy()  # [P, D]
        out = {}
        for lo, hi in SPREAD_BANDS:
            inside = (self.t >= lo) & (self.t < hi)
            out[f"[{lo}, {hi})"] = float(spread[inside].mean()) if inside.any() else float("nan")
        return out

    def what_it_tracks(self) -> dict:
        """With every bank draw: the reward's within-prompt correlations, a regression on human score and
        width (within-prompt z-scores, pooled; SE over prompts), and the "least ink" ranker."""
        rewards = combine_draws(self.mse_pol, self.mse_ref, self.beta).numpy()
        j, rng = self.judged, self.rng("tracks")
        least_ink = choice_stats(-j["width"], j["score"])
        out = {
            "human_spearman": float(np.nanmean(rowwise_spearman(rewards, j["score"]))),
            "width_spearman": float(np.nanmean(rowwise_spearman(rewards, j["width"]))),
            "log_prob_spearman": float(np.nanmean(rowwise_spearman(rewards, j["log_prob"]))),
            "distance_spearman": float(np.nanmean(rowwise_spearman(rewards, self.distance))),
            "least_ink_accuracy": float(np.mean(least_ink["accuracy"])),
            "wrong_digit_chance": float((1 - j["correct"]).mean(1).sum()),
        }

        def z(x):
            sd = x.std(1, keepdims=True)
            return (x - x.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)

        zr, zs, zw = z(rewards), z(j["score"]), z(j["width"])

        def fit(rows):
            design = np.stack([zs[rows].ravel(), zw[rows].ravel()], 1)
            return np.linalg.lstsq(design, zr[rows].ravel(), rcond=None)[0]

        coef = fit(np.arange(self.num_prompts))
        boot = np.stack([fit(rng.integers(0, self.num_prompts, self.num_prompts)) for _ in range(200)])
        return out | {
            "human_coef": float(coef[0]),
            "human_coef_se": float(boot[:, 0].std(ddof=1)),
            "width_coef": float(coef[1]),
            "width_coef_se": float(boot[:, 1].std(ddof=1)),
        }


# ----------------------------------------------------------------------------- the run


def _bank(num_prompts: int, num_draws: int, shape, seed: int, salt: int) -> Draws:
    """``num_draws`` uniform-t draws per prompt, fixed by (seed, salt, prompt): the same for every policy."""
    t, eps = [], []
    for p in range(num_prompts):
        gen = torch.Generator().manual_seed(derive_seed(seed, salt, p))
        t.append(torch.randint(0, 1000, (num_draws,), generator=gen))
        eps.append(torch.randn((num_draws, *shape), generator=gen))
    return Draws(torch.stack(t), torch.stack(eps))


def _bank_mse(scorer: ImplicitRewardScorer, latents, embeds, draws: Draws, desc: str, progress: bool, chunk: int = 4):
    """Policy and reference MSE [P, N, D] on the bank, a few prompts at a time (for the progress bar)."""
    per_candidate = embeds.shape[0] != latents.shape[0]
    n, pol, ref = latents.shape[1], [], []
    for start in tqdm(range(0, latents.shape[0], chunk), desc=desc, unit="chunk", disable=not progress, leave=False):
        stop = min(start + chunk, latents.shape[0])
        part = embeds[start * n : stop * n] if per_candidate else embeds[start:stop]
        p, r = scorer.per_draw_mse(
            latents[start:stop], part, Draws(draws.timesteps[start:stop], draws.noise[start:stop])
        )
        pol.append(p.cpu())
        ref.append(r.cpu())
    return torch.cat(pol), torch.cat(ref)


def heldout_agreement(mse_pol, mse_ref, beta, k, estimator, band, timesteps, repeats, seed) -> tuple[float, float]:
    """Share of held-out human pairs (candidate 0 the human's winner) the estimator orders the same way;
    ties half. Mean over repeats of k-draw subsets, and its SE over pairs."""
    rng = _rng(seed, AUDIT_HELDOUT_SUBSETS, k, estimator, band)
    t = timesteps.numpy()
    pool = None if band is None else [np.flatnonzero((row >= band[0]) & (row < band[1])) for row in t]
    hits = []
    for _ in range(repeats):
        rewards = rewards_of(mse_pol, mse_ref, random_subsets(len(t), t.shape[1], k, rng, pool=pool), beta, estimator)
        hit = (rewards[:, 0] > rewards[:, 1]) + 0.5 * (rewards[:, 0] == rewards[:, 1])
        hits.append(np.where(np.isfinite(rewards).all(1), hit, np.nan))
    per_pair = np.nanmean(hits, 0)
    return float(np.nanmean(per_pair)), bootstrap_se(per_pair, rng)


def policy_stages(run: Path, rounds: int, folder: str, iter0_from: str | None) -> list[tuple[str, Path]]:
    """(stage name, policy folder) for iter0 and every finished round."""
    layout = RunLayout(run, iter0_from)
    stages = [(RunLayout.stage_name(r), layout.final(r) / folder) for r in range(rounds + 1)]
    return [(name, path) for name, path in stages if path.is_dir()]


def _check_arguments(prompts, candidates, draws, ks, band_k, repeats, heldout_draws) -> None:
    if draws < 2 or prompts < 2 or candidates < 2:
        raise ValueError(
            f"reward-audit needs at least 2 prompts, 2 candidates and 2 draws, got {prompts}, {candidates}, {draws}"
        )
    if min(ks, default=0) < 1 or band_k < 1 or repeats < 1 or heldout_draws < 0:
        raise ValueError(
            f"reward-audit needs --ks, --band-k and --repeats >= 1 and --heldout-draws >= 0, "
            f"got {list(ks)}, {band_k}, {repeats}, {heldout_draws}"
        )


def _heldout_bank(heldout, draws: int, seed: int):
    """The held-out pairs as [M, 2, ...] latents, their prompts' embeddings per latent, and their fixed draws."""
    latents = torch.stack([heldout.win, heldout.lose], 1).float()
    embeds = heldout.prompt_embeds[heldout.prompt_index.repeat_interleave(2)]
    return latents, embeds, _bank(len(heldout), draws, tuple(latents.shape[2:]), seed, AUDIT_HELDOUT_BANK)


def reward_audit(
    run: str | Path,
    *,
    out: str | Path = "bench/results/toy_reward_audit.md",
    prompts: int = 48,
    candidates: int = 8,
    draws: int = 140,
    ks: tuple[int, ...] = (6, 10, 20, 40, 80),
    band_k: int = 10,
    repeats: int = 20,
    heldout_draws: int = 40,
    progress: bool = True,
    trust_code: bool = False,
) -> Path:
    """Measure the run's implicit reward (see the module docstring); returns the report's path.
    ``trust_code``: run the code the run's config names (its toy.preference); refused otherwise."""
    from ...data.sources import load_pairs
    from ...diffusion.build import build_stack
    from ...diffusion.sampling import generate_candidates
    from ...runs.run_folder import load_recorded_config
    from ...sail.policies import Policies
    from ..labels import oracle_samples
    from ..run import ToyWorld

    run = Path(run)
    config = load_recorded_config(run, code="trust" if trust_code else "refuse")  # no config.yaml: refused there
    if not config.model.toy or config.sail is None:
        raise ValueError(f"{run} is not a toy SAIL run; reward-audit needs the toy world's human to judge candidates")
    _check_arguments(prompts, candidates, draws, ks, band_k, repeats, heldout_draws)
    ks = tuple(k for k in ks if k <= draws) or (draws,)
    sail, seed, beta = config.sail, config.seed, config.train.beta
    stack = build_stack(config.model, seed=seed)
    policies = Policies(stack.unet, config.train.lora, seed)
    stages = policy_stages(run, sail.rounds, policies.folder, sail.iter0_from)
    if not stages:
        raise FileNotFoundError(f"{run} has no trained policy yet (no iter0/final); let the run finish iter0 first")
    world = ToyWorld(sail, config.data.seed_pairs, seed=seed, out=run, log=lambda _: None, toy=config.toy)
    pool = world.round_pool()[sail.rounds * sail.prompts_per_round :]  # prompts no round trained on
    if len(pool) < prompts:
        raise ValueError(
            f"only {len(pool)} prompts are left unused by the run's rounds; ask for --prompts {len(pool)} or fewer"
        )
    chosen = pool[:prompts]
    seeds = torch.tensor(
        [[derive_seed(seed, AUDIT_CANDIDATES, p, n) for n in range(candidates)] for p in range(prompts)]
    )
    embeds = stack.encode_prompts(chosen).prompt_embeds

    def sample(unet):
        return generate_candidates(
            dataclasses.replace(stack, unet=unet),
            chosen,
            candidates,
            seeds=seeds,
            batch_size=sail.generation_batch,
            progress=False,
            **sail.sampling(),
        ).latents

    base_latents = sample(policies.base)
    bank = _bank(prompts, draws, tuple(base_latents.shape[2:]), seed, AUDIT_DRAW_BANK)
    heldout_file = RunLayout(run).human_pairs(config.toy.data_dir if config.toy else None).heldout
    heldout = None
    if heldout_draws > 0 and heldout_file.is_file():
        heldout = load_pairs(
            [str(heldout_file)],
            stack,
            model=config.model,
            data=config.data,
            cache_dir=RunLayout(run).cache,
            seed=seed,
            log=lambda _: None,
        )
        heldout_latents, heldout_embeds, heldout_bank = _heldout_bank(heldout, heldout_draws, seed)

    results = {
        "run": str(run),
        "prompts": prompts,
        "candidates": candidates,
        "draws": draws,
        "repeats": repeats,
        "ks": list(ks),
        "band_k": band_k,
        "loop_k": sail.num_draws,
        "stages": {},
    }
    settings = [
        (e, b, k)
        for k in dict.fromkeys((*RULE_KS, sail.num_draws, band_k))
        for b in (None, LOW_BAND)
        for e in ESTIMATORS
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # a band without draws: NaN, said so
        for name, folder in tqdm(stages, desc="reward audit", unit="policy", disable=not progress):
            policy = policies.load(folder)
            scorer = ImplicitRewardScorer(
                policy,
                policies.base,
                stack.scheduler,
                beta=beta,
                num_draws=draws,
                micro_batch=sail.scoring_batch,
                channels_last=False,
            )
            latents = sample(policy)
            judged = oracle_samples(world.oracle, latents.clamp(-1, 1), chosen)
            distance = (latents - base_latents).flatten(2).float().pow(2).mean(-1).sqrt()
            mse_pol, mse_ref = _bank_mse(scorer, latents, embeds, bank, f"{name} bank", progress)
            audit = PolicyAudit(mse_pol, mse_ref, bank.timesteps, judged, distance, beta, repeats=repeats, seed=seed)
            stage = {
                "by_k": [audit.estimate(k) for k in ks],
                "by_band": {f"[{lo}, {hi})": audit.estimate(band_k, band=(lo, hi)) for lo, hi in BANDS},
                "stratified": audit.estimate(band_k, stratified=True, retest=False),
                "spread_by_t": audit.spread_by_t(),
                "tracks": audit.what_it_tracks(),
                "estimators": [],
            }
            retested = [row for row in stage["by_k"] if math.isfinite(row["retest"]) and row["retest"] > 0]
            if retested:
                top = retested[-1]
                stage["noise_corrected_spearman"] = {"k": top["k"], "value": top["spearman"] / math.sqrt(top["retest"])}
            if heldout is not None:
                h_pol, h_ref = _bank_mse(
                    scorer, heldout_latents, heldout_embeds, heldout_bank, f"{name} held-out", progress
                )
            for estimator, band, k in settings:
                row = audit.estimate(k, estimator=estimator, band=band) | {
                    "estimator": estimator,
                    "band": list(band or (0, 1000)),
                }
                if heldout is not None:
                    row["heldout"], row["heldout_se"] = heldout_agreement(
                        h_pol,
                        h_ref,
                        beta,
                        min(k, heldout_draws),
                        estimator,
                        band,
                        heldout_bank.timesteps,
                        repeats,
                        seed,
                    )
                stage["estimators"].append(row)
            results["stages"][name] = stage
    return _write_report(Path(out), results)


def _write_report(out: Path, results: dict) -> Path:
    """The report as markdown at ``out`` and its numbers beside it as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(audit_markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------- the report


def _pm(row: dict, key: str) -> str:
    return f"{row[key]:.3f} ± {row[key + '_se']:.3f}"


def audit_markdown(results: dict) -> str:
    r = results
    lines = [
        "# Toy reward audit",
        "",
        f"Run `{r['run']}`: {r['prompts']} prompts no round trained on × {r['candidates']} candidates sampled the loop's way "
        f"(same seeds for every policy), a fixed bank of {r['draws']} uniform-t draws per prompt, {r['repeats']} repeats of "
        f"each draw subset; ± is a bootstrap SE over prompts. Human = the toy's noiseless human score.",
        "",
        SELECTION_RULE,
        "",
        "## By K (mean estimator, uniform t)",
        "",
        "| policy | K | UNet forwards / prompt | ρ(reward, human) | best-worst accuracy | gap share | test-retest |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        for row in s["by_k"]:
            lines.append(
                f"| {name} | {row['k']} | {row['unet_forwards_per_prompt']} | {_pm(row, 'spearman')} | "
                f"{_pm(row, 'accuracy')} | {row['gap_share']:.3f} | {row['retest']:.3f} |"
            )
    lines += ["", "Noise-corrected ρ(reward, human) (ρ_K / sqrt(retest_K), K → ∞):", ""]
    lines += [
        f"- {name}: {s['noise_corrected_spearman']['value']:.3f} (from K={s['noise_corrected_spearman']['k']})"
        for name, s in r["stages"].items()
        if "noise_corrected_spearman" in s
    ]
    lines += [
        "",
        f"## By timestep band (K={r['band_k']}, mean estimator) and stratified",
        "",
        "| policy | t | draws in band / prompt | ρ(reward, human) | best-worst accuracy | gap share | test-retest |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        for band, row in list(s["by_band"].items()) + [("stratified", s["stratified"])]:
            lines.append(
                f"| {name} | {band} | {row.get('band_draws_per_prompt', row['k']):.1f} | {_pm(row, 'spearman')} | "
                f"{_pm(row, 'accuracy')} | {row['gap_share']:.3f} | {row['retest']:.3f} |"
            )
    lines += ["", "## A draw's spread across candidates by t (std of the reward gap)", ""]
    bands = list(next(iter(r["stages"].values()))["spread_by_t"])
    lines += ["| policy | " + " | ".join(bands) + " | lowest / highest |", "|---|" + "---|" * (len(bands) + 1)]
    for name, s in r["stages"].items():
        v = list(s["spread_by_t"].values())
        lines.append(f"| {name} | " + " | ".join(f"{x:.3g}" for x in v) + f" | {v[0] / v[-1]:.1f} |")
    lines += [
        "",
        f"## What the reward tracks (all {r['draws']} draws; within-prompt Spearman)",
        "",
        "| policy | ρ human | ρ width | ρ log p | ρ distance from base | coef human (± SE) | coef width (± SE) "
        "| least-ink accuracy | wrong digits (chance) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        t = s["tracks"]
        loop = next(
            e for e in s["estimators"] if e["estimator"] == "mean" and e["band"] == [0, 1000] and e["k"] == r["loop_k"]
        )
        lines.append(
            f"| {name} | {t['human_spearman']:.3f} | {t['width_spearman']:.3f} | {t['log_prob_spearman']:.3f} | "
            f"{t['distance_spearman']:.3f} | {_pm(t, 'human_coef')} | {_pm(t, 'width_coef')} | "
            f"{t['least_ink_accuracy']:.3f} | best {loop['best_wrong_digit']:.1f}, worst {loop['worst_wrong_digit']:.1f} "
            f"({t['wrong_digit_chance']:.1f}) |"
        )
    lines += [
        "",
        "Wrong digits: candidates the classifier reads as another digit picked as best / worst at the loop's "
        f"K={r['loop_k']} (mean over repeats); chance: the count a random pick would give.",
        "",
        "## Every estimator",
        "",
        "| policy | estimator | t | K | held-out human agreement | ρ(reward, human) | best-worst accuracy | gap share "
        "| test-retest | ρ width | ρ log p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = next(iter(r["stages"]))
    rule = apply_selection_rule(r["stages"][first]["estimators"])
    if rule["chosen"] is not None:
        lines[lines.index(SELECTION_RULE) + 1 : lines.index(SELECTION_RULE) + 1] = [
            "",
            f"Applied to {first}: step 2 keeps {len(rule['kept'])} settings (held-out agreement within one SE of the best, "
            f"{max(e['heldout'] for e in rule['kept']):.3f}); step 3 finds "
            + "; ".join(f"{setting_name(e)} (test-retest {e['retest']:.3f})" for e in rule["tied"])
            + f" within {0.02} of the highest test-retest. Chosen, by K and then by plainness in the order step 1 lists "
            f"the estimators: **{setting_name(rule['chosen'])}**. (The rule as first run stopped at that tie; this reading "
            'of "plainer" was settled afterwards, with the oracle columns below already visible.)',
        ]
    for name, s in r["stages"].items():
        for e in s["estimators"]:
            held = _pm(e, "heldout") if "heldout" in e else "-"
            lines.append(
                f"| {name} | {e['estimator']} | [{e['band'][0]}, {e['band'][1]}) | {e['k']} | {held} | "
                f"{_pm(e, 'spearman')} | {_pm(e, 'accuracy')} | {e['gap_share']:.3f} | {e['retest']:.3f} | "
                f"{e['width_spearman']:.3f} | {e['log_prob_spearman']:.3f} |"
            )
    return "\n".join(lines) + "\n"
