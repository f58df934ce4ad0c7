"""The DPO trainer flushes denormals to zero for its steps only: the process's setting is back afterwards."""

import sys
from pathlib import Path

import torch

from sail_fast.diffusion.build import build_stack
from sail_fast.dpo.builder import trainer_for
from sail_fast.dpo.trainer import DPOTrainer
from sail_fast.runs.config import load_config
from sail_fast.runs.denormals import flush_denormal, flush_denormal_enabled

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY, planted_pairs  # noqa: E402


def test_flush_denormal_restores_the_setting_it_found():
    if not torch.set_flush_denormal(False):
        return  # a CPU without FTZ/DAZ: nothing to set or restore
    assert not flush_denormal_enabled()
    with flush_denormal():
        assert flush_denormal_enabled()
    assert not flush_denormal_enabled()
    with flush_denormal(False):
        assert not flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        with flush_denormal():
            assert flush_denormal_enabled()
        assert flush_denormal_enabled()  # it was on before: left on
    finally:
        torch.set_flush_denormal(False)


def test_trainer_flushes_during_its_steps_and_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    if not torch.set_flush_denormal(False):
        return
    config = load_config(
        TINY, [f"output_dir={tmp_path}", "train.steps=2", "train.pairs_per_step=4", "train.micro_batch_pairs=4"]
    )
    stack = build_stack(config.model, seed=config.seed, device=torch.device("cpu"))
    trainer = trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 8, 0))
    assert not flush_denormal_enabled()  # building the trainer changes nothing
    seen = []
    step_loss = DPOTrainer._micro_step_loss
    monkeypatch.setattr(
        DPOTrainer, "_micro_step_loss", lambda self, *a: seen.append(flush_denormal_enabled()) or step_loss(self, *a)
    )
    trainer.train()
    assert seen == [True, True] and not flush_denormal_enabled()
