"""``sail-fast plan``: per-GPU training memory for a config, before renting the GPUs.

Counted per rank, in bytes, for P trainable UNet parameters on G ranks:

- weights: the policy in its storage dtype (bf16/fp16 under DeepSpeed mixed precision, else
  fp32); ZeRO-3 partitions them over G.
- gradients: same dtype as the weights; ZeRO-2 and 3 partition them.
- optimizer: fp32 master weights (DeepSpeed mixed precision only) plus the optimizer's states
  (AdamW 8 bytes/param; bitsandbytes 8-bit AdamW 2 bytes/param for tensors of 4096+ elements,
  8 below; Adafactor factored row and column second moments); ZeRO-1/2/3 partition them.
- reference: the frozen copy in the compute dtype, whole on every rank.
- LoRA (``train.lora``): the base UNet is stored once and frozen; gradients and optimizer states
  cover only the adapter (rank r x (in + out) per targeted projection), and the reference is the
  same UNet with its adapters off, plus (in SAIL rounds) one frozen fp32 copy of the adapter.
- activations: the tensors autograd saves for backward, counted by running the UNet forward
  on the meta device (no memory, no weights) at the micro batch (2 x micro_batch_pairs) and
  latent size, with attention as a fused kernel saves it (q, k, v, output, log-sum-exp). With
  gradient checkpointing, each checkpointed block keeps only its inputs, and the largest block
  is recomputed at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ..diffusion.architectures import UNET_CONFIGS
from ..dpo.trainer import DTYPES
from ..runs.config import LoraSettings, ModelConfig, TrainConfig

GIB = 2**30
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_BNB_MIN_8BIT = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations


def unet_config_for(model) -> dict:
    """The UNet config a ModelConfig trains: a local directory's unet/config.json, the toy's, a
    tiny stack's, or (for a hub id) the SD1.5/SDXL layout its kind names."""
    if model.toy:
        from ..diffusion.stack import TOY_MODEL_DIR

        return json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    if model.tiny is not None:
        from ..diffusion.tiny import tiny_stack

        return dict(
            tiny_stack(model.tiny, sample_size=model.tiny_sample_size, in_channels=model.tiny_in_channels).unet.config
        )
    local = Path(model.path) / "unet" / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if model.kind in UNET_CONFIGS:
        return UNET_CONFIGS[model.kind]
    raise ValueError(f"cannot tell the UNet of {model.path!r}: no {local}; set model.kind to sd15 or sdxl")


def meta_unet(config: dict, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    from diffusers.utils import logging

    keys = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(keys)
    if dtype != unet.dtype:  # diffusers warns on every cast of a model it did not load; nothing is lost here
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            unet.to(dtype)
        finally:
            logging.set_verbosity(level)
    return unet


def lora_shapes(unet: torch.nn.Module, lora) -> list[tuple[int, int]]:
    """The adapter's weight shapes (A and B of every targeted linear layer) that peft would add."""
    shapes = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name == t or name.endswith("." + t) for t in lora.target_modules
        ):
            shapes += [(lora.rank, module.in_features), (module.out_features, lora.rank)]
    return shapes


def optimizer_state_bytes(params, optimizer: str) -> int:
    """Optimizer state bytes for ``params`` (a module's parameters, or any tensors of their shapes)."""
    total = 0
    for p in params.parameters() if isinstance(params, torch.nn.Module) else params:
        n = p.numel()
        if optimizer == "adamw":
            total += 8 * n
        elif optimizer == "adamw8bit":
            # uint8 moments, a 256-entry fp32 code book each, and an fp32 absmax per 256-block each
            total += 2 * n + 2 * 256 * 4 + 8 * -(-n // 256) if n >= _BNB_MIN_8BIT else 8 * n
        elif optimizer == "adafactor":
            shape = p.shape
            total += 4 * (n // shape[-1] + n // shape[-2]) if len(shape) >= 2 else 4 * n
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return total


class _SavedTensors:
    """Counts the distinct storage autograd saves for backward (views count once, with their base)."""

    def __init__(self) -> None:
        self.total, self._seen, self._keep, self.paused = 0, set(), [], False

    def add(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        if not self.paused and id(base) not in self._seen:
            self._seen.add(id(base))
            self._keep.append(base)  # keeps ids unique while counting
            self.total += base.numel() * base.element_size()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


def activation_bytes(
    config: dict, batch: int, latent: int, dtype: torch.dtype, checkpointing: bool, text_tokens: int = 77
) -> int:
    """Bytes autograd holds between the forward and backward of one micro batch."""
    unet = meta_unet(config, dtype)
    saved = _SavedTensors()
    sdpa = F.scaled_dot_product_attention

    def fused_attention(q, k, v, *args, **kwargs):
        # Count what a flash / memory-efficient kernel keeps, not the math path's attention matrix.
        saved.paused = True
        out = sdpa(q, k, v, *args, **kwargs)
        saved.paused = False
        for t in (q, k, v, out):
            saved.add(t)
        saved.total += q.shape[0] * q.shape[1] * q.shape[2] * 4  # log-sum-exp, fp32
        return out

    blocks: list[tuple[int, int]] = []  # (bytes saved inside, bytes of its input) per checkpointed block
    starts: dict[int, int] = {}

    def before(module, args):
        starts[id(module)] = saved.total

    def after(module, args, output):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        blocks.append(
            (saved.total - starts.pop(id(module)), 0 if first is None else first.numel() * first.element_size())
        )

    hooks = []
    if checkpointing:  # diffusers checkpoints each resnet and transformer of every block
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            for part in [*getattr(block, "resnets", []), *getattr(block, "attentions", [])]:
                hooks += [part.register_forward_pre_hook(before), part.register_forward_hook(after)]

    cross = config.get("cross_attention_dim", 768)
    cross = sum(cross) if isinstance(cross, (list, tuple)) else cross
    meta = {"device": "meta", "dtype": dtype}
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.zeros(batch, pooled, **meta), "time_ids": torch.zeros(batch, 6, **meta)}
    F.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            x = torch.zeros(batch, config["in_channels"], latent, latent, **meta, requires_grad=True)
            unet(
                x,
                torch.zeros(batch, dtype=torch.long, device="meta"),
                encoder_hidden_states=torch.zeros(batch, text_tokens, cross, **meta),
                added_cond_kwargs=added,
            )
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    if not checkpointing:
        return saved.total
    inside = sum(b for b, _ in blocks)
    return saved.total - inside + sum(i for _, i in blocks) + max(b for b, _ in blocks)


def plan_memory(
    model: ModelConfig,
    gpus: int,
    *,
    zero_stage: int,
    optimizer: str,
    mixed_precision: str,
    checkpointing: bool,
    micro_batch_pairs: int,
    latent: int,
    deepspeed: bool | None = None,
    activations: int | None = None,
    lora=None,
) -> MemoryPlan:
    """The per-rank memory plan (bytes) of one training configuration (``activations``: reuse a count;
    ``lora``: a LoraSettings, to train an adapter instead of the UNet)."""
    unet_config = unet_config_for(model)
    compute = DTYPES[mixed_precision]
    deepspeed = zero_stage > 0 if deepspeed is None else deepspeed
    unet = meta_unet(unet_config)
    params = sum(p.numel() for p in unet.parameters())
    # DeepSpeed mixed precision stores the module in bf16/fp16 with fp32 masters in the optimizer;
    # the plain path keeps fp32 weights and autocasts.
    weight_bytes = _BYTES[mixed_precision] if deepspeed else 4
    master = 4 * params if deepspeed and mixed_precision != "fp32" else 0
    share = lambda stage: 1 / gpus if zero_stage >= stage else 1.0  # noqa: E731
    if activations is None:
        activations = activation_bytes(unet_config, 2 * micro_batch_pairs, latent, compute, checkpointing)
    if lora is not None:
        adapter = [torch.empty(shape, device="meta") for shape in lora_shapes(unet, lora)]
        trainable = sum(a.numel() for a in adapter)
        master = 4 * trainable if deepspeed and mixed_precision != "fp32" else 0
        return MemoryPlan(
            weights=weight_bytes * (params + trainable) * share(3),
            gradients=weight_bytes * trainable * share(2),
            optimizer=(master + optimizer_state_bytes(adapter, optimizer)) * share(1),
            reference=weight_bytes * trainable,  # a frozen copy of the adapter; the base is the same UNet
            activations=activations,
        )
    return MemoryPlan(
        weights=weight_bytes * params * share(3),
        gradients=weight_bytes * params * share(2),
        optimizer=(master + optimizer_state_bytes(unet, optimizer)) * share(1),
        reference=_BYTES[mixed_precision] * params,
        activations=activations,
    )


def latent_size(model: ModelConfig, resolution: int) -> int:
    """The latent side a model trains at for images of ``resolution`` (data.resolution): / the VAE factor;
    pixel-space models: the resolution itself."""
    if model.toy or (model.tiny is not None and not model.with_vae):
        return resolution
    return resolution // 8


def format_plan(
    model: ModelConfig,
    train: TrainConfig,
    resolution: int,
    gpus: int,
    gpu_memory_gb: float = 80.0,
    overhead_gb: float = 2.0,
) -> str:
    """A table over optimizers, ZeRO stages and checkpointing for ``model`` trained by ``train`` on images of
    ``resolution``; the train section's own row is marked."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1 (the GPUs the run trains on), got {gpus}")
    if not gpu_memory_gb > 0:  # also refuses NaN
        raise ValueError(f"--gpu-memory must be > 0 (GB per GPU, e.g. 80), got {gpu_memory_gb:g}")
    own_stage = 0
    if train.deepspeed:
        ds_file = Path(train.deepspeed)
        if not ds_file.is_file():
            raise FileNotFoundError(
                f"train.deepspeed={ds_file} not found from {Path.cwd()}; run from the repository root "
                "or give an absolute path"
            )
        own_stage = json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage", 0)
    latent = latent_size(model, resolution)
    lines = [
        f"per-GPU training memory, {gpus} GPUs, micro batch {train.micro_batch_pairs} pairs "
        f"({2 * train.micro_batch_pairs} images) at {latent}x{latent} latents, {train.mixed_precision}; "
        f"fits = total + {overhead_gb:g} GB (CUDA context, allocator slack) <= {gpu_memory_gb:g} GB",
        "| trains | optimizer | ZeRO | checkpointing | weights | grads | optimizer | reference | activations | total GB | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    compute = DTYPES[train.mixed_precision]
    unet_config = unet_config_for(model)
    activations = {
        ckpt: activation_bytes(unet_config, 2 * train.micro_batch_pairs, latent, compute, ckpt)
        for ckpt in (False, True)
    }
    lora = train.lora or LoraSettings()  # the config's adapter, else the default one
    settings = [(None, ("adamw", "adamw8bit", "adafactor"), (0, 2, 3)), (lora, ("adamw", "adamw8bit"), (0, 2))]
    for adapter, optimizers, stages in settings:
        for optimizer in optimizers:
            for stage in stages:
                for ckpt in (False, True):
                    plan = plan_memory(
                        model,
                        gpus,
                        zero_stage=stage,
                        optimizer=optimizer,
                        mixed_precision=train.mixed_precision,
                        checkpointing=ckpt,
                        lora=adapter,
                        micro_batch_pairs=train.micro_batch_pairs,
                        latent=latent,
                        activations=activations[ckpt],
                    )
                    own = (
                        optimizer == train.optimizer
                        and stage == own_stage
                        and ckpt == train.gradient_checkpointing
                        and (adapter is None) == (train.lora is None)
                    )
                    fits = plan.total / GIB + overhead_gb <= gpu_memory_gb
                    cells = [plan.weights, plan.gradients, plan.optimizer, plan.reference, plan.activations, plan.total]
                    name = f"**{optimizer}** (config)" if own else optimizer
                    trains = "UNet" if adapter is None else f"LoRA r{adapter.rank}"
                    lines.append(
                        f"| {trains} | {name} | {stage or '-'} | {'on' if ckpt else 'off'} | "
                        + " | ".join(f"{c / GIB:.2f}" for c in cells)
                        + f" | {'yes' if fits else 'no'} |"
                    )
    return "\n".join(lines)
