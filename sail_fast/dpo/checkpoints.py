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

from ..diffusion.lora import POLICY, adapter_state, load_adapter, save_adapter
from ..runs.run_folder import MANIFEST, disk_full, drop_metrics_after, write_manifest
from ..runs.state_files import StateFileError, load_state, save_state, state_paths

TRAINER_STATE = "trainer_state"  # trainer_state.json + trainer_state.safetensors


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
            raise NonFiniteError(
                f"refusing to save {path}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]})"
            )
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
            save_state(trainer_state, tmp, TRAINER_STATE)  # JSON and safetensors: nothing to unpickle
            write_manifest(tmp)  # last: resume checks the files against it
            if final.exists():  # a damaged checkpoint of this step, skipped on resume: replaced
                shutil.rmtree(final)
            tmp.rename(final)  # atomic: a kill leaves a .tmp directory, never a half checkpoint
            for old in self.layout.written_checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.dist.barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = read_trainer_state(path)
        if self.engine is not None:
            check_deepspeed_files(path / "deepspeed")  # DeepSpeed unpickles its files: refuse any that name code
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


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer state (step, sampler, optimizer, LR schedule, EMA), read without unpickling.
    Checkpoints written before the JSON format hold ``trainer_state.pt``: read with torch's weights-only
    loader, which refuses any pickle that names code."""
    legacy = checkpoint / "trainer_state.pt"
    if state_paths(checkpoint, TRAINER_STATE)[0].exists() or not legacy.is_file():
        return load_state(checkpoint, TRAINER_STATE)
    return weights_only_load(legacy)


def weights_only_load(path: Path):
    """``torch.load`` limited to tensors and plain containers; a file that names anything else is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateFileError(
            f"refusing {path}: it is not a plain tensor file ({first}); a checkpoint that names code "
            "is never loaded: resume from a checkpoint you wrote, or train that stage again"
        ) from None


def check_deepspeed_files(folder: Path) -> None:
    """DeepSpeed reads its checkpoint with a full unpickler; every file is first read with the weights-only
    loader, so a crafted file is refused before DeepSpeed opens it."""
    import torch.serialization

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for path in sorted(folder.rglob("*.pt")):
            weights_only_load(path)


def _deepspeed_safe_globals() -> list:
    """The plain data types DeepSpeed's checkpoints hold besides tensors (enums and a config namespace)."""
    from argparse import Namespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [Namespace, ZeroStageEnum, LossScaler, DynamicLossScaler]
