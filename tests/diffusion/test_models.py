"""Tests for sail_fast.diffusion.stack: tiny stacks, prompt encoding, save/load round trips."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sail_fast.diffusion.stack import DiffusionStack, PromptEmbeds, load_stack
from sail_fast.diffusion.tiny import tiny_stack

KINDS = ["sd15", "sdxl"]
# (sequence length, prompt feature dim, pooled dim) of the tiny stacks.
EXPECTED_DIMS = {"sd15": (77, 32, None), "sdxl": (77, 16 + 32, 24)}
PROMPTS = ["a photo of the cat", "", "a photo of the cat", "an oil painting of a dog, at night!"]


@pytest.fixture(scope="module")
def stacks():
    return {kind: tiny_stack(kind, seed=0, sample_size=8, with_vae=True) for kind in KINDS}


@pytest.fixture(scope="module")
def saved(stacks, tmp_path_factory):
    """Each kind saved once; tests that damage a directory copy it first."""
    out = {}
    for kind, stack in stacks.items():
        path = tmp_path_factory.mktemp(f"saved_{kind}")
        stack.save_pretrained(path)
        out[kind] = path
    return out


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def public_config(model) -> str:
    # JSON turns tuples into lists; "_"-keys are load-time bookkeeping.
    return json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}, sort_keys=True)


def unet_eps(stack: DiffusionStack, embeds: PromptEmbeds, latents, timesteps, **cond):
    added = stack.added_cond_kwargs(embeds, latents.shape[-2], latents.shape[-1], **cond)
    with torch.no_grad():
        return stack.unet(
            latents, timesteps, encoder_hidden_states=embeds.prompt_embeds, added_cond_kwargs=added
        ).sample


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_stack_components(stacks, kind):
    s = stacks[kind]
    assert s.kind == kind
    assert isinstance(s.unet, UNet2DConditionModel)
    assert isinstance(s.scheduler, DDPMScheduler)
    assert isinstance(s.tokenizer, CLIPTokenizer) and isinstance(s.text_encoder, CLIPTextModel)
    assert isinstance(s.vae, AutoencoderKL) and s.vae.config.latent_channels == s.latent_channels == 4
    assert s.sample_size == 8 and s.vae_scale_factor == 2
    assert s.dtype == torch.float32 and s.device.type == "cpu"
    _, dim, pooled_dim = EXPECTED_DIMS[kind]
    assert s.unet.config.cross_attention_dim == dim
    if kind == "sdxl":
        assert isinstance(s.text_encoder_2, CLIPTextModelWithProjection)
        assert isinstance(s.tokenizer_2, CLIPTokenizer)
        assert s.unet.config.addition_embed_type == "text_time"
        assert s.unet.config.projection_class_embeddings_input_dim == pooled_dim + 6 * 8
    else:
        assert s.text_encoder_2 is None and s.tokenizer_2 is None
        assert s.unet.config.addition_embed_type is None
    # Frozen parts are frozen; the UNet is what SAIL trains.
    assert not any(p.requires_grad for p in s.text_encoder.parameters())
    assert not any(p.requires_grad for p in s.vae.parameters())
    assert all(p.requires_grad for p in s.unet.parameters())
    # SD's training noise schedule.
    sc = s.scheduler.config
    assert sc.num_train_timesteps == 1000 and sc.beta_schedule == "scaled_linear"
    assert s.scheduler.betas[0].item() == pytest.approx(0.00085)
    assert s.scheduler.betas[-1].item() == pytest.approx(0.012)


def test_tiny_stack_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_stack("sd15", seed=3), tiny_stack("sd15", seed=3), tiny_stack("sd15", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert state_dicts_equal(a.unet, b.unet) and state_dicts_equal(a.text_encoder, b.text_encoder)
    assert not state_dicts_equal(a.unet, c.unet)
    assert tiny_stack("sd15", dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_tiny_stack_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        tiny_stack("sd3")


def test_tiny_tokenizer_is_clip_like(stacks):
    tok = stacks["sd15"].tokenizer
    assert tok.model_max_length == 77
    ids = tok("The cat, the dog!").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    # Lower-cased, merged by BPE, word ends marked with </w>.
    assert tokens[1:-1] == ["the</w>", "c", "a", "t</w>", ",</w>", "the</w>", "d", "o", "g</w>", "!</w>"]
    # Anything tokenizes, and padding/truncation give the fixed CLIP length.
    batch = tok(["é 日本 ~ {x}", "word " * 200, ""], padding="max_length", max_length=77, truncation=True)
    assert [len(x) for x in batch.input_ids] == [77, 77, 77]
    assert batch.input_ids[2][:3] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    # SDXL's second tokenizer pads with "!" as on the Hub.
    assert stacks["sdxl"].tokenizer_2.pad_token == "!"


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("kind", KINDS)
def test_encode_prompts_shapes_and_determinism(stacks, kind):
    s = stacks[kind]
    length, dim, pooled_dim = EXPECTED_DIMS[kind]
    e = s.encode_prompts(PROMPTS)
    assert e.prompt_embeds.shape == (len(PROMPTS), length, dim)
    assert not e.prompt_embeds.requires_grad
    if pooled_dim is None:
        assert e.pooled_prompt_embeds is None
    else:
        assert e.pooled_prompt_embeds.shape == (len(PROMPTS), pooled_dim)
    again = s.encode_prompts(PROMPTS)
    assert torch.equal(e.prompt_embeds, again.prompt_embeds)
    # Same prompt -> same embedding; different prompts (incl. the unconditional "") differ.
    assert torch.equal(e.prompt_embeds[0], e.prompt_embeds[2])
    assert not torch.allclose(e.prompt_embeds[0], e.prompt_embeds[1])
    assert not torch.allclose(e.prompt_embeds[0], e.prompt_embeds[3])
    # A prompt's embedding does not depend on the batch it is encoded with.
    single = s.encode_prompts("a photo of the cat")
    torch.testing.assert_close(single.prompt_embeds[0], e.prompt_embeds[0])
    if pooled_dim is not None:
        torch.testing.assert_close(single.pooled_prompt_embeds[0], e.pooled_prompt_embeds[0])
        assert not torch.allclose(e.pooled_prompt_embeds[0], e.pooled_prompt_embeds[1])


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_sd15_embeds_are_last_hidden_state(stacks):
    s = stacks["sd15"]
    with torch.no_grad():
        ref = s.text_encoder(_ids(s.tokenizer, PROMPTS)).last_hidden_state
    torch.testing.assert_close(s.encode_prompts(PROMPTS).prompt_embeds, ref, rtol=0, atol=0)


def test_sdxl_embeds_are_penultimate_of_both_encoders(stacks):
    s = stacks["sdxl"]
    with torch.no_grad():
        out1 = s.text_encoder(_ids(s.tokenizer, PROMPTS), output_hidden_states=True)
        out2 = s.text_encoder_2(_ids(s.tokenizer_2, PROMPTS), output_hidden_states=True)
    e = s.encode_prompts(PROMPTS)
    torch.testing.assert_close(e.prompt_embeds[..., :16], out1.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(e.prompt_embeds[..., 16:], out2.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(e.pooled_prompt_embeds, out2.text_embeds, rtol=0, atol=0)
    # Penultimate, not last: the last layer would give different features.
    assert not torch.allclose(e.prompt_embeds[..., :16], out1.last_hidden_state)


def test_prompt_embeds_ops():
    x = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    p = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)
    e = PromptEmbeds(x, p)
    assert len(e) == 3

    r = e.repeat_each(2)
    assert r.prompt_embeds.shape == (6, 2, 4) and r.pooled_prompt_embeds.shape == (6, 5)
    assert torch.equal(r.prompt_embeds[1], x[0]) and torch.equal(r.prompt_embeds[2], x[1])
    assert torch.equal(r.pooled_prompt_embeds[5], p[2])

    assert torch.equal(e.index(torch.tensor([2, 0])).prompt_embeds, x[[2, 0]])
    assert torch.equal(e.index([1]).pooled_prompt_embeds, p[[1]])
    one = e.index(-1)  # an int keeps the batch dimension
    assert one.prompt_embeds.shape == (1, 2, 4) and torch.equal(one.pooled_prompt_embeds[0], p[2])
    assert torch.equal(e.index(slice(1, None)).prompt_embeds, x[1:])

    c = PromptEmbeds.cat([e.index([0]), e.index([2, 1])])
    assert torch.equal(c.prompt_embeds, x[[0, 2, 1]]) and torch.equal(c.pooled_prompt_embeds, p[[0, 2, 1]])
    no_pool = PromptEmbeds(x)
    assert PromptEmbeds.cat([no_pool, no_pool]).pooled_prompt_embeds is None
    with pytest.raises(ValueError):
        PromptEmbeds.cat([e, no_pool])

    h = e.to(dtype=torch.float16)
    assert h.prompt_embeds.dtype == h.pooled_prompt_embeds.dtype == torch.float16
    assert torch.equal(h.prompt_embeds.float(), x)
    assert no_pool.to(dtype=torch.float64).pooled_prompt_embeds is None


# ----------------------------------------------------------------------------- conditioning and UNet


def test_added_cond_kwargs(stacks):
    sd15, sdxl = stacks["sd15"], stacks["sdxl"]
    assert sd15.added_cond_kwargs(sd15.encode_prompts(["x"]), 8, 8) is None

    e = sdxl.encode_prompts(["a", "b", "c"])
    cond = sdxl.added_cond_kwargs(e, 8, 12)  # latent size; this tiny VAE scales by 2
    assert cond["text_embeds"] is e.pooled_prompt_embeds
    assert cond["time_ids"].shape == (3, 6)
    assert cond["time_ids"].tolist() == [[16, 24, 0, 0, 16, 24]] * 3
    cond = sdxl.added_cond_kwargs(e, 8, 8, original_size=(1024, 768), crop_top_left=(4, 2), target_size=(512, 512))
    assert cond["time_ids"][1].tolist() == [1024, 768, 4, 2, 512, 512]
    # Without a VAE the real SD/SDXL factor of 8 applies.
    no_vae = DiffusionStack(**{**sdxl.__dict__, "vae": None})
    assert no_vae.added_cond_kwargs(e, 128, 128)["time_ids"][0].tolist() == [1024, 1024, 0, 0, 1024, 1024]
    with pytest.raises(ValueError):
        sdxl.added_cond_kwargs(PromptEmbeds(e.prompt_embeds), 8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_unet_forward_with_embeds(stacks, kind):
    s = stacks[kind]
    e = s.encode_prompts(["a red cube", ""]).repeat_each(2)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, s.latent_channels, s.sample_size, s.sample_size, generator=g)
    t = torch.tensor([10, 10, 900, 900])
    eps = unet_eps(s, e, latents, t)
    assert eps.shape == latents.shape and torch.isfinite(eps).all()
    # The prompt conditions the output (cond vs uncond rows at the same timestep and noise).
    other = unet_eps(s, e.index([2, 3, 0, 1]), latents, t)
    assert not torch.allclose(eps, other)
    if kind == "sdxl":
        # ...and so does SDXL's size micro-conditioning.
        resized = unet_eps(s, e, latents, t, original_size=(256, 256))
        assert not torch.allclose(eps, resized)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(stacks, saved, kind):
    s, path = stacks[kind], saved[kind]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[kind]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "tokenizer" / "merges.txt").is_file()

    loaded = load_stack(path)
    assert loaded.kind == kind
    assert state_dicts_equal(loaded.unet, s.unet)
    assert state_dicts_equal(loaded.text_encoder, s.text_encoder)
    assert state_dicts_equal(loaded.vae, s.vae)
    assert public_config(loaded.unet) == public_config(s.unet)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert torch.equal(loaded.scheduler.alphas_cumprod, s.scheduler.alphas_cumprod)
    a, b = s.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)
    if kind == "sdxl":
        assert state_dicts_equal(loaded.text_encoder_2, s.text_encoder_2)
        assert loaded.tokenizer_2.pad_token == "!"
        assert torch.equal(a.pooled_prompt_embeds, b.pooled_prompt_embeds)
    else:
        assert loaded.text_encoder_2 is None and b.pooled_prompt_embeds is None

    without_vae = load_stack(path, with_vae=False, dtype=torch.bfloat16)
    assert without_vae.vae is None and without_vae.unet.dtype == torch.bfloat16
    assert without_vae.text_encoder.dtype == torch.bfloat16


def test_kind_inference(saved, tmp_path):
    # Without model_index.json the kind comes from the presence of text_encoder_2/.
    for kind in KINDS:
        d = shutil.copytree(saved[kind], tmp_path / kind)
        (d / "model_index.json").unlink()
        assert load_stack(d, with_vae=False).kind == kind
    # model_index.json wins over the directory contents.
    d = tmp_path / "sdxl"
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert load_stack(d, with_vae=False).kind == "sd15"
    # An explicit kind wins over both.
    assert load_stack(d, kind="sdxl", with_vae=False).kind == "sdxl"
    with pytest.raises(ValueError, match="kind"):
        load_stack(d, kind="xl")


def _missing_section(message: str) -> str:
    assert "Missing files:" in message
    return message.split("Missing files:", 1)[1]


def test_incomplete_directory_names_missing_files(saved, tmp_path):
    d = shutil.copytree(saved["sdxl"], tmp_path / "broken")
    (d / "unet" / "config.json").unlink()
    (d / "tokenizer_2" / "merges.txt").unlink()
    shutil.rmtree(d / "vae")
    with pytest.raises(FileNotFoundError) as info:
        load_stack(d)
    msg = str(info.value)
    # Every expected file is listed...
    for f in [
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
    ]:
        assert f in msg
    # ...and exactly the absent ones are reported missing.
    missing = _missing_section(msg)
    for f in ["unet/config.json", "tokenizer_2/merges.txt", "vae/config.json", "vae/diffusion_pytorch_model"]:
        assert f in missing
    for f in ["unet/diffusion_pytorch_model", "tokenizer/merges.txt", "text_encoder_2/config.json"]:
        assert f not in missing
    # Not asking for the VAE drops it from the requirements.
    with pytest.raises(FileNotFoundError) as info:
        load_stack(d, with_vae=False)
    assert "vae/" not in str(info.value) and "unet/config.json" in _missing_section(str(info.value))


def test_missing_directory_lists_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_stack(tmp_path / "does-not-exist", with_vae=False)
    missing = _missing_section(str(info.value))
    for f in [
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
    ]:
        assert f in missing
    assert "text_encoder_2" not in missing and "vae/" not in missing


@pytest.mark.parametrize("kind", [None, "sd15"])
def test_hub_id_offline_fails_clearly(monkeypatch, kind):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="sail-fast-tests/no-such-model.*Hugging Face Hub.*offline mode"):
        load_stack("sail-fast-tests/no-such-model", kind=kind)
