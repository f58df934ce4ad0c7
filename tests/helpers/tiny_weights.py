"""Tiny random metric weights written in each published layout (shared by the metric and eval tests)."""

import json
import math

import numpy as np
import torch
from PIL import Image

from sail_fast.diffusion.tiny import _tiny_tokenizer


def random_images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def tiny_clip_dir(path, projection_dim=16, act="gelu", processor_subdir=False):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = _tiny_tokenizer(max_length=16)
    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act=act,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act=act,
    )
    model = CLIPModel(
        CLIPConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=projection_dim,
            logit_scale_init_value=math.log(1 / 0.07),
        )
    ).eval()
    model.save_pretrained(path)
    processor_dir = path / "processor" if processor_subdir else path
    tokenizer.save_pretrained(processor_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(processor_dir)
    return model, tokenizer


OC_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": None, "width": 32, "heads": 2, "layers": 2},
}


def open_clip_state(cfg, seed=0):
    """Random weights under open_clip's CLIP key names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    def ln(prefix, w):
        return {f"{prefix}.weight": 1 + r(w), f"{prefix}.bias": r(w)}

    def blocks(prefix, w, layers):
        out = {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            out |= ln(f"{p}.ln_1", w) | ln(f"{p}.ln_2", w)
            out |= {
                f"{p}.attn.in_proj_weight": r(3 * w, w),
                f"{p}.attn.in_proj_bias": r(3 * w),
                f"{p}.attn.out_proj.weight": r(w, w),
                f"{p}.attn.out_proj.bias": r(w),
                f"{p}.mlp.c_fc.weight": r(4 * w, w),
                f"{p}.mlp.c_fc.bias": r(4 * w),
                f"{p}.mlp.c_proj.weight": r(w, 4 * w),
                f"{p}.mlp.c_proj.bias": r(w),
            }
        return out

    vw, tw, grid = v["width"], t["width"], v["image_size"] // v["patch_size"]
    state = {
        "logit_scale": torch.tensor(math.log(100.0)),
        "token_embedding.weight": r(t["vocab_size"], tw),
        "positional_embedding": r(t["context_length"], tw),
        "text_projection": r(tw, e),
        "visual.class_embedding": r(vw),
        "visual.positional_embedding": r(grid * grid + 1, vw),
        "visual.conv1.weight": r(vw, 3, v["patch_size"], v["patch_size"]),
        "visual.proj": r(vw, e),
        "attn_mask": torch.full((16, 16), float("-inf")).triu(1),
    }  # a buffer older checkpoints carry
    state |= ln("ln_final", tw) | ln("visual.ln_pre", vw) | ln("visual.ln_post", vw)
    state |= blocks("transformer", tw, t["layers"]) | blocks("visual.transformer", vw, v["layers"])
    return state


def hps_dir(path, name="HPS_v2.1_compressed.pt"):
    tokenizer = _tiny_tokenizer(max_length=16)
    cfg = json.loads(json.dumps(OC_CONFIG))
    cfg["text_cfg"]["vocab_size"] = len(tokenizer)
    state = open_clip_state(cfg)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path / name)
    tokenizer.save_pretrained(path / "tokenizer")
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    return state, cfg, tokenizer
