"""Metrics from local weights, on tiny random models written to a temp dir in each published layout.

Each score is checked against a literal formula computed here from the raw weights: transformers'
own CLIP forward for PickScore and CLIP score, explicit matmuls for the MLP heads, and plain
re-implementations of the open_clip and BLIP forwards for HPSv2 and ImageReward.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_weights import hps_dir, random_images, tiny_clip_dir

from sail_fast.metrics import METRICS, MissingWeightsError, load_metric
from sail_fast.metrics.image_reward import REWARD_MEAN, REWARD_STD

PROMPTS = ["a red cat", "the blue sky over a field", "an apple", "two dogs and a ball", "x"]


def clip_logits(model, tokenizer, metric, images, prompts):
    """logits_per_image from transformers' own CLIPModel.forward, on the metric's preprocessed inputs."""
    pixels = metric.clip.image_processor(images=images, return_tensors="pt").pixel_values
    tokens = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    return out.logits_per_image


@pytest.mark.parametrize("processor_subdir", [False, True])
def test_pickscore_is_the_scaled_cosine(tmp_path, processor_subdir):
    model, tokenizer = tiny_clip_dir(tmp_path, processor_subdir=processor_subdir)
    metric = load_metric("pickscore", tmp_path, device="cpu")
    images = random_images(len(PROMPTS))
    got = metric.score(images, PROMPTS)
    want = clip_logits(model, tokenizer, metric, images, PROMPTS).diagonal()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert abs(model.logit_scale.exp().item() - 1 / 0.07) < 1e-3  # so the scale really multiplies in
    # batching does not change a score
    metric.batch_size = 2
    torch.testing.assert_close(metric.score(images, PROMPTS), got, atol=1e-5, rtol=1e-5)


def test_clipscore_is_100_times_the_clamped_cosine(tmp_path):
    model, tokenizer = tiny_clip_dir(tmp_path)
    metric = load_metric("clipscore", tmp_path, device="cpu")
    images = random_images(8, seed=1)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    logits = clip_logits(model, tokenizer, metric, images, prompts).diagonal()
    cos = logits / model.logit_scale.exp()
    got = metric.score(images, prompts)
    torch.testing.assert_close(got, (100 * cos).clamp(min=0), atol=1e-3, rtol=1e-4)
    assert (cos < 0).any() and (cos > 0).any(), "the tiny model should give both signs, so the clamp is exercised"


def _mlp_literal(state, x):
    """768-1024-128-64-16-1 with no activations: five affine maps in a row."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1)


def test_aesthetic_is_the_linear_head_on_the_normalised_embedding(tmp_path):
    from transformers import CLIPModel

    clip_dir = tmp_path / "clip"
    tiny_clip_dir(clip_dir, projection_dim=768)
    from sail_fast.metrics.base import mlp_head

    torch.manual_seed(1)
    state = {f"layers.{k}": v for k, v in mlp_head().state_dict().items()}
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    metric = load_metric("aesthetic", tmp_path, device="cpu")
    images = random_images(4)
    got = metric.score(images, PROMPTS[:4])
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = metric.clip.image_processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    want = _mlp_literal(state, embeds / embeds.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_aesthetic_rejects_a_clip_of_the_wrong_width(tmp_path):
    tiny_clip_dir(tmp_path / "clip", projection_dim=16)
    torch.save({}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(ValueError, match="768-d ViT-L/14"):
        load_metric("aesthetic", tmp_path, device="cpu")


# ----------------------------------------------------------------------------- HPSv2 (open_clip layout)


def pre_ln_block(x, s, p, heads, mask=None, eps=1e-5):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)), open_clip's residual block, from its raw weights."""
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), s[f"{p}.ln_1.weight"], s[f"{p}.ln_1.bias"], eps)
    q, k, v = (h @ s[f"{p}.attn.in_proj_weight"].T + s[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda z: z.unflatten(-1, (heads, w // heads)).transpose(1, 2)  # noqa: E731
    att = (split(q) @ split(k).transpose(-1, -2)) / math.sqrt(w // heads)
    if mask is not None:
        att = att + mask
    out = (att.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
    x = x + out @ s[f"{p}.attn.out_proj.weight"].T + s[f"{p}.attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), s[f"{p}.ln_2.weight"], s[f"{p}.ln_2.bias"], eps)
    h = F.gelu(h @ s[f"{p}.mlp.c_fc.weight"].T + s[f"{p}.mlp.c_fc.bias"])
    return x + h @ s[f"{p}.mlp.c_proj.weight"].T + s[f"{p}.mlp.c_proj.bias"]


def open_clip_literal(s, cfg, pixels, ids):
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    for i in range(v["layers"]):
        x = pre_ln_block(x, s, f"visual.transformer.resblocks.{i}", v["width"] // v["head_width"])
    image = (
        F.layer_norm(x[:, 0], (v["width"],), s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]
    )
    x = s["token_embedding.weight"][ids] + s["positional_embedding"]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(t["layers"]):
        x = pre_ln_block(x, s, f"transformer.resblocks.{i}", t["heads"], mask=causal)
    x = F.layer_norm(x, (t["width"],), s["ln_final.weight"], s["ln_final.bias"])
    text = x[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]  # end-of-text has the largest id
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_hpsv2_equals_a_literal_open_clip_forward(tmp_path):
    state, cfg, tokenizer = hps_dir(tmp_path)
    metric = load_metric("hpsv2", tmp_path, device="cpu")
    assert metric.describe()["version"] == "HPSv2.1"
    images = random_images(len(PROMPTS), seed=3)
    got = metric.score(images, PROMPTS)
    pixels = metric.clip.image_processor(images=images, return_tensors="pt").pixel_values
    ids = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert int(ids.max()) == tokenizer.eos_token_id
    image, text = open_clip_literal(state, cfg, pixels, ids)
    torch.testing.assert_close(got, (image * text).sum(-1), atol=1e-5, rtol=1e-4)


def test_hpsv2_version_and_weight_errors(tmp_path):
    hps_dir(tmp_path / "v2", name="HPS_v2_compressed.pt")
    assert load_metric("hpsv2", tmp_path / "v2", device="cpu").describe()["version"] == "HPSv2"
    both = tmp_path / "v2"
    (both / "HPS_v2.1_compressed.pt").write_bytes((both / "HPS_v2_compressed.pt").read_bytes())
    with pytest.raises(ValueError, match="holds both"):
        load_metric("hpsv2", both, device="cpu")
    # the file itself can be given, which settles the version
    assert load_metric("hpsv2", both / "HPS_v2.1_compressed.pt", device="cpu").version == "HPSv2.1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt or HPS_v2_compressed.pt"):
        load_metric("hpsv2", tmp_path / "empty")


# ----------------------------------------------------------------------------- ImageReward (BLIP layout)

MED = {
    "vocab_size": None,
    "hidden_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 12,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
    "encoder_width": 768,
    "add_cross_attention": True,
}
VIT = {"width": 64, "layers": 2, "patch": 16, "image": 32}


def bert_vocab(path):
    words = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + list("abcdefghijklmnopqrstuvwxyz")
        + ["red", "cat", "the", "blue", "sky", "over", "field", "an", "apple", "two", "dogs", "and", "ball"]
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    return len(words) + 2  # BLIP adds [DEC] and [ENC]


def blip_state(med, seed=0):
    """Random weights under ImageReward.pt's key names: blip.visual_encoder (timm ViT), blip.text_encoder (BERT
    with cross-attention), mlp.layers."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    def lin(prefix, n_out, n_in):
        return {f"{prefix}.weight": r(n_out, n_in), f"{prefix}.bias": r(n_out)}

    def ln(prefix, w):
        return {f"{prefix}.weight": 1 + r(w), f"{prefix}.bias": r(w)}

    w, grid = VIT["width"], VIT["image"] // VIT["patch"]
    s = {"blip.visual_encoder.cls_token": r(1, 1, w), "blip.visual_encoder.pos_embed": r(1, grid * grid + 1, w)}
    s |= lin("blip.visual_encoder.patch_embed.proj", w, 1) | ln("blip.visual_encoder.norm", w)
    s["blip.visual_encoder.patch_embed.proj.weight"] = r(w, 3, VIT["patch"], VIT["patch"])
    for i in range(VIT["layers"]):
        p = f"blip.visual_encoder.blocks.{i}"
        s |= ln(f"{p}.norm1", w) | ln(f"{p}.norm2", w) | lin(f"{p}.attn.qkv", 3 * w, w) | lin(f"{p}.attn.proj", w, w)
        s |= lin(f"{p}.mlp.fc1", 4 * w, w) | lin(f"{p}.mlp.fc2", w, 4 * w)
    h, t = med["hidden_size"], "blip.text_encoder"
    s |= {
        f"{t}.embeddings.word_embeddings.weight": r(med["vocab_size"], h),
        f"{t}.embeddings.position_embeddings.weight": r(med["max_position_embeddings"], h),
    }
    s |= ln(f"{t}.embeddings.LayerNorm", h)
    for i in range(med["num_hidden_layers"]):
        p = f"{t}.encoder.layer.{i}"
        for att, kv in (("attention", h), ("crossattention", w)):
            s |= (
                lin(f"{p}.{att}.self.query", h, h)
                | lin(f"{p}.{att}.self.key", h, kv)
                | lin(f"{p}.{att}.self.value", h, kv)
            )
            s |= lin(f"{p}.{att}.output.dense", h, h) | ln(f"{p}.{att}.output.LayerNorm", h)
        s |= lin(f"{p}.intermediate.dense", med["intermediate_size"], h) | lin(
            f"{p}.output.dense", h, med["intermediate_size"]
        )
        s |= ln(f"{p}.output.LayerNorm", h)
    for i, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s |= lin(f"mlp.layers.{i}", n_out, n_in)
    s["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"] *= 3  # make the text path matter
    return s


def _attend(q_in, kv_in, s, p, heads, key_mask):
    w = q_in.shape[-1]
    split = lambda z: z.unflatten(-1, (heads, w // heads)).transpose(1, 2)  # noqa: E731
    q = split(q_in @ s[f"{p}.self.query.weight"].T + s[f"{p}.self.query.bias"])
    k = split(kv_in @ s[f"{p}.self.key.weight"].T + s[f"{p}.self.key.bias"])
    v = split(kv_in @ s[f"{p}.self.value.weight"].T + s[f"{p}.self.value.bias"])
    att = (q @ k.transpose(-1, -2)) / math.sqrt(w // heads) + (1 - key_mask[:, None, None, :].float()) * -1e9
    out = (att.softmax(-1) @ v).transpose(1, 2).flatten(2)
    out = out @ s[f"{p}.output.dense.weight"].T + s[f"{p}.output.dense.bias"]
    return F.layer_norm(out + q_in, (w,), s[f"{p}.output.LayerNorm.weight"], s[f"{p}.output.LayerNorm.bias"], 1e-12)


def image_reward_literal(s, med, pixels, ids, mask):
    """BLIP ViT (pre-LN, eps 1e-6), then the BERT encoder (post-LN, bidirectional) cross-attending to it."""
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=VIT["patch"])
    x = torch.cat([s[f"{v}.cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[f"{v}.pos_embed"]
    renamed = {}
    for i in range(VIT["layers"]):  # the same block as open_clip's, under timm's names
        b, o = f"{v}.blocks.{i}", f"b{i}"
        renamed |= {
            f"{o}.ln_1.weight": s[f"{b}.norm1.weight"],
            f"{o}.ln_1.bias": s[f"{b}.norm1.bias"],
            f"{o}.ln_2.weight": s[f"{b}.norm2.weight"],
            f"{o}.ln_2.bias": s[f"{b}.norm2.bias"],
            f"{o}.attn.in_proj_weight": s[f"{b}.attn.qkv.weight"],
            f"{o}.attn.in_proj_bias": s[f"{b}.attn.qkv.bias"],
            f"{o}.attn.out_proj.weight": s[f"{b}.attn.proj.weight"],
            f"{o}.attn.out_proj.bias": s[f"{b}.attn.proj.bias"],
            f"{o}.mlp.c_fc.weight": s[f"{b}.mlp.fc1.weight"],
            f"{o}.mlp.c_fc.bias": s[f"{b}.mlp.fc1.bias"],
            f"{o}.mlp.c_proj.weight": s[f"{b}.mlp.fc2.weight"],
            f"{o}.mlp.c_proj.bias": s[f"{b}.mlp.fc2.bias"],
        }
        x = pre_ln_block(x, renamed, o, VIT["width"] // 64, eps=1e-6)
    image = F.layer_norm(x, (VIT["width"],), s[f"{v}.norm.weight"], s[f"{v}.norm.bias"], 1e-6)
    t, h = "blip.text_encoder", med["hidden_size"]
    x = (
        s[f"{t}.embeddings.word_embeddings.weight"][ids]
        + s[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = F.layer_norm(x, (h,), s[f"{t}.embeddings.LayerNorm.weight"], s[f"{t}.embeddings.LayerNorm.bias"], 1e-12)
    heads, image_mask = med["num_attention_heads"], torch.ones(image.shape[:2])
    for i in range(med["num_hidden_layers"]):
        p = f"{t}.encoder.layer.{i}"
        x = _attend(x, x, s, f"{p}.attention", heads, mask)
        x = _attend(x, image, s, f"{p}.crossattention", heads, image_mask)
        f = F.gelu(x @ s[f"{p}.intermediate.dense.weight"].T + s[f"{p}.intermediate.dense.bias"])
        f = f @ s[f"{p}.output.dense.weight"].T + s[f"{p}.output.dense.bias"]
        x = F.layer_norm(f + x, (h,), s[f"{p}.output.LayerNorm.weight"], s[f"{p}.output.LayerNorm.bias"], 1e-12)
    head = {k.removeprefix("mlp."): val for k, val in s.items() if k.startswith("mlp.")}
    return (_mlp_literal(head, x[:, 0]) - REWARD_MEAN) / REWARD_STD


def image_reward_dir(path):
    med = dict(MED, vocab_size=bert_vocab(path / "tokenizer"))
    state = blip_state(med)
    torch.save({"state_dict": state}, path / "ImageReward.pt")
    (path / "med_config.json").write_text(json.dumps(med))
    return state, med


def test_image_reward_equals_a_literal_blip_forward(tmp_path):
    state, med = image_reward_dir(tmp_path)
    metric = load_metric("imagereward", tmp_path, device="cpu")
    images = random_images(len(PROMPTS), seed=4)
    got = metric.score(images, PROMPTS)
    pixels = metric.image_processor(images=images, return_tensors="pt").pixel_values
    tokens = metric.tokenizer(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    assert tokens.input_ids.shape == (len(PROMPTS), 35) and (tokens.attention_mask == 0).any()
    want = image_reward_literal(state, med, pixels, tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the prompt matters (bidirectional text attention, cross-attention to the image)
    swapped = metric.score(images, PROMPTS[1:] + PROMPTS[:1])
    assert not torch.allclose(swapped, got, atol=1e-3)


def test_image_reward_errors_name_the_files(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"ImageReward.pt.*med_config.json.*tokenizer/vocab.txt"):
        load_metric("imagereward", tmp_path)
    image_reward_dir(tmp_path)
    (tmp_path / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(ValueError, match="bert-base-uncased"):
        load_metric("imagereward", tmp_path, device="cpu")


# ----------------------------------------------------------------------------- registry and toy metrics


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown metric 'fid'.*pickscore"):
        load_metric("fid", "/nowhere")
    for name in ("pickscore", "aesthetic", "hpsv2", "imagereward", "clipscore"):
        with pytest.raises(MissingWeightsError, match=f"--weights {name}=PATH"):
            load_metric(name)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_metric("pickscore", "/nowhere/pickscore")
    assert set(METRICS) >= {
        "pickscore",
        "aesthetic",
        "hpsv2",
        "imagereward",
        "clipscore",
        "toy_oracle",
        "digit_accuracy",
    }


def test_toy_metrics_read_pictures_like_the_oracle_reads_pixels():
    from sail_fast.diffusion.images import decode_latents
    from sail_fast.toy.human import ToyOracle
    from sail_fast.toy.world import load_digits, prompt_pool

    images, labels = load_digits()
    images, labels = images[:64], labels[:64]
    prompts = [next(p for p, d in prompt_pool() if d == int(label)) for label in labels]
    pictures = decode_latents(images)
    oracle = load_metric("toy_oracle")
    want = ToyOracle.load().score(images, labels)
    torch.testing.assert_close(oracle.score(pictures, prompts), want, atol=0.05, rtol=0.01)  # 8-bit pictures
    accuracy = load_metric("digit_accuracy")
    assert set(accuracy.score(pictures, prompts).tolist()) <= {0.0, 1.0}
    assert accuracy.score(pictures, prompts).mean() > 0.9
    wrong = [next(p for p, d in prompt_pool() if d == (int(label) + 1) % 10) for label in labels]
    assert accuracy.score(pictures, wrong).mean() < 0.1
