"""The SAIL loop end to end on a tiny random SD1.5-shaped stack: stages, ranking, resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.build import build_stack
from sail_fast.dpo.trainer import DPOTrainer
from sail_fast.runs.config import load_config
from sail_fast.sail.evaluation import sample_diversity
from sail_fast.sail.loop import SailLoop

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402


def make_overrides(tmp_path, *extra):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir(parents=True)
        stack = build_stack(load_config(TINY).model)
        planted_pairs(stack, 32, 0).save(data / "seed.safetensors")
        planted_pairs(stack, 16, 1).save(data / "heldout.safetensors")
        (data / "prompts.txt").write_text("".join(f"prompt number {i}\n" for i in range(20)))
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.seed_pairs=[{data / 'seed.safetensors'}]",
        f"sail.heldout_pairs=[{data / 'heldout.safetensors'}]",
        f"sail.prompts={data / 'prompts.txt'}",
        "sail.rounds=2",
        "sail.prompts_per_round=4",
        "sail.candidates=4",
        "sail.num_draws=3",
        "sail.sampling_steps=3",
        "sail.eval_prompts=3",
        "sail.eval_images_per_prompt=2",
        "train.steps=2",
        "train.micro_batch_pairs=8",
        "sail.early_stop=false",  # every round runs (tests/sail/test_selection.py turns it on)
        *extra,
    ]


def make_config(tmp_path, *extra):
    return load_config(TINY, make_overrides(tmp_path, *extra))


def final_weights(run: Path) -> dict:
    return load_file(run / "round-02/train/final/unet/diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_rounds_write_their_stages_and_pair_best_against_worst(tmp_path):
    config = make_config(tmp_path)
    final = SailLoop(config).run()
    run = tmp_path / "run"
    assert final == run / "round-02/train/final/unet"
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "iter0", "round-01", "round-02"]
    assert all(0.0 <= r["self_label_agreement"] <= 1.0 for r in rows[1:]) and "self_label_agreement" not in rows[0]
    assert (run / "curves.png").stat().st_size > 0

    seen = set()
    for r in (1, 2):
        stage = run / f"round-{r:02d}"
        ranking = json.loads((stage / "ranking.json").read_text())
        prompts = ranking["prompts"]
        assert len(prompts) == 4 and not seen & set(prompts)  # disjoint prompt sets
        seen |= set(prompts)
        rewards = torch.tensor(ranking["rewards"])
        latents = load_file(stage / "candidates.rank0.safetensors")["latents"]
        pairs = LatentPairs.load(stage / "pairs.safetensors")
        assert len(pairs) == 4 and pairs.source == ["sail"] * 4
        assert [pairs.prompts[i] for i in pairs.prompt_index] == prompts
        assert torch.equal(pairs.win, latents[torch.arange(4), rewards.argmax(1)])
        assert torch.equal(pairs.lose, latents[torch.arange(4), rewards.argmin(1)])
        assert ranking["reward_spread_mean"] == pytest.approx(
            float((rewards.max(1).values - rewards.min(1).values).mean())
        )
        # The round's DPO mixed its pairs with the seed: a quarter of each batch of 8 is generated.
        assert "2 generated + 6 seed pairs per batch" in (stage / "train/train.log").read_text()


def test_a_round_encodes_its_prompts_once(tmp_path, monkeypatch):
    # Sampling, ranking and the pairs all read the one encoding of the round's prompts (and the empty one).
    from sail_fast.diffusion.stack import DiffusionStack

    calls, encode = [], DiffusionStack.encode_prompts
    monkeypatch.setattr(
        DiffusionStack, "encode_prompts", lambda self, prompts: calls.append(list(prompts)) or encode(self, prompts)
    )
    SailLoop(make_config(tmp_path, "sail.rounds=1")).run()
    round_prompts = json.loads((tmp_path / "run/round-01/ranking.json").read_text())["prompts"]
    assert [c for c in calls if set(c) & set(round_prompts)] == [round_prompts + [""]]


def test_heldout_split_holds_seed_pairs_out_of_training_for_the_round_score(tmp_path):
    # No held-out file: 8 of the 32 seed pairs become the held-out pairs; iter0 trains on the other 24.
    overrides = [o for o in make_overrides(tmp_path, "sail.rounds=0") if not o.startswith("sail.heldout_pairs")]
    logged = []
    SailLoop(load_config(TINY, overrides + ["sail.heldout_split=8"]), log=logged.append).run()
    run = tmp_path / "run"
    rows = json.loads((run / "metrics.json").read_text())
    assert [(r["stage"], r["heldout_pairs"]) for r in rows] == [("base", 8), ("iter0", 8)]
    assert 0 < rows[1]["heldout_dpo_loss"] != rows[0]["heldout_dpo_loss"]
    assert json.loads((run / "iter0/done.json").read_text())["human_pairs"] == 24
    assert "sail.heldout_split: 8 of 32 seed pairs held out for the round score" in logged

    # Without either, the run says what its choice cannot read, and how to give it.
    logged.clear()
    SailLoop(load_config(TINY, overrides + [f"output_dir={tmp_path / 'bare'}"]), log=logged.append).run()
    assert any(line.startswith("no held-out human pairs:") and "sail.heldout_split" in line for line in logged)
    with pytest.raises(ValueError, match="heldout_split: 32 of 32 seed pairs leaves none to train on"):
        SailLoop(load_config(TINY, overrides + [f"output_dir={tmp_path / 'all'}", "sail.heldout_split=32"])).run()


def test_random_pairing_orders_two_random_candidates_by_reward(tmp_path):
    SailLoop(make_config(tmp_path, "sail.pairing=random", "sail.rounds=1")).run()
    stage = tmp_path / "run/round-01"
    rewards = torch.tensor(json.loads((stage / "ranking.json").read_text())["rewards"])
    latents = load_file(stage / "candidates.rank0.safetensors")["latents"]
    pairs = LatentPairs.load(stage / "pairs.safetensors")
    win = [next(n for n in range(4) if torch.equal(latents[p, n], pairs.win[p])) for p in range(4)]
    lose = [next(n for n in range(4) if torch.equal(latents[p, n], pairs.lose[p])) for p in range(4)]
    assert all(rewards[p, win[p]] >= rewards[p, lose[p]] and win[p] != lose[p] for p in range(4))
    assert (win, lose) != (rewards.argmax(1).tolist(), rewards.argmin(1).tolist())


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    SailLoop(make_config(tmp_path / "a")).run()

    original, calls = DPOTrainer.train, []

    def killed_in_round_one(self, *, resume=False, stop_after=None):
        calls.append(self.output_dir)
        if len(calls) == 2:  # round 1's DPO: one step, a checkpoint, then the process dies
            original(self, resume=resume, stop_after=1)
            raise KeyboardInterrupt
        return original(self, resume=resume, stop_after=stop_after)

    monkeypatch.setattr(DPOTrainer, "train", killed_in_round_one)
    config = make_config(tmp_path / "b", "train.checkpoint_every=1")
    with pytest.raises(KeyboardInterrupt):
        SailLoop(config).run()
    monkeypatch.setattr(DPOTrainer, "train", original)
    with pytest.raises(FileExistsError, match="--resume"):
        SailLoop(config).run()
    SailLoop(config).run(resume=True)
    log = (tmp_path / "b/run/round-01/train/train.log").read_text()
    assert "resumed from" in log and "step-000001" in log
    a, b = final_weights(tmp_path / "a/run"), final_weights(tmp_path / "b/run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_too_few_prompts_is_a_clear_error(tmp_path):
    config = make_config(tmp_path, "sail.rounds=6")
    with pytest.raises(ValueError, match="need 24 distinct prompts, but the pool has 20"):
        SailLoop(config).run()


def test_sample_diversity_is_the_mean_pairwise_rms_distance():
    latents = torch.zeros(2, 3, 1, 2, 2)
    latents[0, 1] = 1.0  # distances within prompt 0: 1, 0, 1 (RMS over 4 values); prompt 1: all 0
    assert sample_diversity(latents) == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.slow
def test_two_ranks_deal_the_prompts_and_gather_the_same_pairs(tmp_path):
    # One DPO step at a learning rate below fp32 resolution (steps must be >= 1), so both runs rank
    # candidates of the base model, bit for bit; 5 prompts deal 3 + 2.
    overrides = make_overrides(
        tmp_path,
        "train.steps=1",
        "train.learning_rate=1e-30",
        "train.micro_batch_pairs=4",
        "sail.rounds=1",
        "sail.prompts_per_round=5",
        "sail.select=last",  # keeps round-01 whatever the (unchanged) policies score,
        "sail.soup=true",  # so both runs end by averaging iter0 and round-01 on every rank
    )
    SailLoop(load_config(TINY, overrides)).run()
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_accelerators", "2", "--master_port", str(free_port())]
    script = Path(__file__).resolve().parents[2] / "sail_fast" / "train.py"
    args = [a for kv in overrides + [f"output_dir={tmp_path / 'ds'}"] for a in ("--set", kv)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(script), "--config", str(TINY), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one, two = tmp_path / "run/round-01", tmp_path / "ds/round-01"
    single = load_file(one / "candidates.rank0.safetensors")["latents"]
    assert torch.equal(load_file(two / "candidates.rank0.safetensors")["latents"], single[0::2])
    assert torch.equal(load_file(two / "candidates.rank1.safetensors")["latents"], single[1::2])
    a, b = json.loads((one / "ranking.json").read_text()), json.loads((two / "ranking.json").read_text())
    assert a["prompts"] == b["prompts"]
    assert torch.allclose(torch.tensor(a["rewards"]), torch.tensor(b["rewards"]), rtol=1e-4, atol=1e-4)
    pairs_one, pairs_two = LatentPairs.load(one / "pairs.safetensors"), LatentPairs.load(two / "pairs.safetensors")
    assert torch.equal(pairs_one.win, pairs_two.win) and torch.equal(pairs_one.lose, pairs_two.lose)
    assert [pairs_one.prompts[i] for i in pairs_one.prompt_index] == [
        pairs_two.prompts[i] for i in pairs_two.prompt_index
    ]
    # The soup stage under two ranks: built on every rank without a hang, written once, named by chosen.json. The
    # stages are the base to 1e-30 here, so the weights only show it is the same stage; the average itself is
    # tests/sail/test_soup.py's.
    for run in ("run", "ds"):
        assert json.loads((tmp_path / run / "chosen.json").read_text())["stage"] == "soup-00-01"
    soups = [
        load_file(tmp_path / run / "soup-00-01/final/unet/diffusion_pytorch_model.safetensors") for run in ("run", "ds")
    ]
    # (equal but for the 1e-30 step, which weights at zero keep: the ranks sum gradients in another order)
    assert soups[0].keys() == soups[1].keys()
    assert all(torch.allclose(soups[0][k], soups[1][k], rtol=0, atol=1e-20) for k in soups[0])
