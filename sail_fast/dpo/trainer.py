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
adapter state (``sail_fast.lora``): every adapter off when the policy starts as the base, else a
frozen copy of the adapter as the stage started. Checkpoints and ``final/lora`` hold the adapter in
the diffusers LoRA format.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import shutil
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from .. import interrupts
from ..config import RunConfig
from ..data.latent_pairs import LatentPairs, PairBatch
from ..denormals import flush_denormal
from ..distributed import DistInfo, deepspeed_config
from ..lora import (POLICY, REFERENCE, AdapterView, activate, adapter_state, add_policy_adapter, copy_adapter,
                    has_adapter, is_identity, load_adapter, save_adapter, train_only_policy, unwrap)
from ..noising import noised_and_target
from ..rundir import MANIFEST, disk_full, drop_metrics_after, latest_checkpoint, write_manifest
from ..seeding import generator
from .inversion import ddim_invert
from .losses import REFERENCE_FREE, LossOptions, preference_loss
from .mixup import MixupSampler
from .optim import build_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch 2.13's CPU inductor fuses part of the UNet's backward wrongly: the gradients are 26-67%
# off and some are exactly zero (tests/test_compiled.py). Unfused kernels are right, and the
# compiled forward + backward still beats eager (0.37 s against 0.51 s on sd15-small); GPUs
# compile with the defaults.
CPU_COMPILE_OPTIONS = {"max_fusion_size": 1}


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient norm."""


class DPOTrainer:
    def __init__(
        self,
        config: RunConfig,
        policy: UNet2DConditionModel,
        scheduler,
        seed_pairs: LatentPairs | None,
        *,
        generated_pairs: LatentPairs | None = None,
        output_dir: str | Path | None = None,
        dist: DistInfo = DistInfo(),
        device: torch.device | str = "cpu",
        reference: nn.Module | None = None,
    ) -> None:
        """``reference``: the frozen model to train against (default: the policy as it starts); under LoRA an
        ``AdapterView`` of the same UNet (adapter None: the base)."""
        train = config.train
        self.config, self.train_cfg, self.dist = config, train, dist
        self.device = torch.device(device)
        self.output_dir = Path(output_dir or config.output_dir)
        self.scheduler = scheduler
        if train.noising == "ddim_inversion" and scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"train.noising: ddim_inversion needs an epsilon-prediction model; this scheduler predicts "
                             f"{scheduler.config.prediction_type!r} (use train.noising: forward)")
        per_step = train.micro_batch_pairs * dist.world_size
        if train.pairs_per_step % per_step:
            raise ValueError(
                f"train.pairs_per_step={train.pairs_per_step} is not a multiple of micro_batch_pairs x ranks = "
                f"{train.micro_batch_pairs} x {dist.world_size}; change one of them"
            )
        self.accumulation = train.pairs_per_step // per_step
        self.compute_dtype = DTYPES[train.mixed_precision]

        # The data: generated pairs first, then the seed pairs (the sampler's index space).
        num_generated = 0 if generated_pairs is None else len(generated_pairs)
        if seed_pairs is None and not num_generated:
            raise ValueError("no pairs to train on: give seed pairs, generated pairs or both")
        parts = [p for p in (generated_pairs if num_generated else None, seed_pairs) if p is not None]
        self.pairs = parts[0] if len(parts) == 1 else LatentPairs.cat(parts)
        alpha = train.mixup_alpha if num_generated else 0.0
        self.sampler = MixupSampler(num_generated, len(seed_pairs or []), per_step, alpha=alpha, seed=config.seed)
        # The authors' per-model settings unless set (an SDXL stack's pairs carry pooled embeddings): SmPO's
        # inversion steps, 10 for SDXL and 5 for SD1.5; Diffusion-SDPO's DSPO form.
        sdxl = self.pairs.pooled_prompt_embeds is not None
        self.inversion_steps = train.inversion_steps or (10 if sdxl else 5)
        self.dspo_sdxl = train.dspo_form == "sdxl" if train.dspo_form else sdxl  # DSPO's form follows the model's kind
        self.loss_options = LossOptions(gamma=train.mapo_gamma, smpo_scale=train.smpo_scale, dmpo_alpha=train.dmpo_alpha,
                                        dro_margin=train.dro_margin)

        # Contiguous weights: DeepSpeed's broadcast views each parameter as bytes, which needs a unit last stride.
        self.lora = train.lora is not None
        self.policy = unwrap(policy).to(self.device, memory_format=torch.contiguous_format).train()
        if train.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        # The reference is the policy as it starts, frozen, in the compute dtype: with LoRA, the same
        # UNet with its adapters off (a fresh adapter) or with a frozen copy of the adapter.
        self.reference, self.reference_adapter = None, None
        if self.lora:
            if not has_adapter(self.policy):
                add_policy_adapter(self.policy, train.lora, seed=config.seed)
            train_only_policy(self.policy)  # whatever the caller left trainable
            if reference is not None:
                if not isinstance(reference, AdapterView) or unwrap(reference) is not self.policy:
                    raise ValueError("under train.lora the reference must be an AdapterView of the policy's own UNet")
                self.reference_adapter = reference.adapter
            elif not is_identity(self.policy):
                copy_adapter(self.policy, POLICY, REFERENCE)
                self.reference_adapter = REFERENCE
            activate(self.policy, POLICY)
        elif train.loss not in REFERENCE_FREE:
            self.reference = copy.deepcopy(reference if reference is not None else policy).to(self.device)
            if self.reference.dtype != self.compute_dtype:  # diffusers warns on any .to(dtype), even a no-op
                self.reference.to(dtype=self.compute_dtype)
            self.reference.eval().requires_grad_(False)

        self.use_deepspeed = train.deepspeed is not None or dist.enabled
        if self.use_deepspeed and train.compile:
            raise ValueError("train.compile is not supported under DeepSpeed yet (the engine wraps the policy); "
                             "set train.compile: false, or train in one process without train.deepspeed")
        optimizer = build_optimizer(train.optimizer, self.policy.parameters(), train)
        lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=train.warmup_steps)
        self.ema = EMAModel(self.policy.parameters(), decay=train.ema_decay) if train.ema_decay else None
        if self.use_deepspeed:
            import deepspeed

            self.engine, self.optimizer, _, self.lr_schedule = deepspeed.initialize(
                model=self.policy,
                optimizer=optimizer,
                lr_scheduler=lr_schedule,
                config=deepspeed_config(self.train_cfg, self.accumulation, ema=self.ema is not None),
            )
            self.model = self.engine
        else:
            self.engine, self.optimizer, self.lr_schedule = None, optimizer, lr_schedule
            options = CPU_COMPILE_OPTIONS if self.device.type == "cpu" else None
            self.model = torch.compile(self.policy, options=options) if train.compile else self.policy
        self.step = 0
        self._checkpoint_seconds = 0.0  # how long the last checkpoint took to write (a SIGTERM's is skipped if slow)

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
        if self.train_cfg.noising == "ddim_inversion":
            # SmPO: winner and loser share t; each is inverted along the policy's own trajectory, and the
            # inverted noise is the target (an epsilon-prediction model: __init__ checks).
            x_t, target = ddim_invert(self.model, x0, t, self.scheduler.alphas_cumprod, steps=self.inversion_steps,
                                      encoder_hidden_states=embeds_in, added_cond_kwargs=added_in)
        else:
            x_t, target = noised_and_target(self.scheduler, x0, noise, t)
        autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32 and not self.use_deepspeed
            else contextlib.nullcontext()
        )
        with autocast:
            pred = self.model(x_t.to(input_dtype), t, encoder_hidden_states=embeds_in, added_cond_kwargs=added_in).sample
            pred_ref = None
            reference = self.reference
            if self.lora and self.train_cfg.loss not in REFERENCE_FREE:
                reference = self.policy  # the policy's graph is built: switching adapters now cannot change it
                activate(self.policy, self.reference_adapter)
            if reference is not None:
                with torch.no_grad():
                    ref_in = {k: v.to(self.compute_dtype) for k, v in added.items()} if added else None
                    pred_ref = reference(
                        x_t.to(self.compute_dtype), t, encoder_hidden_states=embeds.to(self.compute_dtype),
                        added_cond_kwargs=ref_in,
                    ).sample
            if self.lora:
                activate(self.policy, POLICY)
        cfg = self.train_cfg
        return preference_loss(
            cfg.loss, target, pred, pred_ref, beta=cfg.beta, labels=batch.label, options=self.loss_options,
            winner_preserving_mu=cfg.winner_preserving_mu, dspo_sdxl=self.dspo_sdxl,
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
            gen = generator(self.config.seed, self.step, micro, rank)
            batch = self.pairs.batch(idx, caption_dropout=self.config.data.caption_dropout, generator=gen).to(self.device)
            out = self._micro_step_loss(batch, gen)
            if self.engine is not None:
                self.engine.backward(out.loss)
                self.engine.step()
            else:
                (out.loss / self.accumulation).backward()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accumulation
        if self.engine is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.train_cfg.max_grad_norm)
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
        cfg = self.train_cfg
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
            self._log_line(f"{self.sampler.describe()}; {self.accumulation} micro steps of "
                           f"{cfg.micro_batch_pairs} pairs x {self.dist.world_size} ranks per optimizer step")
        metrics_path = self.output_dir / ("metrics.jsonl" if self.dist.is_main else f"metrics.rank{self.dist.rank}.jsonl")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="dpo", unit="step", disable=not (cfg.progress and self.dist.is_main))
        start_step, started = self.step, time.perf_counter()
        last_finite = None  # (step, loss) for the error message
        with interrupts.deferred():  # SIGTERM waits for the step to end: _stop_on_sigterm
            self._train_loop(bar, metrics_path, start_step, started, last_finite, stop_after)
        bar.close()
        if self.step == cfg.steps:
            self.save_final()
        return self.policy

    def _train_loop(self, bar, metrics_path, start_step, started, last_finite, stop_after) -> None:
        cfg = self.train_cfg
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
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['implicit_acc']:.2f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
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
        this_step = self.output_dir / "checkpoints" / f"step-{self.step:06d}"
        saved = this_step.is_dir()
        if not saved and self.step > 0 and self._checkpoint_seconds <= interrupts.QUICK_CHECKPOINT_S:
            saved = self.save_checkpoint() is not None
        newest = this_step if saved else max(this_step.parent.glob("step-[0-9]*[0-9]"), default=None)
        where = f"checkpoint {newest} (step {int(newest.name[5:])})" if newest is not None else "no checkpoint yet"
        if self.dist.is_main:
            self._log_line(f"stopped by SIGTERM at step {self.step}; {'wrote ' if saved else 'the newest is '}{where}")
        raise interrupts.Stopped(f"stopped by SIGTERM at DPO step {self.step} of {self.train_cfg.steps} in "
                                 f"{self.output_dir}; it resumes from {where}")

    def _stop_if_non_finite(self, metrics: dict, last_finite) -> None:
        """Stop at once on a NaN/inf loss or gradient norm (averaged over ranks, so every rank stops):
        nothing of this step is saved, and the last checkpoint stays the newest."""
        loss, norm = metrics["loss"], metrics.get("grad_norm", 0.0)
        if math.isfinite(loss) and math.isfinite(norm):
            return
        kept = latest_checkpoint(self.output_dir)
        before = f"the last finite loss was {last_finite[1]:.4g} at step {last_finite[0]}" if last_finite else "no step had a finite loss"
        raise NonFiniteError(
            f"{self.output_dir}: training diverged at step {self.step}: loss {loss}, gradient norm {norm}; {before}. "
            f"Nothing of this step was saved; the newest checkpoint is {kept or 'none'}. Lower train.learning_rate "
            f"(now {self.train_cfg.learning_rate:g}) or train.beta (now {self.train_cfg.beta:g}), or check the pairs "
            f"for NaN latents"
        )

    # ------------------------------------------------------------ checkpoints
    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights on the main rank (gathered under ZeRO-3), else None."""
        params = list(self.policy.parameters())
        gather = contextlib.nullcontext()
        if self.engine is not None and any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if self.dist.is_main and self.lora:
                return adapter_state(self.policy, POLICY)
            if self.dist.is_main:
                return {k: v.detach().float().cpu().clone() for k, v in self.policy.state_dict().items()}
        return None

    @property
    def weights_name(self) -> str:
        """The folder a checkpoint or ``final/`` keeps the trained weights in."""
        return "lora" if self.lora else "unet"

    def _save_unet(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:  # never write NaN weights where the next stage would load them
            raise NonFiniteError(f"refusing to save {path}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]})")
        if self.lora:
            save_adapter(path, state, self.policy)
            return
        unet = UNet2DConditionModel.from_config(self.policy.config)
        unet.load_state_dict(state)
        unet.save_pretrained(path)

    def save_checkpoint(self) -> Path:
        final = self.output_dir / "checkpoints" / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        started = time.perf_counter()
        try:
            written = self._write_checkpoint(final, tmp)
            self._checkpoint_seconds = time.perf_counter() - started
            return written
        except Exception as err:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no half checkpoint behind
            if disk_full(err, tmp):  # safetensors and torch.save report a full disk without the path
                raise OSError(errno.ENOSPC, "No space left on device", str(final)) from err
            raise

    def _write_checkpoint(self, final: Path, tmp: Path) -> Path:
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        state = self._full_state_dict()
        trainer_state = {"step": self.step, "sampler": self.sampler.state_dict()}
        if self.ema is not None:
            trainer_state["ema"] = self.ema.state_dict()
        if self.engine is not None:
            # A LoRA run's frozen base is the pretrained model: not copied into every checkpoint.
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=self.lora)
        else:
            trainer_state |= {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}
        self.dist.barrier()  # every rank's DeepSpeed shard is on disk
        if self.dist.is_main:
            self._save_unet(tmp / self.weights_name, state)
            torch.save(trainer_state, tmp / "trainer_state.pt")
            write_manifest(tmp)  # last: resume checks the files against it
            if final.exists():  # a damaged checkpoint of this step, skipped on resume: replaced
                shutil.rmtree(final)
            tmp.rename(final)  # atomic: a kill leaves a .tmp directory, never a half checkpoint
            for old in sorted(final.parent.glob("step-[0-9]*[0-9]"))[: -self.train_cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.dist.barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if self.engine is not None:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=not self.lora)
        else:
            if self.lora:
                load_adapter(self.policy, path / "lora", POLICY)
            else:
                self.policy.load_state_dict(UNet2DConditionModel.from_pretrained(path / "unet").state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        if self.dist.is_main:
            drop_metrics_after(self.output_dir / "metrics.jsonl", self.step)
            self._log_line(f"resumed from {path} at step {self.step}")

    def save_final(self) -> Path:
        """The trained UNet in diffusers layout (plus its EMA twin), for the next stage to load."""
        final = self.output_dir / "final"
        state = self._full_state_dict()
        if self.dist.is_main:
            (final / MANIFEST).unlink(missing_ok=True)  # the weights below replace the ones it lists
            self._save_unet(final / self.weights_name, state)
            if self.ema is not None:
                ema_unet = UNet2DConditionModel.from_config(self.policy.config)
                self.ema.copy_to(ema_unet.parameters())
                ema_unet.save_pretrained(final / "unet_ema")
            write_manifest(final)  # last: whoever loads these weights checks their sha256 against it
        self.dist.barrier()
        return final

    def _log_line(self, text: str) -> None:
        tqdm.write(text)
        with (self.output_dir / "train.log").open("a") as f:
            f.write(text + "\n")
