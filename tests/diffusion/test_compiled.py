"""The torch.compile'd UNet paths (training step, reward scorer, candidate generation)
against the same calls run eagerly. Inductor compiles for real here: about a minute per
graph on a 2-core CPU, so each test compiles one graph."""

import copy
import dataclasses

import pytest
import torch
from test_reward import _perturbed_copy
from test_train import TINY, planted_pairs

from sail_fast.diffusion.build import build_stack
from sail_fast.diffusion.sampling import generate_candidates
from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.dpo.builder import trainer_for
from sail_fast.reward.scorer import ImplicitRewardScorer
from sail_fast.runs.config import load_config


@pytest.mark.slow
def test_compiled_training_step_gives_eager_gradients(tmp_path):
    # Gradients, not losses after several steps: at beta 5000 a 1e-7 change in the weights
    # moves the third step's loss by 1%, so later losses cannot tell a bug from rounding.
    # On a GPU (bench/gpu_check.sh) this asks whether CUDA's inductor has the CPU backward bug.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grads, first_loss = {}, {}
    for compiled in (False, True):
        config = load_config(
            TINY,
            [
                f"output_dir={tmp_path / str(compiled)}",
                f"train.compile={compiled}",
                "train.pairs_per_step=4",
                "train.micro_batch_pairs=4",
            ],
        )
        stack = build_stack(config.model, seed=config.seed)
        trainer = trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 16, 0), device=device)
        assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        with torch.no_grad():  # move the policy off the reference, so the loss has a real gradient
            for p in trainer.policy.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device))
        batch = trainer.pairs.batch(torch.arange(4)).to(device)
        out = trainer._micro_step_loss(batch, torch.Generator().manual_seed(0))
        out.loss.backward()
        grads[compiled] = {n: p.grad.clone() for n, p in trainer.policy.named_parameters()}
        first_loss[compiled] = out.loss.item()
    assert first_loss[True] == pytest.approx(first_loss[False], rel=1e-4)
    total = torch.cat([g.flatten() for g in grads[False].values()]).norm()
    error = torch.cat([(grads[True][n] - g).flatten() for n, g in grads[False].items()]).norm()
    assert error < 1e-4 * total, f"compiled gradients are {error / total:.1%} off"
    for name, g in grads[False].items():  # and no parameter's gradient is lost
        assert (grads[True][name] - g).norm() <= 1e-2 * g.norm() + 1e-6 * total, name


@pytest.mark.slow
def test_compiled_generation_matches_eager():
    stack = tiny_stack("sd15", seed=0)
    stack.unet.eval()
    kw = dict(sampler="ddpm", num_inference_steps=3, guidance_scale=5.0, seed=7, batch_size=6, progress=False)
    eager = generate_candidates(stack, ["a cat", "a red dog"], 3, **kw).latents
    fast = generate_candidates(
        dataclasses.replace(stack, unet=torch.compile(stack.unet)), ["a cat", "a red dog"], 3, **kw
    ).latents
    assert eager.shape == (2, 3, 4, 16, 16) and eager.std() > 0.1
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_scorer_matches_eager():
    # UNet calls of 12 rows of 16x16 latents, like the generation test's CFG batches, so the
    # scorer reuses that compiled graph when both run (compiling costs about a minute).
    stack = tiny_stack("sd15", seed=0)
    reference = stack.unet.eval()
    policy = _perturbed_copy(reference).eval()
    embeds = stack.encode_prompts(["a cat", "a red dog"])
    latents = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def score(compile):
        scorer = ImplicitRewardScorer(
            copy.deepcopy(policy),
            copy.deepcopy(reference),
            stack.scheduler,
            num_draws=3,
            micro_batch=12,
            channels_last=False,
            compile=compile,
        )
        draws = scorer.sample_draws(2, (4, 16, 16), generator=torch.Generator().manual_seed(2))
        return scorer.best_worst(latents, embeds.prompt_embeds, timesteps=draws.timesteps, noise=draws.noise)

    eager, compiled = score(False), score(True)
    assert eager.rewards.abs().min() > 0
    torch.testing.assert_close(compiled.rewards, eager.rewards, rtol=1e-3, atol=1e-2)
    assert torch.equal(compiled.best, eager.best) and torch.equal(compiled.worst, eager.worst)


def test_compile_under_deepspeed_is_refused(tmp_path):
    config = load_config(
        TINY,
        [f"output_dir={tmp_path}", "train.compile=true", f"train.deepspeed={TINY.parent / 'deepspeed' / 'zero2.json'}"],
    )
    stack = build_stack(config.model, seed=config.seed)
    with pytest.raises(ValueError, match="train.compile is not supported under DeepSpeed"):
        trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 4, 0))
