"""LoRA with peft: the policy is an adapter on the base UNet, and every reference is the same UNet
in another adapter state, so a LoRA run holds one UNet.

The adapters a run puts on its UNet:

- ``policy``: the adapter being trained (a stage's output);
- ``reference``: a frozen copy of the policy as a training stage started (a SAIL round's DPO
  reference); not made when the policy starts as the base, whose reference is every adapter off;
- ``previous``: a frozen earlier policy (``sail.ranking_reference: previous``).

``None`` (every adapter off) is the base model. ``AdapterView`` runs the UNet in one of these states
and looks like a UNet, so the sampler, the scorer and the evaluation take it unchanged.

Outputs are written in the diffusers LoRA format (``pytorch_lora_weights.safetensors``, keys
``unet.…``, the adapter's LoraConfig as metadata), so ``pipe.load_lora_weights(folder)`` loads them
into a plain diffusers pipeline.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

POLICY, REFERENCE, PREVIOUS, JUDGE = "policy", "reference", "previous", "judge"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def peft_config(settings):
    """peft's LoraConfig for ``train.lora`` (a LoraSettings). B starts at zero: the adapter adds nothing."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha or settings.rank,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        init_lora_weights=True,
    )


def has_adapter(unet: nn.Module, name: str = POLICY) -> bool:
    return name in (getattr(unet, "peft_config", None) or {})


def add_policy_adapter(unet: nn.Module, settings, seed: int = 0) -> nn.Module:
    """Put a fresh ``policy`` adapter on ``unet`` (in place), freeze every base weight, and return it.
    peft draws A from the global RNG; ``seed`` fixes it, so a resumed process rebuilds the same run."""
    if has_adapter(unet):
        raise ValueError("this UNet already has a policy adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(peft_config(settings), adapter_name=POLICY)
    activate(unet, POLICY)
    train_only_policy(unet)
    return unet


def train_only_policy(unet: nn.Module) -> None:
    """Freeze every weight of ``unet`` but the policy adapter's."""
    unet.requires_grad_(False)
    for param in adapter_parameters(unet, POLICY):
        param.requires_grad_(True)


def _tuner_layers(unet: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(unet: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name``, in module order."""
    return [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]


def activate(unet: nn.Module, adapter: str | None) -> None:
    """Run ``unet`` with ``adapter`` alone (None: every adapter off, the base model) from now on.
    Which parameters train is left as it was (peft's own switches would change it)."""
    layers = _tuner_layers(unet)
    if not layers:
        raise ValueError("this UNet has no LoRA adapter")
    first = layers[0]
    if (adapter is None and first.disable_adapters) or (
        adapter is not None and not first.disable_adapters and list(first.active_adapters) == [adapter]
    ):
        return  # already so: the common case, every forward of a stage
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for layer in layers:
        if adapter is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(adapter, inference_mode=True)
    for param in trainable:
        param.requires_grad_(True)


class AdapterView(nn.Module):
    """``unet`` with ``adapter`` active (None: the base); called like the UNet. Views share its weights."""

    def __init__(self, unet: nn.Module, adapter: str | None) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, *args, **kwargs):
        activate(self.unet, self.adapter)
        return self.unet(*args, **kwargs)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device


def unwrap(unet: nn.Module) -> nn.Module:
    """The UNet behind a view (or ``unet`` itself)."""
    return unet.unet if isinstance(unet, AdapterView) else unet


def adapter_state(unet: nn.Module, name: str = POLICY) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights in peft's naming (no adapter name in the keys), fp32 on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


def is_identity(unet: nn.Module, name: str = POLICY) -> bool:
    """True while adapter ``name`` adds exactly nothing (every B is zero, as peft initialises it)."""
    return all(not p.any() for n, p in unet.named_parameters() if f"lora_B.{name}." in n)


def copy_adapter(unet: nn.Module, source: str, target: str) -> None:
    """Adapter ``target`` := a frozen copy of adapter ``source`` (added with its config if missing)."""
    from peft import set_peft_model_state_dict

    if not has_adapter(unet, target):
        trainable = [p for p in unet.parameters() if p.requires_grad]
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            # A frozen copy never drops out: in a training step it is the reference, which must be deterministic.
            unet.add_adapter(dataclasses.replace(unet.peft_config[source], lora_dropout=0.0), adapter_name=target)
        for param in adapter_parameters(unet, target):
            param.requires_grad_(False)
        for param in trainable:  # diffusers' add_adapter makes the new adapter the active, trainable one
            param.requires_grad_(True)
    set_peft_model_state_dict(unet, adapter_state(unet, source), adapter_name=target)


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], unet: nn.Module) -> Path:
    """Write adapter weights (peft naming, as ``adapter_state``) in the diffusers LoRA format to ``folder``,
    through the pipeline class of ``unet``'s kind (an SDXL UNet takes text-time embeddings)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    sdxl = unet.config.addition_embed_type == "text_time"
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    config = unet.peft_config[POLICY].to_dict()
    metadata = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout")}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(state),
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    return Path(folder) / LORA_WEIGHTS


def load_adapter(unet: nn.Module, folder: str | Path, name: str = POLICY) -> None:
    """Load a diffusers-format LoRA folder (``save_adapter``) into adapter ``name`` of ``unet`` (in place);
    the adapter is made, frozen, with the policy's config when it does not exist yet."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / LORA_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{folder} holds no LoRA adapter ({LORA_WEIGHTS} is missing)")
    state = {k.removeprefix("unet."): v for k, v in load_file(file).items() if k.startswith("unet.")}
    if not has_adapter(unet, name):
        copy_adapter(unet, POLICY, name)
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{file} does not fit this UNet's adapter: unexpected keys such as {unexpected[0]}")


def merged_unet(unet: nn.Module, name: str = POLICY) -> nn.Module:
    """A plain UNet (no peft layers) with adapter ``name`` merged into its weights: W + delta (peft's
    ``get_delta_weight``). ``unet`` is left untouched (fusing and unfusing in place would round its weights)."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for module_name, module in unet.named_modules():
            if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
                key = f"{module_name}.weight"
                state[key] = state[key] + module.get_delta_weight(name).to(state[key].dtype)
    merged = UNet2DConditionModel.from_config(unet.config)
    if merged.dtype != unet.dtype:
        merged.to(unet.dtype)
    merged.load_state_dict(state)
    return merged.eval()
