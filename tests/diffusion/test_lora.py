"""LoRA (peft) training and SAIL: one UNet, references as adapter states, diffusers-loadable outputs."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.build import build_stack
from sail_fast.diffusion.lora import (
    LORA_WEIGHTS,
    POLICY,
    AdapterView,
    activate,
    adapter_parameters,
    adapter_state,
    add_policy_adapter,
    load_adapter,
    merged_unet,
    save_adapter,
)
from sail_fast.diffusion.lora import (
    unwrap as lora_unet,
)
from sail_fast.diffusion.sampling import DEFAULTS, generate_candidates, sampling_scheduler
from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.dpo.builder import trainer_for
from sail_fast.dpo.trainer import DPOTrainer
from sail_fast.reward.scorer import ImplicitRewardScorer
from sail_fast.runs.config import LoraSettings, load_config
from sail_fast.sail.loop import SailLoop

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port  # noqa: E402
from test_loop import make_overrides  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402

LORA = ["train.lora.rank=4"]


def _inputs(stack, batch=3, seed=0):
    """A noised batch for one UNet call on ``stack`` (with SDXL's pooled embeds and time ids)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, stack.latent_channels, stack.sample_size, stack.sample_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    enc = stack.encode_prompts(["a cat", "a dog", "a handwritten 7"][:batch])
    added = None
    if enc.pooled_prompt_embeds is not None:
        added = {
            "text_embeds": enc.pooled_prompt_embeds,
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * batch).float(),
        }
    return x, t, {"encoder_hidden_states": enc.prompt_embeds, "added_cond_kwargs": added}


def _call(unet, inputs):
    x, t, kw = inputs
    with torch.no_grad():
        return unet(x, t, **kw).sample


def _perturb(unet, name=POLICY, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet, name):
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_adapter_off_is_the_base_exactly_and_the_views_share_one_unet(kind):
    base = tiny_stack(kind, seed=0)
    stack = tiny_stack(kind, seed=0)
    inputs = _inputs(stack)
    expected = _call(base.unet, inputs)
    add_policy_adapter(stack.unet, LoraSettings(rank=4))
    assert torch.equal(_call(AdapterView(stack.unet, POLICY), inputs), expected)  # B = 0: adds exactly nothing
    _perturb(stack.unet)
    policy = _call(AdapterView(stack.unet, POLICY), inputs)
    assert not torch.allclose(policy, expected)
    assert torch.equal(_call(AdapterView(stack.unet, None), inputs), expected)  # every adapter off: the base
    assert torch.equal(_call(AdapterView(stack.unet, POLICY), inputs), policy)  # and back
    # Only the adapter trains, whichever state the views left the UNet in.
    trainable = {n for n, p in stack.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and f".{POLICY}." in n for n in trainable)
    # Merged into a plain UNet (sail-fast export --merge), the adapter gives the same outputs.
    torch.testing.assert_close(_call(merged_unet(stack.unet), inputs), policy, rtol=1e-5, atol=1e-5)
    assert torch.equal(_call(AdapterView(stack.unet, POLICY), inputs), policy)  # merging left the UNet untouched


def _sdxl_planted_pairs(stack, m, seed):
    pairs = planted_pairs(tiny_stack("sd15", seed=0), m, seed)  # winners +pattern, losers -pattern
    enc = stack.encode_prompts(pairs.prompts)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(m, 1)
    return LatentPairs(
        pairs.win,
        pairs.lose,
        pairs.prompt_index,
        pairs.prompts,
        enc.prompt_embeds,
        enc.pooled_prompt_embeds,
        time_ids,
        time_ids.clone(),
        pairs.label,
        pairs.source,
    )


def _trainer(tmp_path, *overrides, kind="sd15", pairs=64, seed=0):
    extra = ["model.tiny=sdxl", "model.tiny_in_channels=4"] if kind == "sdxl" else []
    config = load_config(TINY, [f"output_dir={tmp_path}", *LORA, *extra, *overrides])
    stack = build_stack(config.model, seed=0)
    data = _sdxl_planted_pairs(stack, pairs, seed) if kind == "sdxl" else planted_pairs(stack, pairs, seed)
    return trainer_for(config, stack.unet, stack.scheduler, data), stack, config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_dpo_starts_at_logit_zero_and_learns_a_planted_preference(tmp_path, kind):
    trainer, stack, config = _trainer(
        tmp_path,
        "train.steps=40",
        "train.pairs_per_step=16",
        "train.micro_batch_pairs=16",
        "train.learning_rate=2e-3",
        "train.checkpoint_every=1000",
        kind=kind,
        pairs=256,
    )
    assert trainer.reference is None and trainer.reference_adapter is None  # no second UNet: the adapter is turned off
    first = trainer.train_step()
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: the DPO logit is exactly 0
    trainer.train(resume=True)
    unet = trainer.policy
    held_out = _sdxl_planted_pairs(stack, 64, 1) if kind == "sdxl" else planted_pairs(stack, 64, 1)
    scorer = ImplicitRewardScorer(
        AdapterView(unet, POLICY), AdapterView(unet, None), stack.scheduler, beta=config.train.beta, num_draws=4
    )
    assert scorer.pair_accuracy(held_out, generator=torch.Generator().manual_seed(0)) >= 0.85
    saved = tmp_path / "final" / "lora" / LORA_WEIGHTS
    assert saved.is_file() and not (tmp_path / "final" / "unet").exists()
    assert all(k.startswith("unet.") for k in load_file(saved))  # the diffusers LoRA layout


@pytest.mark.parametrize(
    "extra",
    [[], ["train.optimizer=adamw8bit", "train.gradient_checkpointing=true", "train.mixed_precision=bf16"]],
    ids=["adamw", "adamw8bit-checkpointing-bf16"],
)
@pytest.mark.slow
def test_lora_interrupted_and_resumed_equals_uninterrupted(tmp_path, extra):
    args = [
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.pairs_per_step=8",
        "train.micro_batch_pairs=4",
        "train.learning_rate=1e-3",
        *extra,
    ]
    finals = []
    for name, stop_after in (("straight", None), ("resumed", 3)):
        trainer, _, _ = _trainer(tmp_path / name, *args)
        trainer.train(stop_after=stop_after)
        if stop_after:  # a new process: a fresh base UNet, a fresh adapter
            trainer, _, _ = _trainer(tmp_path / name, *args)
            trainer.train(resume=True)
            assert "resumed from" in (tmp_path / name / "train.log").read_text()
        finals.append(load_file(tmp_path / name / "final" / "lora" / LORA_WEIGHTS))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert any(v.abs().sum() > 0 for k, v in finals[0].items() if "lora.up" in k)  # training moved B off zero


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_saved_adapter_in_a_plain_diffusers_pipeline_samples_what_we_sample(tmp_path, kind):
    stack = tiny_stack(kind, seed=0)
    add_policy_adapter(stack.unet, LoraSettings(rank=4, alpha=8))
    _perturb(stack.unet, scale=0.2)
    folder = tmp_path / "lora"
    save_adapter(folder, adapter_state(stack.unet), stack.unet)
    ours = generate_candidates(
        dataclasses.replace(stack, unet=AdapterView(stack.unet, POLICY)),
        ["a cat", "a red dog"],
        2,
        num_inference_steps=4,
        seed=1,
        batch_size=4,
        progress=False,
    )
    plain = tiny_stack(kind, seed=0)  # a plain base UNet, as a user's pipeline holds
    sampler, _, guidance = DEFAULTS[kind]
    parts = dict(
        unet=plain.unet,
        scheduler=sampling_scheduler(plain, sampler),
        vae=plain.vae,
        tokenizer=plain.tokenizer,
        text_encoder=plain.text_encoder,
    )
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, tokenizer_2=plain.tokenizer_2, text_encoder_2=plain.text_encoder_2)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    pixels = plain.sample_size * plain.vae_scale_factor
    for p, prompt in enumerate(["a cat", "a red dog"]):
        gens = [torch.Generator().manual_seed(int(s)) for s in ours.seeds[p]]
        theirs = pipe(
            prompt,
            num_images_per_prompt=2,
            num_inference_steps=4,
            guidance_scale=guidance,
            generator=gens,
            output_type="latent",
            height=pixels,
            width=pixels,
        ).images
        torch.testing.assert_close(ours.latents[p], theirs.float(), rtol=1e-4, atol=1e-4)
    # The adapter changed the samples: this is not the base model agreeing with itself.
    pipe.unload_lora_weights()
    base = generate_candidates(plain, ["a cat"], 2, num_inference_steps=4, seed=1, batch_size=4, progress=False)
    assert not torch.allclose(base.latents[0], ours.latents[0], atol=1e-3)


@pytest.mark.slow
def test_two_round_lora_sail_ranks_against_the_base_and_trains_each_round_against_the_last(tmp_path, monkeypatch):
    """Round r ranks its candidates against outputs equal to the base UNet's and trains against round r-1's
    policy, all on one UNet; checked against separately built UNets with the saved adapters loaded."""
    run = tmp_path / "run"
    inputs = _inputs(tiny_stack("sd15", seed=0), batch=2)
    seen = {"ranked": [], "trained": []}

    def layout(unet):  # the scorer runs UNets channels_last, which rounds convolutions differently
        cl = lora_unet(unet).conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if cl else torch.contiguous_format

    def fresh_with(folder, memory_format):
        """A separately built base UNet, with the adapter saved in ``folder`` (None: none), in that layout."""
        unet = build_stack(load_config(TINY).model, seed=0).unet.to(memory_format=memory_format)
        if folder is None:
            return unet
        add_policy_adapter(unet, LoraSettings(rank=4))
        load_adapter(unet, folder)
        activate(unet, POLICY)
        return unet

    from sail_fast.sail import ranking

    original_scorer = ranking.implicit_scorer  # the ranking's own name for it (evaluation imports its own)

    def spy_scorer(sail, beta, scheduler, policy, reference):
        seen["ranked"].append((_call(policy, inputs), _call(reference, inputs), layout(policy)))
        return original_scorer(sail, beta, scheduler, policy, reference)

    original_init = DPOTrainer.__init__

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        activate(self.policy, self.reference_adapter)
        reference = _call(self.policy, inputs)
        activate(self.policy, POLICY)
        seen["trained"].append((self.output_dir, _call(self.policy, inputs), reference, layout(self.policy)))

    monkeypatch.setattr(ranking, "implicit_scorer", spy_scorer)
    monkeypatch.setattr(DPOTrainer, "__init__", spy_init)
    # The paper's rounds: each held to the adapter the round starts from (the default holds them to the base).
    overrides = make_overrides(tmp_path, *LORA, "train.learning_rate=1e-3", "sail.training_reference=round_start")
    final = SailLoop(load_config(TINY, overrides)).run()
    assert final == run / "round-02/train/final/lora" and (final / LORA_WEIGHTS).is_file()
    assert not list(run.rglob("diffusion_pytorch_model.safetensors"))  # no UNet was ever written

    def expected(folder, memory_format):
        return _call(fresh_with(folder, memory_format), inputs)

    iter0, round1 = run / "iter0/final/lora", run / "round-01/train/final/lora"
    assert len(seen["ranked"]) == 2
    for (policy, reference, fmt), before in zip(seen["ranked"], (iter0, round1)):
        assert torch.equal(reference, expected(None, fmt))  # the ranking reference: every adapter off, the base
        assert torch.equal(policy, expected(before, fmt))  # the policy that made the candidates
    stages = [d for d, *_ in seen["trained"]]
    assert stages == [run / "iter0", run / "round-01/train", run / "round-02/train"]
    (_, p0, r0, f0), (_, p1, r1, f1), (_, p2, r2, f2) = seen["trained"]
    assert torch.equal(r0, expected(None, f0)) and torch.equal(p0, r0)  # iter0: from the base, against the base
    assert torch.equal(r1, expected(iter0, f1)) and torch.equal(p1, r1)  # round 1: against iter0's policy
    assert torch.equal(r2, expected(round1, f2)) and torch.equal(p2, r2)  # round 2: against round 1's policy
    assert not torch.allclose(r2, expected(None, f2))


@pytest.mark.slow
def test_lora_under_deepspeed_zero2_two_ranks_agrees_across_ranks_and_saves_the_adapter(tmp_path):
    import os
    import shutil
    import subprocess

    from test_train import REPO, _losses, _train_cmd

    stack = build_stack(load_config(TINY).model, seed=0)
    planted_pairs(stack, 64, 0).save(tmp_path / "pairs.safetensors")
    out = tmp_path / "ds"
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_accelerators", "2", "--master_port", str(free_port())]
    args = [
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        f"output_dir={out}",
        "train.steps=2",
        *LORA,
        "train.learning_rate=1e-3",
        "train.checkpoint_every=2",
        f"train.deepspeed={REPO / 'configs/deepspeed/zero2.json'}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(_train_cmd(args, launcher), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = _losses(out / "metrics.jsonl"), _losses(out / "metrics.rank1.jsonl")
    assert len(rank0) == 2 and rank0 == rank1 and rank0[0] == pytest.approx(math.log(2), abs=1e-6)
    final = load_file(out / "final/lora" / LORA_WEIGHTS)
    checkpoint = load_file(out / "checkpoints/step-000002/lora" / LORA_WEIGHTS)
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora.up" in k)
    # DeepSpeed's own checkpoint leaves the frozen base out: far smaller than the UNet.
    ds_bytes = sum(f.stat().st_size for f in (out / "checkpoints/step-000002/deepspeed").rglob("*model_states.pt"))
    unet_bytes = sum(p.numel() * 4 for p in stack.unet.parameters())
    assert ds_bytes < unet_bytes / 4
    # The saved adapter loads back into a plain base UNet (as the next stage does), every weight intact.
    unet = build_stack(load_config(TINY).model, seed=0).unet
    add_policy_adapter(unet, LoraSettings(rank=4), seed=1)
    load_adapter(unet, out / "final/lora")
    again = load_file(save_adapter(tmp_path / "again", adapter_state(unet), unet))
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)


@pytest.mark.slow
def test_lora_sail_on_the_toy_world_then_generate_and_export_for_plain_diffusers(tmp_path):
    """A user's path: `sail-fast run` with train.lora, `generate` from the run, `export` the adapter and a merged UNet."""
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from test_toy_run import REPO, sail_fast

    run = tmp_path / "run"
    sail_fast(
        "run",
        "--config",
        str(REPO / "configs/toy-quick.yaml"),
        "--set",
        f"output_dir={run}",
        "--set",
        "train.lora.rank=8",
        "--set",
        "train.learning_rate=1e-3",
        "--set",
        "sail.select=last",  # the run keeps its last round, which export and generate then take
        cwd=tmp_path,
    )
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "iter0", "round-01", "round-02"]
    assert (run / "round-02/train/final/lora" / LORA_WEIGHTS).is_file()
    assert not list(run.rglob("diffusion_pytorch_model.safetensors"))  # one UNet, never copied or saved

    (tmp_path / "prompts.txt").write_text("a handwritten 3\n")
    sail_fast(
        "generate",
        "--checkpoint",
        str(run),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--num-images",
        "2",
        "--out",
        str(tmp_path / "pictures"),
        cwd=tmp_path,
    )
    assert Image.open(tmp_path / "pictures/0000-00.png").size == (16, 16)
    sail_fast(
        "eval",
        "--checkpoint",
        str(run / "iter0/final/lora"),
        "--checkpoint",
        str(run),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--metrics",
        "toy_oracle",
        "--out",
        str(tmp_path / "eval"),
        "--images-per-prompt",
        "2",
        cwd=tmp_path,
    )
    checkpoints = json.loads((tmp_path / "eval/eval.json").read_text())["checkpoints"]
    assert len(checkpoints) == 2 and all("toy_oracle" in c["scores"] for c in checkpoints)

    sail_fast("export", str(run), str(tmp_path / "adapter"), cwd=tmp_path)
    sail_fast("export", str(run), str(tmp_path / "merged"), "--merge", cwd=tmp_path)
    exported = load_file(tmp_path / "adapter" / LORA_WEIGHTS)
    saved = load_file(run / "round-02/train/final/lora" / LORA_WEIGHTS)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    # The merged UNet alone gives what the base with the adapter gives, and differs from the base.
    stack = build_stack(load_config(run / "config.yaml").model)
    inputs = _inputs(stack, batch=2)
    merged = _call(UNet2DConditionModel.from_pretrained(tmp_path / "merged"), inputs)
    base = _call(stack.unet, inputs)
    add_policy_adapter(stack.unet, LoraSettings(rank=8))
    load_adapter(stack.unet, run / "round-02/train/final/lora")
    with_adapter = _call(AdapterView(stack.unet, POLICY), inputs)
    torch.testing.assert_close(merged, with_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapter, base, atol=1e-4)


@pytest.mark.slow
def test_lora_sail_on_a_tiny_sdxl_stack_runs_end_to_end(tmp_path):
    sdxl = ["model.tiny=sdxl", "model.tiny_in_channels=4"]
    stack = build_stack(load_config(TINY, sdxl).model, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    _sdxl_planted_pairs(stack, 32, 0).save(data / "seed.safetensors")
    _sdxl_planted_pairs(stack, 16, 1).save(data / "heldout.safetensors")
    (data / "prompts.txt").write_text("".join(f"prompt number {i}\n" for i in range(8)))
    overrides = make_overrides(tmp_path, *LORA, *sdxl, "train.learning_rate=1e-3", "sail.rounds=1")
    overrides = [o for o in overrides if not o.startswith(("data.seed_pairs", "sail.heldout_pairs"))]
    overrides += [
        f"data.seed_pairs=[{data / 'seed.safetensors'}]",
        f"sail.heldout_pairs=[{data / 'heldout.safetensors'}]",
    ]
    final = SailLoop(load_config(TINY, overrides)).run()
    assert final == tmp_path / "run/round-01/train/final/lora" and (final / LORA_WEIGHTS).is_file()
    rows = json.loads((tmp_path / "run/metrics.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "iter0", "round-01"]
    assert rows[-1]["self_label_agreement"] > 0.5  # the planted preference, learnt by the adapter alone


def test_the_frozen_reference_adapter_never_drops_out_while_the_policy_trains():
    from sail_fast.diffusion.lora import REFERENCE, copy_adapter

    stack = tiny_stack("sd15", seed=0)
    add_policy_adapter(stack.unet, LoraSettings(rank=4, dropout=0.5))
    _perturb(stack.unet, scale=0.1)
    copy_adapter(stack.unet, POLICY, REFERENCE)
    stack.unet.train()  # as in a training step, where the reference is computed
    inputs = _inputs(stack)
    reference = AdapterView(stack.unet, REFERENCE)
    assert torch.equal(_call(reference, inputs), _call(reference, inputs))
    policy = AdapterView(stack.unet, POLICY)
    assert not torch.equal(_call(policy, inputs), _call(policy, inputs))  # the policy's dropout is on
    stack.unet.eval()
    assert torch.equal(_call(reference, inputs), _call(policy, inputs))  # the same weights, a frozen copy
