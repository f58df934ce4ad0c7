"""Diffusion-DPO training of the policy UNet against a frozen reference.

One optimizer step sees ``pairs_per_step`` pairs: ``micro_batch_pairs`` per rank per
forward, accumulated over ``pairs_per_step / (micro_batch_pairs * world_size)`` micro
steps. Winner and loser of a pair go through the policy as one batch with the same
timestep and noise; the reference runs without autograd. Every random draw is derived
from (seed, step, micro step, rank), and checkpoints hold the step, optimizer, schedule,
EMA and sampler position, so a resumed run continues exactly where it stopped.

Runs plainly in one process, or under DeepSpeed (ZeRO stage 2 or 3) when the config
names a DeepSpeed JSON or several ranks were launched.

With ``train.lora`` only a peft LoRA adapter trains, and the reference is the same UNet in another
adapter state (``sail_fast.diffusion.lora``): every adapter off when the policy starts as the base, else a
frozen copy of the adapter as the stage started. Checkpoints and ``final/lora`` hold the adapter in
the diffusers LoRA format.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from ..data.latent_pairs import LatentPairs, PairBatch
from ..diffusion.lora import (
    POLICY,
    REFERENCE,
    AdapterView,
    activate,
    add_policy_adapter,
    copy_adapter,
    has_adapter,
    is_identity,
    train_only_policy,
    unwrap,
)
from ..diffusion.noising import noised_and_target
from ..runs import interrupts
from ..runs.config import TrainConfig
from ..runs.denormals import flush_denormal
from ..runs.distributed import DistInfo, deepspeed_config
from ..runs.layout import TrainingLayout
from ..runs.run_folder import latest_checkpoint
from ..runs.seeding import generator
from .checkpoints import NonFiniteError, TrainerCheckpoints
from .inversion import ddim_invert
from .losses import REFERENCE_FREE, LossOptions, preference_loss
from .mixup import MixupSampler
from .optim import build_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch 2.13's CPU inductor fuses part of the UNet's backward wrongly: the gradients are 26-67%
# off and some are exactly zero (tests/diffusion/test_compiled.py). Unfused kernels are right, and the
# compiled forward + backward still beats eager (0.37 s against 0.51 s on sd15-small); GPUs
# compile with the defaults.
CPU_COMPILE_OPTIONS = {"max_fusion_size": 1}


class DPOTrainer(TrainerCheckpoints):
    """Trains ``policy`` by ``cfg`` (the run's ``train:`` section) on seed and generated pairs, writing
    checkpoints, ``train.log``, ``metrics.jsonl`` and ``final/`` under ``output_dir``."""

    def __init__(
        self,
        cfg: TrainConfig,
        policy: UNet2DConditionModel,
        scheduler,
        seed_pairs: LatentPairs | None,
        *,
        seed: int,
        output_dir: str | Path,
        generated_pairs: LatentPairs | None = None,
        caption_dropout: float = 0.0,
        dist: DistInfo = DistInfo(),
        device: torch.device | str = "cpu",
        reference: nn.Module | None = None,
    ) -> None:
        """``seed``: every random draw derives from it; ``caption_dropout``: the share of pairs trained on the
        empty prompt (``data.caption_dropout``); ``reference``: the frozen model to train against (default: the
        policy as it starts); under LoRA an ``AdapterView`` of the same UNet (adapter None: the base)."""
        self.cfg, self.seed, self.caption_dropout, self.dist = cfg, seed, caption_dropout, dist
        self.device = torch.device(device)
        self.output_dir = Path(output_dir)
        self.layout = TrainingLayout(output_dir)
        self.scheduler = scheduler
        if cfg.noising == "ddim_inversion" and scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"train.noising: ddim_inversion needs an epsilon-prediction model; this scheduler predicts "
                f"{scheduler.config.prediction_type!r} (use train.noising: forward)"
            )
        per_step = cfg.micro_batch_pairs * dist.world_size
        if cfg.pairs_per_step % per_step:
            raise ValueError(
                f"train.pairs_per_step={cfg.pairs_per_step} is not a multiple of micro_batch_pairs x ranks = "
                f"{cfg.micro_batch_pairs} x {dist.world_size}; change one of them"
            )
        self.accumulation = cfg.pairs_per_step // per_step
        self.compute_dtype = DTYPES[cfg.mixed_precision]
        self._build_data(seed_pairs, generated_pairs, per_step)
        self._build_loss_settings()
        self._build_policy_and_reference(policy, reference)
        self._build_engine()
        self.step = 0
        self._checkpoint_seconds = 0.0  # how long the last checkpoint took to write (a SIGTERM's is skipped if slow)

    def _build_data(self, seed_pairs: LatentPairs | None, generated_pairs: LatentPairs | None, per_step: int) -> None:
        """The pairs (generated first, then the seed: the sampler's index space) and the mixup sampler."""
        num_generated = len(generated_pairs or [])
        if seed_pairs is None and not num_generated:
            raise ValueError("no pairs to train on: give seed pairs, generated pairs or both")
        parts = [p for p in (generated_pairs if num_generated else None, seed_pairs) if p is not None]
        self.pairs = parts[0] if len(parts) == 1 else LatentPairs.cat(parts)
        alpha = self.cfg.mixup_alpha if num_generated else 0.0
        self.sampler = MixupSampler(num_generated, len(seed_pairs or []), per_step, alpha=alpha, seed=self.seed)

    def _build_loss_settings(self) -> None:
        """Per-model settings unless set (SDXL pairs carry pooled embeds): SmPO's inversion steps (10 SDXL, 5 SD1.5), DSPO's form."""
        cfg = self.cfg
        sdxl = self.pairs.pooled_prompt_embeds is not None
        self.inversion_steps = cfg.inversion_steps or (10 if sdxl else 5)
        self.dspo_sdxl = cfg.dspo_form == "sdxl" if cfg.dspo_form else sdxl  # DSPO's form follows the model's kind
        self.loss_options = LossOptions(
            gamma=cfg.mapo_gamma, smpo_scale=cfg.smpo_scale, dmpo_alpha=cfg.dmpo_alpha, dro_margin=cfg.dro_margin
        )

    def _build_policy_and_reference(self, policy: UNet2DConditionModel, reference: nn.Module | None) -> None:
        """The trainable policy, and the reference as it starts, frozen, in the compute dtype: with LoRA, the
        same UNet with its adapters off (a fresh adapter) or with a frozen copy of the adapter."""
        cfg = self.cfg
        self.lora = cfg.lora is not None
        # Contiguous weights: DeepSpeed's broadcast views each parameter as bytes, which needs a unit last stride.
        self.policy = unwrap(policy).to(self.device, memory_format=torch.contiguous_format).train()
        if cfg.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self.reference, self.reference_adapter = None, None
        if self.lora:
            if not has_adapter(self.policy):
                add_policy_adapter(self.policy, cfg.lora, seed=self.seed)
            train_only_policy(self.policy)  # whatever the caller left trainable
            if reference is not None:
                if not isinstance(reference, AdapterView) or unwrap(reference) is not self.policy:
                    raise ValueError("under train.lora the reference must be an AdapterView of the policy's own UNet")
                self.reference_adapter = reference.adapter
            elif not is_identity(self.policy):
                copy_adapter(self.policy, POLICY, REFERENCE)
                self.reference_adapter = REFERENCE
            activate(self.policy, POLICY)
        elif cfg.loss not in REFERENCE_FREE:
            self.reference = copy.deepcopy(reference if reference is not None else policy).to(self.device)
            if self.reference.dtype != self.compute_dtype:  # diffusers warns on any .to(dtype), even a no-op
                self.reference.to(dtype=self.compute_dtype)
            self.reference.eval().requires_grad_(False)

    def _build_engine(self) -> None:
        """Optimizer, learning-rate schedule and EMA; under DeepSpeed its engine, else the (compiled) policy."""
        cfg = self.cfg
        self.use_deepspeed = cfg.deepspeed is not None or self.dist.enabled
        if self.use_deepspeed and cfg.compile:
            raise ValueError(
                "train.compile is not supported under DeepSpeed yet (the engine wraps the policy); "
                "set train.compile: false, or train in one process without train.deepspeed"
            )
        optimizer = build_optimizer(cfg.optimizer, self.policy.parameters(), cfg)
        lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
        self.ema = EMAModel(self.policy.parameters(), decay=cfg.ema_decay) if cfg.ema_decay else None
        if self.use_deepspeed:
            import deepspeed

            self.engine, self.optimizer, _, self.lr_schedule = deepspeed.initialize(
                model=self.policy,
                optimizer=optimizer,
                lr_scheduler=lr_schedule,
                config=deepspeed_config(cfg, self.accumulation, ema=self.ema is not None),
            )
            self.model = self.engine
        else:
            self.engine, self.optimizer, self.lr_schedule = None, optimizer, lr_schedule
            options = CPU_COMPILE_OPTIONS if self.device.type == "cpu" else None
            self.model = torch.compile(self.policy, options=options) if cfg.compile else self.policy

    # ---------------------------------------------------------------- one step
    def _micro_step_loss(self, batch: PairBatch, gen: torch.Generator):
        bsz = batch.win.shape[0]
        x0 = torch.cat([batch.win, batch.lose]).float()
        noise = torch.randn(batch.win.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,), generator=gen).to(self.device)
        noise, t = torch.cat([noise, noise]), torch.cat([t, t])  # winner and loser share t and eps
        embeds = torch.cat([batch.prompt_embeds, batch.prompt_embeds])
        added = None
        if batch.pooled_prompt_embeds is not None:
            added = {
                "text_embeds": torch.cat([batch.pooled_prompt_embeds, batch.pooled_prompt_embeds]),
                "time_ids": torch.cat([batch.time_ids_win, batch.time_ids_lose]),
            }
        # DeepSpeed bf16/fp16 holds the module in that dtype; the plain path autocasts.
        input_dtype = self.compute_dtype if self.use_deepspeed else torch.float32
        embeds_in = embeds.to(input_dtype)
        added_in = None if added is None else {k: v.to(input_dtype) for k, v in added.items()}
        if self.cfg.noising == "ddim_inversion":
            # SmPO: winner and loser share t; each is inverted along the policy's own trajectory, and the
            # inverted noise is the target (an epsilon-prediction model: __init__ checks).
            x_t, target = ddim_invert(
                self.model,
                x0,
                t,
                self.scheduler.alphas_cumprod,
                steps=self.inversion_steps,
                encoder_hidden_states=embeds_in,
                added_cond_kwargs=added_in,
            )
        else:
            x_t, target = noised_and_target(self.scheduler, x0, noise, t)
        autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32 and not self.use_deepspeed
            else contextlib.nullcontext()
        )
        with autocast:
            pred = self.model(
                x_t.to(input_dtype), t, encoder_hidden_states=embeds_in, added_cond_kwargs=added_in
            ).sample
            pred_ref = None
            reference = self.reference
            if self.lora and self.cfg.loss not in REFERENCE_FREE:
                reference = self.policy  # the policy's graph is built: switching adapters now cannot change it
                activate(self.policy, self.reference_adapter)
            if reference is not None:
                with torch.no_grad():
                    ref_in = {k: v.to(self.compute_dtype) for k, v in added.items()} if added else None
                    pred_ref = reference(
                        x_t.to(self.compute_dtype),
                        t,
                        encoder_hidden_states=embeds.to(self.compute_dtype),
                        added_cond_kwargs=ref_in,
                    ).sample
            if self.lora:
                activate(self.policy, POLICY)
        cfg = self.cfg
        return preference_loss(
            cfg.loss,
            target,
            pred,
            pred_ref,
            beta=cfg.beta,
            labels=batch.label,
            options=self.loss_options,
            winner_preserving_mu=cfg.winner_preserving_mu,
            dspo_sdxl=self.dspo_sdxl,
        )

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``pairs_per_step`` pairs; returns metrics averaged over ranks."""
        # Once the DPO loss saturates, gradients underflow into denormals, which x86 CPUs process 10-100x
        # slower: flushed to zero for the step, and the process's own setting is back when it returns.
        with flush_denormal(self.device.type == "cpu"):
            return self._train_step()

    def _train_step(self) -> dict[str, float]:
        rank, world = self.dist.rank, self.dist.world_size
        sums: dict[str, float] = {}
        for micro in range(self.accumulation):
            idx = self.sampler.next_batch()[rank::world]  # every rank walks one sampler, takes its slice
            gen = generator(self.seed, self.step, micro, rank)
            batch = self.pairs.batch(idx, caption_dropout=self.caption_dropout, generator=gen).to(self.device)
            out = self._micro_step_loss(batch, gen)
            if self.engine is not None:
                self.engine.backward(out.loss)
                self.engine.step()
            else:
                (out.loss / self.accumulation).backward()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accumulation
        if self.engine is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
            sums["grad_norm"] = float(grad_norm)
            if torch.isfinite(grad_norm):  # else the update is refused, and train() stops on it
                self.optimizer.step()
                self.lr_schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        elif (norm := self.engine.get_global_grad_norm()) is not None:
            sums["grad_norm"] = float(norm)
        if self.ema is not None:
            self.ema.step(self.policy.parameters())
        self.step += 1
        return self.dist.mean(sums)

    # -------------------------------------------------------------- the loop
    def train(self, *, resume: bool = False, stop_after: int | None = None) -> UNet2DConditionModel:
        """Run to ``train.steps`` optimizer steps (``stop_after`` ends early, as a kill would)."""
        cfg = self.cfg
        existing = latest_checkpoint(self.output_dir, log=self._log_line if self.dist.is_main else None)
        if existing is not None and not resume:
            raise FileExistsError(
                f"{self.output_dir} already has checkpoints (latest {existing.name}); pass --resume to continue "
                f"from it, or choose another output_dir"
            )
        if resume and existing is not None:
            self.load_checkpoint(existing)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._log_line(
                f"{self.sampler.describe()}; {self.accumulation} micro steps of "
                f"{cfg.micro_batch_pairs} pairs x {self.dist.world_size} ranks per optimizer step"
            )
        metrics_path = self.layout.metrics_of_rank(self.dist.rank)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="dpo",
            unit="step",
            disable=not (cfg.progress and self.dist.is_main),
        )
        start_step, started = self.step, time.perf_counter()
        last_finite = None  # (step, loss) for the error message
        with interrupts.deferred():  # SIGTERM waits for the step to end: _stop_on_sigterm
            self._train_loop(bar, metrics_path, start_step, started, last_finite, stop_after)
        bar.close()
        if self.step == cfg.steps:
            self.save_final()
        return self.policy

    def _train_loop(self, bar, metrics_path, start_step, started, last_finite, stop_after) -> None:
        cfg = self.cfg
        while self.step < cfg.steps:
            self._stop_on_sigterm()
            metrics = self.train_step()
            self._stop_if_non_finite(metrics, last_finite)
            last_finite = (self.step, metrics["loss"])
            elapsed = time.perf_counter() - started
            metrics |= {"step": self.step, "pairs_per_s": (self.step - start_step) * cfg.pairs_per_step / elapsed}
            self.dist.barrier()
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['implicit_acc']:.2f}",
                pairs_s=f"{metrics['pairs_per_s']:.1f}",
            )
            bar.update(1)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            if stop_after is not None and self.step >= stop_after:
                break
        self._stop_on_sigterm()

    def _stop_on_sigterm(self) -> None:
        """After SIGTERM (on any rank: every rank stops at the same step): write a checkpoint of this step when
        the last one was quick to write, then stop with where the run can resume from."""
        stop = interrupts.requested()
        if self.dist.enabled:
            stop = self.dist.mean({"stop": float(stop)})["stop"] > 0
        if not stop:
            return
        # By name, not verified: hashing a large checkpoint again would eat the scheduler's grace period.
        this_step = self.layout.checkpoint(self.step)
        saved = this_step.is_dir()
        if not saved and self.step > 0 and self._checkpoint_seconds <= interrupts.QUICK_CHECKPOINT_S:
            saved = self.save_checkpoint() is not None
        newest = this_step if saved else max(self.layout.written_checkpoints(), default=None)
        where = (
            f"checkpoint {newest} (step {self.layout.step_of(newest)})" if newest is not None else "no checkpoint yet"
        )
        if self.dist.is_main:
            self._log_line(f"stopped by SIGTERM at step {self.step}; {'wrote ' if saved else 'the newest is '}{where}")
        raise interrupts.Stopped(
            f"stopped by SIGTERM at DPO step {self.step} of {self.cfg.steps} in "
            f"{self.output_dir}; it resumes from {where}"
        )

    def _stop_if_non_finite(self, metrics: dict, last_finite) -> None:
        """Stop at once on a NaN/inf loss or gradient norm (averaged over ranks, so every rank stops):
        nothing of this step is saved, and the last checkpoint stays the newest."""
        loss, norm = metrics["loss"], metrics.get("grad_norm", 0.0)
        if math.isfinite(loss) and math.isfinite(norm):
            return
        kept = latest_checkpoint(self.output_dir)
        before = (
            f"the last finite loss was {last_finite[1]:.4g} at step {last_finite[0]}"
            if last_finite
            else "no step had a finite loss"
        )
        raise NonFiniteError(
            f"{self.output_dir}: training diverged at step {self.step}: loss {loss}, gradient norm {norm}; {before}. "
            f"Nothing of this step was saved; the newest checkpoint is {kept or 'none'}. Lower train.learning_rate "
            f"(now {self.cfg.learning_rate:g}) or train.beta (now {self.cfg.beta:g}), or check the pairs "
            f"for NaN latents"
        )

    def _log_line(self, text: str) -> None:
        tqdm.write(text)
        with self.layout.log.open("a") as f:
            f.write(text + "\n")
