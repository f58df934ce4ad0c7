"""Diffusion-DPO training: learning, 8-bit AdamW, exact resume, and DeepSpeed ZeRO ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from ports import free_port  # noqa: E402
from safetensors.torch import load_file

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.build import build_stack
from sail_fast.dpo.builder import trainer_for
from sail_fast.reward.scorer import ImplicitRewardScorer
from sail_fast.runs.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
PATTERN = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(123)).sign()


def planted_pairs(stack, m, seed, source="human"):
    """Winners carry +PATTERN, losers -PATTERN: a preference a tiny UNet can learn."""
    gen = torch.Generator().manual_seed(seed)
    win = 0.7 * PATTERN + 0.5 * torch.randn(m, 4, 8, 8, generator=gen)
    lose = -0.7 * PATTERN + 0.5 * torch.randn(m, 4, 8, 8, generator=gen)
    prompts = ["a cat", "a dog", ""]
    embeds = stack.encode_prompts(prompts).prompt_embeds
    index = torch.randint(0, 2, (m,), generator=gen)
    return LatentPairs(win, lose, index, prompts, embeds, None, None, None, torch.ones(m), [source] * m)


def _setup(tmp_path, *overrides):
    config = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    return config, build_stack(config.model, seed=config.seed, device=torch.device("cpu"))


def _losses(path):
    return [json.loads(line)["loss"] for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_planted_preference_is_learned_on_held_out_pairs(tmp_path):
    config, stack = _setup(
        tmp_path,
        "train.steps=60",
        "train.pairs_per_step=16",
        "train.micro_batch_pairs=16",
        "train.checkpoint_every=1000",
    )
    trainer = trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 512, 0))
    reference = trainer.reference
    scorer = ImplicitRewardScorer(trainer.policy, reference, stack.scheduler, beta=config.train.beta, num_draws=4)
    held_out = planted_pairs(stack, 64, 1)
    before = scorer.pair_accuracy(held_out, generator=torch.Generator().manual_seed(0))
    trainer.train()
    after = scorer.pair_accuracy(held_out, generator=torch.Generator().manual_seed(0))
    assert before == 0.0  # policy == reference: every reward is exactly 0, no pair is won
    assert after >= 0.9
    losses = _losses(tmp_path / "run" / "metrics.jsonl")
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and sum(losses[-10:]) / 10 < 0.2
    assert (tmp_path / "run" / "final" / "unet" / "config.json").is_file()


@pytest.mark.slow
def test_adamw8bit_keeps_uint8_state_and_lowers_the_loss(tmp_path):
    config, stack = _setup(
        tmp_path,
        "train.optimizer=adamw8bit",
        "train.steps=25",
        "train.pairs_per_step=16",
        "train.micro_batch_pairs=16",
        "train.checkpoint_every=1000",
    )
    trainer = trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 256, 0))
    trainer.train()
    states = [s for s in trainer.optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)
    losses = _losses(tmp_path / "run" / "metrics.jsonl")
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "train.ema_decay=0.9",
            "train.optimizer=adafactor",
            "train.gradient_checkpointing=true",
            "train.mixed_precision=bf16",
        ],
    ],
    ids=["adamw", "ema-adafactor-checkpointing-bf16"],
)
@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, extra):
    args = [
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.pairs_per_step=8",
        "train.micro_batch_pairs=4",
        "data.caption_dropout=0.2",
        *extra,
    ]
    finals = []
    for name, stop_after in (("straight", None), ("resumed", 3)):
        config, stack = _setup(tmp_path / name, *args)
        seed, generated = planted_pairs(stack, 40, 0), planted_pairs(stack, 12, 5, source="sail")
        trainer_for(config, stack.unet, stack.scheduler, seed, generated_pairs=generated).train(stop_after=stop_after)
        if stop_after:
            # A new process would start from the same base weights: rebuild everything.
            config, stack = _setup(tmp_path / name, *args)
            trainer = trainer_for(config, stack.unet, stack.scheduler, seed, generated_pairs=generated)
            with pytest.raises(FileExistsError, match="--resume"):
                trainer.train()
            trainer.train(resume=True)
        finals.append(load_file(tmp_path / name / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
    base = build_stack(load_config(TINY).model, seed=0, device=torch.device("cpu")).unet.state_dict()
    assert any(not torch.equal(base[k], finals[0][k]) for k in finals[0])  # training changed the weights


def _train_cmd(config_args, launcher=None):
    script = str(REPO / "sail_fast" / "train.py")
    return [
        *(launcher or [sys.executable]),
        script,
        "--config",
        str(TINY),
        *[a for kv in config_args for a in ("--set", kv)],
    ]


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights(tmp_path):
    stack = build_stack(load_config(TINY).model, seed=0, device=torch.device("cpu"))
    planted_pairs(stack, 64, 0).save(tmp_path / "pairs.safetensors")
    common = [
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        "train.steps=12",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _train_cmd([*common, f"output_dir={tmp_path / 'straight'}"]), check=True, env=env, capture_output=True
    )
    victim = subprocess.Popen(
        _train_cmd([*common, f"output_dir={tmp_path / 'killed'}"]),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoints" / "step-000003").exists() and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    subprocess.run(
        _train_cmd([*common, f"output_dir={tmp_path / 'killed'}"]) + ["--resume"],
        check=True,
        env=env,
        capture_output=True,
    )
    a = load_file(tmp_path / "straight" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_batch_geometry(tmp_path):
    config, stack = _setup(tmp_path, "train.pairs_per_step=10", "train.micro_batch_pairs=4")
    with pytest.raises(ValueError, match="pairs_per_step=10 is not a multiple of micro_batch_pairs x ranks = 4 x 1"):
        trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 8, 0))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_ranks(tmp_path, stage):
    stack = build_stack(load_config(TINY).model, seed=0, device=torch.device("cpu"))
    planted_pairs(stack, 64, 0).save(tmp_path / "pairs.safetensors")
    out = tmp_path / "ds"
    launcher = [
        shutil.which("deepspeed") or "deepspeed",
        "--num_accelerators",
        "2",
        "--master_port",
        str(free_port()),
    ]
    args = [
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        f"output_dir={out}",
        "train.steps=2",
        "train.checkpoint_every=2",
        f"train.deepspeed={REPO / 'configs' / 'deepspeed' / f'zero{stage}.json'}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(_train_cmd(args, launcher), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = _losses(out / "metrics.jsonl"), _losses(out / "metrics.rank1.jsonl")
    assert len(rank0) == 2 and rank0 == rank1  # both ranks report the same (all-reduced) loss
    # The checkpoint's diffusers export loads in one process and equals DeepSpeed's own weights.
    ckpt = out / "checkpoints" / "step-000002"
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    final = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    for (name, p), q in zip(unet.state_dict().items(), final.state_dict().values()):
        assert torch.equal(p, q), name
    if stage == 2:
        ds_module = torch.load(
            ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
        for name, p in unet.state_dict().items():
            assert torch.equal(p, ds_module[name].float()), name
    base = stack.unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in unet.state_dict().items())
