"""A DPO trainer's checkpoints: written atomically with a sha256 manifest, read back on resume, and the
final weights (plus the EMA twin) in diffusers layout for the next stage to load. Under ZeRO-3 the main
rank gathers the full weights; under LoRA only the adapter is written, in the diffusers LoRA format."""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..lora import POLICY, adapter_state, load_adapter, save_adapter
from ..rundir import MANIFEST, disk_full, drop_metrics_after, write_manifest


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient norm."""


class TrainerCheckpoints:
    """The checkpoint half of ``DPOTrainer`` (it provides policy, engine, optimizer, lr_schedule, ema,
    sampler, step, dist, cfg, lora and layout, its TrainingLayout)."""

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
        final = self.layout.checkpoint(self.step)
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
            for old in self.layout.written_checkpoints()[: -self.cfg.keep_checkpoints]:
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
            drop_metrics_after(self.layout.metrics, self.step)
            self._log_line(f"resumed from {path} at step {self.step}")

    def save_final(self) -> Path:
        """The trained UNet in diffusers layout (plus its EMA twin), for the next stage to load."""
        final = self.layout.final
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
