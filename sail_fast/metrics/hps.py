"""HPSv2 / HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, text).

The HPS checkpoint is an open_clip state dict. It is loaded into transformers' CLIPModel, which
is the same architecture (pre-LN transformer, exact GELU, class-token and end-of-text pooling,
projections without bias), by renaming keys, splitting the fused attention in-projection into
q/k/v and transposing the two projections. transformers rather than open_clip itself, because
open_clip needs torchvision, and PyPI has no torchvision build for CPU-only torch; the test
checks the conversion against a literal forward of the open_clip layout.

The weights directory holds:
- ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt`` (the file name gives the version);
- ``tokenizer/``: the OpenAI CLIP BPE tokenizer (vocab.json and merges.txt, or tokenizer.json),
  the 49,408-token vocabulary open_clip's ViT-H-14 uses; any CLIP model directory's copy will do;
- optionally ``open_clip_config.json`` in open_clip's model-config format, for an architecture
  other than ViT-H-14.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import MissingWeightsError, require_files
from .clip_metrics import CLIP_TOKENIZER, ClipFeatures, _ImageTextCosine

# open_clip's ViT-H-14 model config.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
CHECKPOINTS = {"HPS_v2.1_compressed.pt": "HPSv2.1", "HPS_v2_compressed.pt": "HPSv2"}


def transformers_clip_config(oc: dict, *, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """A CLIPConfig equal to an open_clip model config (open_clip's defaults filled in)."""
    from transformers import CLIPConfig

    v, t = oc["vision_cfg"], oc["text_cfg"]
    act = "quick_gelu" if oc.get("quick_gelu", False) else "gelu"
    vision = {
        "hidden_size": v["width"],
        "intermediate_size": int(v["width"] * v.get("mlp_ratio", 4.0)),
        "num_hidden_layers": v["layers"],
        "num_attention_heads": v["width"] // v.get("head_width", 64),
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }
    text = {
        "hidden_size": t["width"],
        "intermediate_size": int(t["width"] * t.get("mlp_ratio", 4.0)),
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "vocab_size": t["vocab_size"],
        "max_position_embeddings": t["context_length"],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=oc["embed_dim"])


def _blocks(src: str, dst: str, state: dict, out: dict, layers: int) -> None:
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
        for a, b in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{d}.{b}.weight"] = state[f"{s}.{a}.weight"]
            out[f"{d}.{b}.bias"] = state[f"{s}.{a}.bias"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{s}.attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{d}.self_attn.q_proj.{kind}"], out[f"{d}.self_attn.k_proj.{kind}"] = q, k
            out[f"{d}.self_attn.v_proj.{kind}"] = v


def open_clip_to_transformers(state: dict[str, torch.Tensor], oc: dict) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict renamed (and split, transposed) to transformers' CLIPModel keys."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {
        "logit_scale": state["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),  # open_clip computes x @ P
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # transformers' spelling
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
    }
    _blocks("transformer", "text_model.encoder", state, out, oc["text_cfg"]["layers"])
    _blocks("visual.transformer", "vision_model.encoder", state, out, oc["vision_cfg"]["layers"])
    return {k: v.contiguous() for k, v in out.items()}


def _checkpoint_file(root: Path) -> Path:
    if root.is_file():
        return root
    found = [root / name for name in CHECKPOINTS if (root / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"hpsv2: {root} holds both {found[0].name} and {found[1].name}; pass the file you mean")
    if not found:
        require_files(root, "hpsv2", {"checkpoint": tuple(CHECKPOINTS)})  # raises with the listing
    return found[0]


class HPSv2(_ImageTextCosine):
    name = "hpsv2"

    def __init__(self, root: str | Path, *, device=None, dtype: torch.dtype = torch.float32) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        file = _checkpoint_file(Path(root))
        folder = file.parent
        self.weights = str(file)
        self.version = CHECKPOINTS.get(file.name, f"HPS ({file.name})")
        require_files(folder, self.name, {"tokenizer/": ("tokenizer",)})
        require_files(folder / "tokenizer", self.name, {"tokenizer": CLIP_TOKENIZER})
        config_file = folder / "open_clip_config.json"
        oc = json.loads(config_file.read_text()) if config_file.is_file() else VIT_H_14
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        config = transformers_clip_config(
            oc,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        try:
            converted = open_clip_to_transformers(state, oc)
        except KeyError as e:
            raise MissingWeightsError(f"hpsv2: {file} is not an open_clip CLIP state dict (no {e.args[0]!r})") from None
        with torch.device("meta"):
            model = CLIPModel(config)
        model.load_state_dict(converted, strict=False, assign=True)
        _check_filled(model, file)
        size = oc["vision_cfg"]["image_size"]
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.clip = ClipFeatures(model.to(dtype), image_processor, tokenizer, device=device)

    def _score_batch(self, images, prompts):
        return self.cosine(images, prompts)


def _check_filled(model, file: Path) -> None:
    """Every parameter came from the checkpoint (buffers such as position ids are rebuilt)."""
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise MissingWeightsError(
            f"hpsv2: {file} lacks {len(empty)} weights the model needs, e.g. {empty[:3]}; "
            "is open_clip_config.json right for this checkpoint?"
        )
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"hpsv2: buffer {name} was not rebuilt after loading {file}")
            module_name, _, attr = name.rpartition(".")
            positions = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            model.get_submodule(module_name).register_buffer(attr, positions, persistent=False)
