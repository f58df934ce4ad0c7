"""The diffusion model stack SAIL trains: load or build it, and encode prompts.

SAIL fine-tunes only the UNet; the text encoders and the VAE stay frozen, so they are
loaded in eval mode with gradients off. Prompt encoding follows diffusers'
StableDiffusionPipeline (SD1.5) and StableDiffusionXLPipeline (SDXL) exactly, so a
trained UNet drops back into those pipelines unchanged.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = ["DiffusionStack", "PromptEmbeds", "load_stack"]

KINDS = ("sd15", "sdxl")
# The toy world's pretrained stack, shipped in the package (a diffusers directory, pixel space, no VAE).
TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "toy_model"  # shipped inside the package

# The diffusers pipeline class each kind corresponds to, written to model_index.json.
_PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}

# Each requirement is a tuple of alternatives: the first name is the canonical one,
# any of them satisfies it. Sharded checkpoints come with an index file instead.
_DIFFUSERS_MODEL_FILES = (
    ("config.json",),
    (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin.index.json",
    ),
)
_TEXT_ENCODER_FILES = (
    ("config.json",),
    ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"),
)
# Hub SD repos ship vocab.json + merges.txt; transformers>=5 saves tokenizer.json only,
# which holds both, so it satisfies either requirement.
_TOKENIZER_FILES = (("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json"))
_SCHEDULER_FILES = (("scheduler_config.json",),)


@dataclass
class PromptEmbeds:
    """Encoded prompts, one row per prompt.

    prompt_embeds: [P, L, D] token embeddings the UNet cross-attends to.
    pooled_prompt_embeds: [P, D2] projected pooled embedding of text_encoder_2 (SDXL),
        None for SD1.5.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "PromptEmbeds":
        pooled = self.pooled_prompt_embeds
        return PromptEmbeds(fn(self.prompt_embeds), None if pooled is None else fn(pooled))

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def repeat_each(self, n: int) -> "PromptEmbeds":
        """[a, b] -> [a]*n + [b]*n, matching latents sampled n per prompt."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx) -> "PromptEmbeds":
        # An int keeps the batch dimension so the result is still a valid batch.
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.prompt_embeds.device)
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        items = list(items)
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item")
        has_pooled = [e.pooled_prompt_embeds is not None for e in items]
        if any(has_pooled) and not all(has_pooled):
            raise ValueError("cannot concatenate PromptEmbeds with and without pooled_prompt_embeds")
        pooled = torch.cat([e.pooled_prompt_embeds for e in items]) if all(has_pooled) else None
        return PromptEmbeds(torch.cat([e.prompt_embeds for e in items]), pooled)


@dataclass
class DiffusionStack:
    kind: str
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    vae: AutoencoderKL | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "sdxl" and (self.tokenizer_2 is None or self.text_encoder_2 is None):
            raise ValueError("an sdxl stack needs tokenizer_2 and text_encoder_2")

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def sample_size(self) -> int:
        """Latent side length the UNet was trained at."""
        return self.unet.config.sample_size

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 8

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _text_pairs(self):
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.is_sdxl:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return pairs

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | str) -> PromptEmbeds:
        """Encode prompts as the diffusers pipelines do; "" is the unconditional prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")

        hidden, pooled = [], None
        for tokenizer, encoder in self._text_pairs():
            _warn_if_cut(tokenizer, prompts)
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            if not self.is_sdxl:
                # SD1.5 conditions on the final layer (after the final layer norm).
                hidden.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            # SDXL uses the penultimate layer of both encoders, pooled from the last one.
            hidden.append(out.hidden_states[-2])
            if isinstance(encoder, CLIPTextModelWithProjection):
                pooled = out.text_embeds
        if self.is_sdxl and pooled is None:
            raise TypeError("text_encoder_2 must be a CLIPTextModelWithProjection to give pooled embeddings")
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)

    def added_cond_kwargs(
        self,
        embeds: PromptEmbeds,
        height: int,
        width: int,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> dict | None:
        """SDXL's micro-conditioning for the UNet; None for SD1.5.

        height/width are the LATENT size; they become pixels via vae_scale_factor.
        original_size, crop_top_left and target_size are (h, w) in pixels, as in
        diffusers, and default to the pixel size of the latents.
        """
        if not self.is_sdxl:
            return None
        pooled = embeds.pooled_prompt_embeds
        if pooled is None:
            raise ValueError("sdxl needs pooled_prompt_embeds; encode with this stack's encode_prompts")
        pixel_size = (int(height) * self.vae_scale_factor, int(width) * self.vae_scale_factor)
        original_size = tuple(original_size) if original_size is not None else pixel_size
        target_size = tuple(target_size) if target_size is not None else pixel_size
        time_ids = list(original_size) + list(crop_top_left) + list(target_size)
        time_ids = torch.tensor(time_ids, dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6).clone()}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the diffusers pipeline layout that load_stack (and diffusers) read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        for name, tokenizer, encoder in self._named_text_parts():
            _save_tokenizer(tokenizer, path / name[0])
            encoder.save_pretrained(path / name[1])
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        (path / "model_index.json").write_text(json.dumps(self._model_index(), indent=2, sort_keys=True) + "\n")

    def _named_text_parts(self):
        parts = [(("tokenizer", "text_encoder"), self.tokenizer, self.text_encoder)]
        if self.is_sdxl:
            parts.append((("tokenizer_2", "text_encoder_2"), self.tokenizer_2, self.text_encoder_2))
        return parts

    def _model_index(self) -> dict:
        import diffusers

        def entry(module, library):
            return [library, type(module).__name__] if module is not None else [None, None]

        index = {
            "_class_name": _PIPELINES[self.kind],
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "scheduler": entry(self.scheduler, "diffusers"),
            "text_encoder": entry(self.text_encoder, "transformers"),
            "tokenizer": entry(self.tokenizer, "transformers"),
            "unet": entry(self.unet, "diffusers"),
            "vae": entry(self.vae, "diffusers"),
        }
        if self.is_sdxl:
            index["text_encoder_2"] = entry(self.text_encoder_2, "transformers")
            index["tokenizer_2"] = entry(self.tokenizer_2, "transformers")
            index["force_zeros_for_empty_prompt"] = True
        else:
            index["safety_checker"] = [None, None]
            index["requires_safety_checker"] = False
        return index


def _save_tokenizer(tokenizer: CLIPTokenizer, directory: Path) -> None:
    # Write the hub SD layout (vocab.json + merges.txt + tokenizer_config.json).
    # transformers>=5 would write only tokenizer.json, which older readers lack.
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    tokenizer.backend_tokenizer.model.save(str(directory))
    (directory / "tokenizer.json").unlink(missing_ok=True)


_warned_cut = False  # a long prompt is reported once per process, not once per batch


def _warn_if_cut(tokenizer, prompts: list[str]) -> None:
    """Say once when a prompt is longer than the text encoder reads (it is cut, as the diffusers pipelines cut it)."""
    global _warned_cut
    limit = tokenizer.model_max_length
    if _warned_cut or limit > 10**6:  # no limit configured
        return
    # A token covers at least one character, so only prompts this long can pass the limit: the rest are not tokenized.
    long = [p for p in prompts if len(p) > limit - 2]
    cut = [p for p in long if len(tokenizer(p, truncation=True, max_length=limit + 1).input_ids) > limit]
    if cut:
        _warned_cut = True
        print(
            f"WARNING: {len(cut)} prompt(s) are longer than the text encoder's {limit} tokens and are cut there "
            f"(first: {cut[0][:60]!r}..., {len(cut[0])} characters); later ones are not reported",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------- loading


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a filesystem path.
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) or path.startswith((".", "~"))


def _read_model_index(root: Path) -> dict | None:
    try:
        return json.loads((root / "model_index.json").read_text())
    except FileNotFoundError:
        return None


def _kind_from_index(index: dict | None, has_text_encoder_2: bool) -> str:
    if index is not None and "_class_name" in index:
        return "sdxl" if "XL" in index["_class_name"] else "sd15"
    if index is not None and "text_encoder_2" in index:
        return "sdxl" if index["text_encoder_2"][0] is not None else "sd15"
    return "sdxl" if has_text_encoder_2 else "sd15"


def _expected_files(kind: str, with_vae: bool) -> list[tuple[str, ...]]:
    groups = [("unet", _DIFFUSERS_MODEL_FILES), ("scheduler", _SCHEDULER_FILES)]
    groups += [("tokenizer", _TOKENIZER_FILES), ("text_encoder", _TEXT_ENCODER_FILES)]
    if kind == "sdxl":
        groups += [("tokenizer_2", _TOKENIZER_FILES), ("text_encoder_2", _TEXT_ENCODER_FILES)]
    if with_vae:
        groups += [("vae", _DIFFUSERS_MODEL_FILES)]
    return [tuple(f"{sub}/{name}" for name in alternatives) for sub, reqs in groups for alternatives in reqs]


def _check_local_dir(root: Path, kind: str, with_vae: bool) -> None:
    expected = _expected_files(kind, with_vae)
    missing = [alts for alts in expected if not any((root / a).is_file() for a in alts)]
    if not missing:
        return

    def fmt(alts):
        return alts[0] + (f" (or {', '.join(alts[1:])})" if len(alts) > 1 else "")

    where = "does not exist" if not root.exists() else "is incomplete"
    raise FileNotFoundError(
        f"diffusers model directory {str(root)!r} {where} (kind={kind}, with_vae={with_vae}).\n"
        "Expected files:\n"
        + "".join(f"  {fmt(a)}\n" for a in expected)
        + "Missing files:\n"
        + "".join(f"  {fmt(a)}\n" for a in missing)
    )


def _hub_mode() -> str:
    from huggingface_hub import constants

    return "offline mode" if constants.is_offline_mode() else "online"


def check_hub_weights(path_or_id: str | os.PathLike) -> None:
    """Offline, a hub id whose weights are not in the Hugging Face cache fails here in one line, before any work
    (instead of in a diffusers traceback once the run has started)."""
    from huggingface_hub import constants, try_to_load_from_cache

    source = os.fspath(path_or_id)
    if Path(source).expanduser().is_dir() or _looks_like_local_path(source) or not constants.is_offline_mode():
        return
    if not isinstance(try_to_load_from_cache(source, "unet/config.json"), str):
        raise FileNotFoundError(
            f"model.path {source!r} is not a local folder, and the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE) "
            f"with no copy in its cache ({constants.HF_HUB_CACHE}): download it where the hub is reachable "
            f"(hf download {source}) or set model.path to a local diffusers folder"
        )


def _resolve_hub_kind(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        index_file = hf_hub_download(repo_id, "model_index.json")
    except Exception as e:  # offline, unknown repo, gated repo, no network
        raise OSError(
            f"{repo_id!r} is not a local directory and its model_index.json could not be fetched from "
            f"the Hugging Face Hub ({_hub_mode()}): {e} "
            "Pass a local diffusers directory, or pre-download the model into the HF cache."
        ) from e
    index = json.loads(Path(index_file).read_text())
    return _kind_from_index(index, has_text_encoder_2=False)


def load_stack(
    path_or_id: str | os.PathLike,
    *,
    kind: str | None = None,
    with_vae: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiffusionStack:
    """Load a stack from a local diffusers pipeline directory or a Hub model id.

    kind ("sd15" or "sdxl") is read from model_index.json, else from the presence of
    text_encoder_2/. A missing or incomplete local directory raises FileNotFoundError
    listing expected and missing files before anything heavy is loaded.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    source = os.fspath(path_or_id)
    root = Path(source).expanduser()

    is_local = root.is_dir() or _looks_like_local_path(source)
    if is_local:
        if kind is None:
            kind = _kind_from_index(_read_model_index(root), (root / "text_encoder_2").is_dir())
        _check_local_dir(root, kind, with_vae)
        source = str(root)
    else:
        check_hub_weights(source)
    if not is_local and kind is None:
        kind = _resolve_hub_kind(source)

    where = "" if is_local else f" from the Hugging Face Hub ({_hub_mode()}; not a local directory)"

    def load(cls, subfolder, **kw):
        try:
            return cls.from_pretrained(source, subfolder=subfolder, **kw)
        except OSError as e:
            raise OSError(f"could not load {subfolder}/ of {source!r}{where}: {e}") from e

    unet = load(UNet2DConditionModel, "unet", torch_dtype=dtype)
    scheduler = load(DDPMScheduler, "scheduler")
    tokenizer = load(CLIPTokenizer, "tokenizer")
    text_encoder = load(CLIPTextModel, "text_encoder", dtype=dtype)
    tokenizer_2 = text_encoder_2 = vae = None
    if kind == "sdxl":
        tokenizer_2 = load(CLIPTokenizer, "tokenizer_2")
        text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype)
    if with_vae:
        vae = load(AutoencoderKL, "vae", torch_dtype=dtype)

    stack = DiffusionStack(kind, unet, scheduler, tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae)
    return _finalize(stack, dtype, device)


def _finalize(stack: DiffusionStack, dtype: torch.dtype, device) -> DiffusionStack:
    for module in (stack.unet, stack.text_encoder, stack.text_encoder_2, stack.vae):
        if module is None:
            continue
        # Cast only when needed: diffusers warns on every dtype-changing .to().
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.to(device)
        if module is not stack.unet:
            module.eval().requires_grad_(False)
    return stack


def load_unet(path: str | Path, like: UNet2DConditionModel) -> UNet2DConditionModel:
    """A saved UNet (diffusers layout) in ``like``'s dtype and device, in eval mode."""
    if not (Path(path) / "config.json").is_file():  # else diffusers takes the path for a hub id and blames the network
        raise FileNotFoundError(f"{path} holds no saved UNet (no config.json there)")
    return UNet2DConditionModel.from_pretrained(path, torch_dtype=like.dtype).to(like.device).eval()
