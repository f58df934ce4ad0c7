"""sail.soup: after the rounds the run keeps the weight average of iter0 up to the stage sail.select picks, as a
stage of its own (soup-00-0k), evaluated, named by chosen.json and taken by `export RUN`; under LoRA the average
is of each stage's merged update, not of its A and B apart. Where the rule keeps iter0 there is nothing to
average and no soup is made."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail_fast.commands.generate import export_unet, resolve_checkpoint
from sail_fast.diffusion.build import build_stack
from sail_fast.diffusion.lora import POLICY, adapter_state, merged_unet, save_adapter
from sail_fast.runs.config import load_config
from sail_fast.runs.layout import RunLayout
from sail_fast.runs.run_folder import write_manifest
from sail_fast.sail import evaluation
from sail_fast.sail.loop import SailLoop
from sail_fast.sail.policies import Policies
from sail_fast.sail.soup import soup_rounds, weight_average

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_overrides  # noqa: E402
from test_selection import planted_fit  # noqa: E402
from test_train import TINY  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


def test_the_soup_averages_iter0_up_to_the_kept_round_and_names_its_stage():
    assert soup_rounds("round-03") == [0, 1, 2, 3] and soup_rounds("iter0") == [] and soup_rounds("base") == []
    assert RunLayout.soup_name(3) == "soup-00-03" and RunLayout.is_soup("soup-00-03")
    assert RunLayout.is_stage("soup-00-12") and not RunLayout.is_stage("soup-01-03")
    assert not RunLayout.is_stage("soup-00-03/../../x") and not RunLayout.is_stage("soup")


def lora_deltas(path: Path, scale: float) -> dict[str, torch.Tensor]:
    """Each adapted layer's update B·A (times peft's alpha / rank), by the layer's module name (the file is in
    diffusers' layout: A is ``lora.down``, B is ``lora.up``)."""
    state = load_file(path)
    names = {
        k.removeprefix("unet.").removesuffix(".lora.down.weight") for k in state if k.endswith(".lora.down.weight")
    }
    return {n: scale * state[f"unet.{n}.lora.up.weight"] @ state[f"unet.{n}.lora.down.weight"] for n in names}


def test_a_lora_soup_averages_the_merged_updates_not_a_and_b_apart(tmp_path):
    config = load_config(TINY, ["train.lora.rank=4"])
    policies = Policies(build_stack(config.model).unet, config.train.lora, seed=0)
    unet, generator = policies.unet, torch.Generator().manual_seed(0)
    adapter = [p for n, p in unet.named_parameters() if "lora_" in n and f".{POLICY}." in n]
    with torch.no_grad():  # a stage (A, B) and its mirror (-A, -B): the same update B·A, while mean(A) = mean(B) = 0
        for p in adapter:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        save_adapter(tmp_path / "one/lora", adapter_state(unet, POLICY), unet)
        for p in adapter:
            p.neg_()
        save_adapter(tmp_path / "two/lora", adapter_state(unet, POLICY), unet)
    for stage in ("one", "two"):
        write_manifest(tmp_path / stage)
    soup = weight_average(policies, [tmp_path / "one/lora", tmp_path / "two/lora"]).state_dict()
    merged = merged_unet(unet).state_dict()  # the base with the update B·A, once
    plain = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    changed = [k for k in merged if not torch.equal(merged[k], plain[k])]
    assert changed and all(torch.allclose(soup[k], merged[k], atol=1e-6) for k in merged)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["train.lora.rank=4"]], ids=["unet", "lora"])
def test_the_run_keeps_the_soup_of_its_sound_stages_and_export_takes_it(tmp_path, monkeypatch, lora):
    planted_fit(monkeypatch, [math.log(2.0), 0.62, 0.58, 0.55, 0.6])  # every stage sound: guarded keeps round-02
    overrides = make_overrides(tmp_path, "sail.soup=true", *lora)
    SailLoop(load_config(TINY, overrides)).run()
    run = tmp_path / "run"
    chosen = json.loads((run / "chosen.json").read_text())
    members = ["iter0", "round-01", "round-02"]
    assert chosen | {"stage": "soup-00-02", "selected": "round-02", "soup_of": members} == chosen
    assert "weight average of iter0, round-01, round-02" in chosen["reason"]
    soup = run / "soup-00-02"
    assert (soup / "done.json").is_file() and (soup / "final/manifest.json").is_file()
    assert "oracle_score" not in json.loads((soup / "eval.json").read_text())  # a plain world: no judge
    assert json.loads((soup / "eval.json").read_text())["heldout_dpo_loss"] == 0.6  # scored like a stage
    assert "| **soup-00-02** (kept) | 0.6000 |" in (run / "summary.md").read_text()
    layout = RunLayout(run)  # what `toy transfer` evaluates again, and where the soup's weights are
    assert layout.evaluated_stages() == ["base", *members, "soup-00-02"] and layout.soups() == ["soup-00-02"]
    assert layout.stage_final("soup-00-02") == soup / "final" and layout.stage_final("base") is None

    ours = load_file(soup / "final/unet" / WEIGHTS)
    if not lora:  # the mean of the three stages' weights
        stages = [load_file(RunLayout(run).final(r) / "unet" / WEIGHTS) for r in range(3)]
        assert all(torch.allclose(ours[k], sum(s[k] for s in stages) / 3, atol=1e-6) for k in ours)
        assert any(not torch.allclose(ours[k], stages[2][k]) for k in ours)  # and not the kept round's
    else:  # the base plus the mean of the stages' updates B·A
        base = SailLoop(load_config(TINY, overrides)).policies.unet  # the base UNet, its adapters beside
        files = [RunLayout(run).final(r) / "lora" / LORA_FILE for r in range(3)]
        scale = 1.0  # train.lora's alpha defaults to its rank
        deltas = [lora_deltas(f, scale) for f in files]
        layers = sorted(deltas[0])
        assert layers
        for name in layers:
            weight = ours[f"{name}.weight"]
            plain = base.get_submodule(name).base_layer.weight.detach()
            mean = sum(d[name] for d in deltas) / 3
            assert torch.allclose(weight, plain + mean.reshape(weight.shape), atol=1e-6), name

    # export RUN takes the soup (as `toy transfer` reads it, a whole UNet); a resumed run reads it, never rebuilds it.
    read = SailLoop(load_config(TINY, overrides)).stage_policy("soup-00-02").state_dict()
    assert all(torch.equal(read[k].cpu(), ours[k]) for k in ours)
    exported = load_file(export_unet(run, tmp_path / "export", merge=True) / WEIGHTS)
    assert all(torch.equal(exported[k], ours[k]) for k in ours)
    written = (soup / "final/unet" / WEIGHTS).stat().st_mtime_ns
    SailLoop(load_config(TINY, overrides)).run(resume=True)
    assert (soup / "final/unet" / WEIGHTS).stat().st_mtime_ns == written
    assert json.loads((run / "chosen.json").read_text()) == chosen
    # A chosen.json naming a soup this layout could not have written is refused, not followed.
    (run / "chosen.json").write_text(json.dumps(chosen | {"stage": "soup-00-02/../../../elsewhere"}))
    with pytest.raises(ValueError, match="'stage' must name a stage of the run"):
        resolve_checkpoint(run)


@pytest.mark.slow
def test_a_run_that_keeps_iter0_makes_no_soup(tmp_path, monkeypatch):
    fits = iter([(math.log(2.0), 0.5), (0.62, 0.6), (0.58, 0.4)])  # round-01 ranks the held-out pairs below chance

    def fit(*args, **kwargs):
        loss, accuracy = next(fits)
        return {"heldout_dpo_loss": loss, "heldout_accuracy": accuracy, "heldout_drift": 0.0}

    monkeypatch.setattr(evaluation, "heldout_fit", fit)
    steady = {"prompt_consistency": 0.16, "prompt_choice_accuracy": 1.0}
    monkeypatch.setattr(evaluation, "prompt_consistency", lambda *args, **kwargs: steady)
    SailLoop(load_config(TINY, make_overrides(tmp_path, "sail.soup=true", "sail.early_stop=true"))).run()
    chosen = json.loads((tmp_path / "run/chosen.json").read_text())
    assert chosen | {"stage": "iter0", "soup_of": None, "rounds_run": 1} == chosen
    assert not list((tmp_path / "run").glob("soup-*"))
