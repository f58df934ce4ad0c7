"""The implicit reward scorer: a diffusion policy ranks its own samples against a frozen
reference, with no external reward model.

For candidate latents x of one prompt and K shared draws (t_k, eps_k)::

    r(x) = -beta/2 * mean_k [ mse(target_k, policy(x_t_k)) - mse(target_k, ref(x_t_k)) ]

where x_t_k = add_noise(x, eps_k, t_k) and target_k is eps_k (or the velocity for
v-prediction models). Every candidate of a prompt sees the same draws (common random
numbers), which removes most of the variance from reward *differences*, the only thing a
ranking needs.

``estimator`` swaps the mean over draws for a debiased one (``reward.estimators``: per-draw
standardisation, the gap relative to the reference's error, a per-draw rank vote), and
``timestep_range`` draws t from a band [lo, hi) instead of every training step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion.noising import noised_and_target
from ..kernels import implicit_reward, paired_mse
from .estimators import ESTIMATORS, combine_draws


@dataclass
class Draws:
    """K shared noise draws for each of P prompts: ``timesteps`` [P, K], ``noise`` [P, K, C, H, W]."""

    timesteps: torch.Tensor
    noise: torch.Tensor

    @property
    def num_draws(self) -> int:
        return self.timesteps.shape[1]

    def slice(self, start: int, stop: int) -> "Draws":
        return Draws(self.timesteps[:, start:stop], self.noise[:, start:stop])


@dataclass
class BestWorst:
    """The chosen pair for each prompt, the rewards behind it, and what it cost."""

    best: torch.Tensor  # [P] candidate index
    worst: torch.Tensor  # [P] candidate index
    rewards: torch.Tensor  # [P, N]; NaN for candidates an adaptive search stopped scoring early
    unet_forwards: int  # policy + reference forwards actually run (one per noised latent each)
    unet_forwards_full: int  # what scoring every candidate with every draw costs


class ImplicitRewardScorer:
    """Score candidate latents with the policy's implicit DPO reward against a reference.

    Args:
        policy_unet, reference_unet: ``UNet2DConditionModel``-like modules called as
            ``unet(x_t, t, encoder_hidden_states=..., added_cond_kwargs=...)``; both must have
            one dtype, so that the reward is exactly 0 while they hold the same weights.
            Inputs are cast to that dtype (bf16 models give the fast path on GPUs and AMX CPUs).
        scheduler: the training noise scheduler (``add_noise``, ``config.num_train_timesteps``,
            ``config.prediction_type``), e.g. diffusers' ``DDPMScheduler``.
        beta: DPO beta, tuned to the per-sample *mean* squared error (paper: 5000).
        num_draws: K, the shared (t, eps) draws per prompt (paper: 10).
        micro_batch: noised latents per UNet call; results do not depend on it beyond
            floating-point rounding.
        channels_last: score in channels_last, the faster convolution layout on GPUs and CPUs: the inputs,
            and the UNets' 4-D weights while a call scores (the caller's own weight tensors are back in
            place when it returns, so the modules are left as they were).
        compile: wrap both UNets in ``torch.compile`` for the scorer's calls.
        estimator: how per-draw errors become a reward (``reward.estimators.ESTIMATORS``; default
            ``"mean"``, the paper's ``-beta/2 * mean_k`` gap).
        timestep_range: ``(lo, hi)``: draws take t uniformly in [lo, hi) (default: every training step).
    """

    def __init__(
        self,
        policy_unet: nn.Module,
        reference_unet: nn.Module,
        scheduler,
        *,
        beta: float = 5000.0,
        num_draws: int = 10,
        micro_batch: int = 64,
        channels_last: bool = True,
        compile: bool = False,
        estimator: str = "mean",
        timestep_range: tuple[int, int] | None = None,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta!r}")
        if num_draws < 1 or micro_batch < 1:
            raise ValueError(f"num_draws and micro_batch must be >= 1, got {num_draws} and {micro_batch}")
        policy_dtype, ref_dtype = _dtype_of(policy_unet), _dtype_of(reference_unet)
        if policy_dtype != ref_dtype:
            raise ValueError(
                f"policy ({policy_dtype}) and reference ({ref_dtype}) must run in one dtype, or the reward "
                f"is not 0 at initialisation; cast both, e.g. reference_unet.to({policy_dtype})"
            )
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown reward estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
        num_train = scheduler.config.num_train_timesteps
        lo, hi = timestep_range if timestep_range is not None else (0, num_train)
        if not 0 <= lo < hi <= num_train:
            raise ValueError(f"timestep_range must be [lo, hi) with 0 <= lo < hi <= {num_train}, got {[lo, hi]}")
        self.estimator = estimator
        self.timestep_range = (int(lo), int(hi))
        self.dtype = policy_dtype
        self.scheduler = scheduler
        self.beta = float(beta)
        self.num_draws = num_draws
        self.micro_batch = micro_batch
        self.channels_last = channels_last
        self.prediction_type = prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.device = next(policy_unet.parameters()).device
        self._unets = (
            policy_unet,
            reference_unet,
        )  # as the caller gave them (the compiled wrappers share their weights)
        self._layout_depth = 0  # > 0 inside scoring_layout(): the weights are channels_last already
        self.policy_unet = torch.compile(policy_unet) if compile else policy_unet
        self.reference_unet = torch.compile(reference_unet) if compile else reference_unet

    # ----------------------------------------------------------------- draws
    def sample_draws(
        self, num_prompts: int, latent_shape: tuple[int, ...], *, generator: torch.Generator | None = None
    ) -> Draws:
        """K draws per prompt: t uniform over ``timestep_range`` (every training step by default), eps standard normal."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        k = self.num_draws
        lo, hi = self.timestep_range
        timesteps = torch.randint(lo, hi, (num_prompts, k), generator=generator, device=gen_device)
        noise = torch.randn((num_prompts, k, *latent_shape), generator=generator, device=gen_device)
        return Draws(timesteps.to(self.device), noise.to(self.device))

    # --------------------------------------------------------------- scoring
    @torch.inference_mode()
    def per_draw_mse(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        draws: Draws,
        *,
        added_cond_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference MSE for every (prompt, candidate, draw): two fp32 [P, N, K].

        ``latents`` [P, N, C, H, W]; ``prompt_embeds`` [P, L, D] (one per prompt) or
        [P * N, L, D] (one per candidate); ``added_cond_kwargs`` tensors likewise.
        """
        num_prompts, num_cands = latents.shape[:2]
        k = draws.num_draws
        per_candidate = _check_embeds(prompt_embeds, num_prompts, num_cands)
        latents = latents.to(self.device)
        prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        if added_cond_kwargs is not None:
            added_cond_kwargs = {key: v.to(self.device, self.dtype) for key, v in added_cond_kwargs.items()}
        rows = num_prompts * num_cands * k
        mse_policy = torch.empty(rows, device=self.device, dtype=torch.float32)
        mse_ref = torch.empty(rows, device=self.device, dtype=torch.float32)
        with self.scoring_layout():
            self._score_rows(latents, prompt_embeds, added_cond_kwargs, draws, per_candidate, mse_policy, mse_ref)
        shape = (num_prompts, num_cands, k)
        return mse_policy.view(shape), mse_ref.view(shape)

    def _score_rows(self, latents, prompt_embeds, added_cond_kwargs, draws, per_candidate, mse_policy, mse_ref) -> None:
        num_cands, k, rows = latents.shape[1], draws.num_draws, mse_policy.numel()
        for start in range(0, rows, self.micro_batch):
            r = torch.arange(start, min(start + self.micro_batch, rows), device=self.device)
            p, n, d = r // (num_cands * k), (r // k) % num_cands, r % k
            # Noise in fp32, as diffusers' training scripts do; one cast to the model dtype after.
            x0 = latents[p, n].float()
            eps = draws.noise[p, d].float()
            t = draws.timesteps[p, d]
            x_t, target = noised_and_target(self.scheduler, x0, eps, t)
            cond_rows = p * num_cands + n if per_candidate else p
            embeds = prompt_embeds[cond_rows]
            added = None if added_cond_kwargs is None else {key: v[cond_rows] for key, v in added_cond_kwargs.items()}
            x_t = x_t.to(self.dtype)
            if self.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            pred_policy = self._forward(self.policy_unet, x_t, t, embeds, added)
            pred_ref = self._forward(self.reference_unet, x_t, t, embeds, added)
            mse_policy[r], mse_ref[r] = paired_mse(target, pred_policy, pred_ref)

    def score_many(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        added_cond_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards [P, N] for N candidates of each of P prompts, K shared draws per prompt.

        Pass ``timesteps`` [P, K] and ``noise`` [P, K, C, H, W] to fix the draws; otherwise
        they come from ``generator``.
        """
        draws = self._draws(latents, timesteps, noise, generator)
        mse_policy, mse_ref = self.per_draw_mse(latents, prompt_embeds, draws, added_cond_kwargs=added_cond_kwargs)
        return combine_draws(mse_policy, mse_ref, self.beta, self.estimator)

    def score(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        added_cond_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards [N] for N candidate latents [N, C, H, W] of one prompt.

        ``prompt_embeds`` has batch 1 (the prompt) or N (one row per candidate). Pass
        ``timesteps`` [K] and ``noise`` [K, C, H, W] to make the score exactly reproducible.
        """
        if latents.dim() != 4:
            raise ValueError(f"latents must be [N, C, H, W], got shape {tuple(latents.shape)}")
        return self.score_many(
            latents[None],
            prompt_embeds,
            added_cond_kwargs=added_cond_kwargs,
            generator=generator,
            timesteps=None if timesteps is None else timesteps[None],
            noise=None if noise is None else noise[None],
        )[0]

    def best_worst(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        added_cond_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        adaptive: bool = False,
        min_draws: int = 3,
        draws_per_stage: int = 1,
        confidence_z: float = 2.0,
    ) -> BestWorst:
        """Highest- and lowest-reward candidate per prompt, for latents [P, N, C, H, W].

        With ``adaptive=True`` the draws are spent where the choice is uncertain: every
        candidate gets ``min_draws`` draws, then candidates whose paired (common-draw) reward
        gap to the current leader is beyond ``confidence_z`` standard errors drop out of the
        race for best (and likewise for worst); only candidates still in a race get the next
        ``draws_per_stage`` draws, up to ``num_draws`` in all.
        """
        num_prompts, num_cands = latents.shape[:2]
        if adaptive and self.estimator != "mean":
            raise ValueError(f"the adaptive race scores with the mean estimator only, not {self.estimator!r}")
        draws = self._draws(latents, timesteps, noise, generator)
        full = 2 * num_prompts * num_cands * draws.num_draws
        if not adaptive:
            rewards = self.score_many(
                latents,
                prompt_embeds,
                added_cond_kwargs=added_cond_kwargs,
                timesteps=draws.timesteps,
                noise=draws.noise,
            )
            return BestWorst(rewards.argmax(1), rewards.argmin(1), rewards, full, full)
        best, worst, rewards, forwards = [], [], [], 0
        per_candidate = _check_embeds(prompt_embeds, num_prompts, num_cands)
        for p in range(num_prompts):
            rows = slice(p * num_cands, (p + 1) * num_cands) if per_candidate else slice(p, p + 1)
            added = None if added_cond_kwargs is None else {key: v[rows] for key, v in added_cond_kwargs.items()}
            prompt_draws = Draws(draws.timesteps[p : p + 1], draws.noise[p : p + 1])
            b, w, r, f = self._race(
                latents[p], prompt_embeds[rows], added, prompt_draws, min_draws, draws_per_stage, confidence_z
            )
            best.append(b)
            worst.append(w)
            rewards.append(r)
            forwards += f
        return BestWorst(torch.tensor(best), torch.tensor(worst), torch.stack(rewards), forwards, full)

    @contextlib.contextmanager
    def scoring_layout(self):
        """The UNets' 4-D weights channels_last for the block (with ``channels_last``; else nothing changes),
        and the caller's own tensors back afterwards. Every scoring call enters it; a caller that scores many
        chunks enters it once around them, so the weights are copied once, not per chunk. Re-entrant."""
        convert = self.channels_last and not self._layout_depth
        with _channels_last(*self._unets) if convert else contextlib.nullcontext():
            self._layout_depth += 1
            try:
                yield
            finally:
                self._layout_depth -= 1

    def pair_mse(
        self, pairs, *, generator: torch.Generator | None = None, chunk: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference MSE of every labelled pair's winner and loser: two fp32 [P, 2, K].

        ``pairs`` is a ``LatentPairs``; each pair is scored on its own prompt with K draws shared by its
        winner (index 0) and loser (index 1). The draws come from ``generator`` chunk by chunk, so the same
        generator state gives the same draws whatever the weights (stages compare on equal terms).
        """
        policy, reference = [], []
        with self.scoring_layout():  # the weights copied to channels_last once for all chunks
            for start in range(0, len(pairs), chunk):
                idx = torch.arange(start, min(start + chunk, len(pairs)))
                latents = torch.stack([pairs.win[idx], pairs.lose[idx]], dim=1).float()
                rows = pairs.prompt_index[idx].repeat_interleave(2)  # one row per candidate
                embeds = pairs.prompt_embeds[rows]
                added = None
                if pairs.pooled_prompt_embeds is not None:
                    time_ids = torch.stack([pairs.time_ids_win[idx], pairs.time_ids_lose[idx]], dim=1).flatten(0, 1)
                    added = {"text_embeds": pairs.pooled_prompt_embeds[rows], "time_ids": time_ids}
                draws = self._draws(latents, None, None, generator)
                mse_policy, mse_ref = self.per_draw_mse(latents, embeds, draws, added_cond_kwargs=added)
                policy.append(mse_policy)
                reference.append(mse_ref)
        return torch.cat(policy), torch.cat(reference)

    def pair_accuracy(self, pairs, *, generator: torch.Generator | None = None, chunk: int = 64) -> float:
        """Fraction of labelled pairs whose winner gets the higher implicit reward.

        ``pairs`` is a ``LatentPairs``, scored as ``pair_mse`` scores it. This is the self-label agreement
        with held-out human pairs (0.5 is chance).
        """
        rewards = combine_draws(*self.pair_mse(pairs, generator=generator, chunk=chunk), self.beta, self.estimator)
        return int((rewards[:, 0] > rewards[:, 1]).sum()) / len(pairs)

    # -------------------------------------------------------------- internals
    def _draws(self, latents, timesteps, noise, generator) -> Draws:
        if latents.dim() != 5:
            raise ValueError(f"latents must be [P, N, C, H, W], got shape {tuple(latents.shape)}")
        num_prompts, latent_shape = latents.shape[0], tuple(latents.shape[2:])
        if (timesteps is None) != (noise is None):
            raise ValueError("pass both timesteps and noise to fix the draws, or neither")
        if timesteps is None:
            return self.sample_draws(num_prompts, latent_shape, generator=generator)
        if timesteps.dim() != 2 or timesteps.shape[0] != num_prompts:
            raise ValueError(f"timesteps must be [P, K] = [{num_prompts}, K], got {tuple(timesteps.shape)}")
        if tuple(noise.shape) != (num_prompts, timesteps.shape[1], *latent_shape):
            raise ValueError(
                f"noise must be [P, K, C, H, W] = {[num_prompts, timesteps.shape[1], *latent_shape]}, got {list(noise.shape)}"
            )
        if timesteps.dtype.is_floating_point or timesteps.min() < 0 or timesteps.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must be integers in [0, {self.num_train_timesteps}), got {timesteps.tolist()}")
        return Draws(timesteps.to(self.device), noise.to(self.device))

    def _forward(self, unet, x_t, t, embeds, added):
        if embeds.shape[0] == 1 and x_t.shape[0] > 1:
            embeds = embeds.expand(x_t.shape[0], -1, -1)
            added = None if added is None else {k: v.expand(x_t.shape[0], *v.shape[1:]) for k, v in added.items()}
        return unet(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def _race(self, latents, embeds, added, draws, min_draws, draws_per_stage, z):
        """Race for best and for worst among the N candidates of one prompt (draws with P=1)."""
        num_cands, k = latents.shape[0], draws.num_draws
        mse_policy = torch.full((num_cands, k), math.nan)
        mse_ref = torch.full((num_cands, k), math.nan)
        in_best = torch.ones(num_cands, dtype=torch.bool)
        in_worst = torch.ones(num_cands, dtype=torch.bool)
        used, forwards = 0, 0
        while used < k and (in_best.sum() > 1 or in_worst.sum() > 1):
            stop = min(k, min_draws if used == 0 else used + draws_per_stage)
            alive = (in_best | in_worst).nonzero().flatten()
            embeds_alive = embeds[alive] if embeds.shape[0] > 1 else embeds
            added_alive = (
                None if added is None else {key: (v[alive] if v.shape[0] > 1 else v) for key, v in added.items()}
            )
            mse_p, mse_r = self.per_draw_mse(
                latents[alive][None], embeds_alive, draws.slice(used, stop), added_cond_kwargs=added_alive
            )
            mse_policy[alive, used:stop] = mse_p[0].cpu()
            mse_ref[alive, used:stop] = mse_r[0].cpu()
            forwards += 2 * alive.numel() * (stop - used)
            used = stop
            if used < 2:
                continue  # no standard error from one draw
            per_draw = implicit_reward(mse_policy[:, :used, None], mse_ref[:, :used, None], self.beta)
            for race, sign in ((in_best, 1.0), (in_worst, -1.0)):
                members = race.nonzero().flatten()
                if members.numel() <= 1:
                    continue
                score = sign * per_draw[members]
                leader = score.mean(1).argmax()
                diff = score - score[leader]  # paired by draw: common random numbers
                behind = diff.mean(1) + z * diff.std(1) / math.sqrt(used) < 0
                race[members[behind]] = False
        rewards = implicit_reward(mse_policy[:, :used], mse_ref[:, :used], self.beta)
        best = int(torch.where(in_best, rewards, -math.inf).argmax())
        worst = int(torch.where(in_worst, rewards, math.inf).argmin())
        return best, worst, rewards, forwards


@contextlib.contextmanager
def _channels_last(*modules: nn.Module):
    """The modules' 4-D parameters and buffers channels_last inside the block (copies; the values are the same), as
    ``module.to(memory_format=torch.channels_last)`` makes them; afterwards each holds its own tensor again, strides
    and storage as before."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers()) if t.dim() == 4}.values()
    kept = [(t, t.data) for t in tensors]  # a UNet given twice (LoRA's two AdapterViews) is converted once
    for t, data in kept:  # as Module.to makes them: 1x1 kernels get channels_last strides too (.contiguous would
        t.data = data.to(memory_format=torch.channels_last)  # keep theirs, and the rewards change in the last bits)
    try:
        yield
    finally:
        for t, data in kept:
            t.data = data


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _check_embeds(prompt_embeds: torch.Tensor, num_prompts: int, num_cands: int) -> bool:
    """True when the embeddings are one per candidate, False when one per prompt."""
    if prompt_embeds.dim() != 3:
        raise ValueError(f"prompt_embeds must be [batch, tokens, dim], got shape {tuple(prompt_embeds.shape)}")
    if prompt_embeds.shape[0] == num_prompts:
        return False
    if prompt_embeds.shape[0] == num_prompts * num_cands:
        return True
    raise ValueError(
        f"prompt_embeds has batch {prompt_embeds.shape[0]}; expected {num_prompts} (one per prompt) "
        f"or {num_prompts * num_cands} (one per candidate)"
    )
