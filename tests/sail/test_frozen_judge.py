"""sail.frozen_judge: every round samples from the policy it trains, but ranks the
candidates with iter0's implicit reward, read once from iter0's saved weights; whole UNets and LoRA adapters."""

import json
import sys
from pathlib import Path

import pytest
import torch

from sail_fast.runs.config import load_config
from sail_fast.sail.loop import SailLoop
from sail_fast.sail.ranking import ImplicitRanker

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_overrides  # noqa: E402
from test_train import TINY  # noqa: E402

PROBE = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def probe(unet, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction on one fixed latent: tells weights apart whatever holds them (UNet or adapter)."""
    with torch.no_grad():
        return unet(PROBE.to(unet.dtype), 500, encoder_hidden_states=cond.to(unet.dtype)).sample.float()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["train.lora.rank=4"]], ids=["unet", "lora"])
def test_every_round_ranks_with_iter0_and_samples_from_the_round_policy(tmp_path, monkeypatch, lora):
    judged, rank = {}, ImplicitRanker.rank

    def spy(self, r, prompts, embeds, latents, policy, reference):
        cond = embeds.prompt_embeds[:1].float()
        judged[r] = (cond, probe(policy, cond))
        return rank(self, r, prompts, embeds, latents, policy, reference)

    monkeypatch.setattr(ImplicitRanker, "rank", spy)
    overrides = make_overrides(tmp_path, "sail.frozen_judge=true", "sail.eval_each_round=false", *lora)
    SailLoop(load_config(TINY, overrides)).run()
    assert sorted(judged) == [1, 2]
    run = tmp_path / "run"
    assert json.loads((run / "round-02/ranking.json").read_text())["frozen_judge"] is True

    # The weights iter0 saved, and round 1's (the policy round 2 samples from), loaded afresh from disk.
    fresh = SailLoop(load_config(TINY, overrides))
    iter0 = fresh.policies.load(fresh.policy_dir(0), "check_iter0")
    for r, (cond, seen) in judged.items():
        torch.testing.assert_close(seen, probe(iter0, cond), rtol=1e-5, atol=1e-6, msg=f"round {r} judge")
    round1 = fresh.policies.load(fresh.policy_dir(1), "check_round1")
    cond = judged[2][0]
    assert (probe(round1, cond) - probe(iter0, cond)).abs().max() > 1e-4  # the rounds did train: a real check


def test_a_frozen_judge_that_cannot_judge_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="frozen_judge picks.*ranker: external.*frozen_judge: false"):
        load_config(
            TINY,
            make_overrides(tmp_path, "sail.frozen_judge=true", "sail.ranker=external", "sail.ranker_metric=toy_oracle"),
        )
    with pytest.raises(ValueError, match="iter0_steps: 0 ranks with the base against itself"):
        load_config(TINY, make_overrides(tmp_path, "sail.frozen_judge=true", "sail.iter0_steps=0"))
