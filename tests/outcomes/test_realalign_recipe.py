"""RealAlign as its authors run it: inpainted-subject losers (masks from a folder, a saliency function or the
world; redrawn by the policy or a diffusers inpainting pipeline), the curation filters, per-round settings,
the shipped two-stage config, and the recipe end to end in the toy world."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.runs.config import ConfigError, load_config, round_config
from sail_fast.sail.inpaint import PipelineInpainter, latent_masks, mask_source, subject_masks
from sail_fast.sail.realalign import RealImage, encode_real, read_real_images

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_reproduces_the_published_hyperparameters():
    config = load_config(REPO / "configs/realalign-sd15.yaml")
    train, sail = config.train, config.sail
    # stage 1 (train-irl.sh, next-irl-top_512.sh): Diffusion-DRO, LoRA r4, lr 1e-4, margin 0.001, from the base
    assert (train.loss, train.dro_margin, train.learning_rate, train.warmup_steps) == ("dro", 0.001, 1e-4, 0)
    assert (train.lora.rank, train.lora.alpha, train.lora.target_modules) == (
        4,
        4,
        ["to_q", "to_k", "to_v", "to_out.0"],
    )
    assert (train.pairs_per_step, config.data.caption_dropout, train.mixed_precision) == (256, 0.2, "fp16")
    assert (sail.iter0_steps, sail.training_reference, sail.rounds - 1, sail.round_steps) == (0, "base", 8, 200)
    # the replay buffer: the policy's own samples, DPM-Solver++ 20 steps, CFG 1
    assert (sail.real.loser, sail.real.sampler, sail.real.sampling_steps, sail.real.guidance_scale) == (
        "own_sample",
        "dpmsolver",
        20,
        1.0,
    )
    assert (sail.real.top_k, sail.real.filter_metric, sail.real.disjoint) == (512, "pickscore", False)
    # stage 2 (lora_init.sh): Diffusion-DPO beta 2000 from the stage-1 adapter, held to it, inpainted losers
    stage2 = round_config(config, sail.rounds)
    assert (stage2.train.loss, stage2.train.beta, stage2.sail.round_steps, stage2.train.warmup_steps) == (
        "sigmoid",
        2000,
        1000,
        125,
    )
    assert (stage2.sail.training_reference, stage2.sail.real.loser, stage2.sail.real.min_margin) == (
        "round_start",
        "inpaint",
        0.02,
    )
    assert stage2.sail.real.inpaint_steps == 50
    assert round_config(config, 1) is config  # rounds without overrides run the config itself


def test_round_override_rules():
    base = REPO / "configs/toy-quick.yaml"
    with pytest.raises(ConfigError, match="rounds run 1..2"):
        load_config(base, ["sail.round_overrides={3: [train.beta=1]}"])
    with pytest.raises(ConfigError, match="cannot change between rounds"):
        load_config(base, ["sail.round_overrides={2: [sail.prompts_per_round=4]}"])
    with pytest.raises(ConfigError, match=r"round_overrides\[2\].*train.los"):
        load_config(base, ["sail.round_overrides={2: [train.loss=dpo]}"])
    config = load_config(base, ["sail.round_overrides={2: [train.loss=dmpo, sail.num_draws=3]}"])
    assert round_config(config, 2).train.loss == "dmpo" and round_config(config, 2).sail.num_draws == 3
    assert round_config(config, 1).train.loss == "sigmoid"
    with pytest.raises(ConfigError, match="no round uses sail.real.loser: inpaint"):
        load_config(base, ["sail.pair_sources=[real]", "sail.real.inpaint_pipeline=x"])
    with pytest.raises(ConfigError, match="filter_metric"):
        load_config(base, ["sail.real.top_k=3"])
    with pytest.raises(ConfigError, match="iter0_steps: 0"):
        load_config(REPO / "configs/tiny.yaml", ["sail.rounds=1"])
    with pytest.raises(ConfigError, match="mixup_alpha: 1"):
        load_config(REPO / "configs/tiny.yaml", ["sail.rounds=1", "sail.iter0_steps=0"])


# ----------------------------------------------------------------------------- masks


def _items(folder: Path, n=3, size=12):
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        arr = np.zeros((size, size), dtype=np.uint8)
        arr[2 + i : 6 + i, 3:7] = 255  # a bright square: the subject
        Image.fromarray(arr).save(folder / f"im{i}.png")
        items.append(RealImage(f"caption {i}", folder / f"im{i}.png", f"im{i}"))
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(it.image), dtype=np.float32) / 127.5 - 1) for it in items]
    )[:, None]
    return items, pixels


def test_masks_from_a_folder_a_saliency_function_and_the_world(tmp_path):
    items, pixels = _items(tmp_path / "images")
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for i in range(3):
        arr = np.zeros((24, 24), dtype=np.uint8)  # another size: resized to the image's
        arr[:, : 12 + 4 * i] = 255
        Image.fromarray(arr).save(masks_dir / f"im{i}.png")
    got = subject_masks(mask_source(str(masks_dir), None), items, pixels)
    assert got.shape == (3, 1, 12, 12) and got.min() == 0 and got.max() == 1
    assert [int((got[i, 0, 0] > 0.5).sum()) for i in range(3)] == [6, 8, 10]  # each image gets its own mask

    (tmp_path / "saliency.py").write_text("def bright(pixels):\n    return (pixels[:, :1] > 0).float()\n")
    by_fn = subject_masks(mask_source(f"{tmp_path / 'saliency.py'}:bright", None), items, pixels)
    torch.testing.assert_close(by_fn, (pixels > 0).float())

    from sail_fast.toy.run import ToyWorld

    stroke = subject_masks(mask_source(None, ToyWorld.subject_masks), items, pixels)
    assert int(stroke[0].sum()) == 6 * 6  # the 4x4 square dilated by one pixel on each side
    assert stroke[0, 0, 1:7, 2:8].min() == 1

    with pytest.raises(ValueError, match="set sail.real.mask"):
        mask_source(None, None)
    with pytest.raises(FileNotFoundError, match="no mask im0"):
        subject_masks(mask_source(str(tmp_path / "images" / ".."), None), items, pixels)
    (tmp_path / "bad.py").write_text(
        "def big(pixels):\n    return 2 * torch.ones(len(pixels), 1, 12, 12)\nimport torch\n"
    )
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        subject_masks(mask_source(f"{tmp_path / 'bad.py'}:big", None), items, pixels)
    (tmp_path / "shape.py").write_text("def wrong(pixels):\n    return pixels\n")
    with pytest.raises(ValueError, match="expected"):
        subject_masks(mask_source(f"{tmp_path / 'shape.py'}:wrong", None), items, pixels[:, [0, 0]])
    # averaged down to the latent grid: soft at the edges, the same area
    soft = latent_masks(got, (6, 6))
    assert soft.shape == (3, 1, 6, 6) and torch.allclose(soft.mean((1, 2, 3)), got.mean((1, 2, 3)))


def _inpainting_pipeline(path: Path):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    stack = tiny_stack("sd15", with_vae=True, sample_size=8)
    config = dict(stack.unet.config) | {"in_channels": 9, "out_channels": 4}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)  # latents + masked-image latents + mask
    pipe = StableDiffusionInpaintPipeline(
        stack.vae,
        stack.text_encoder,
        stack.tokenizer,
        unet,
        DDIMScheduler.from_config(stack.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return stack


def test_a_local_inpainting_pipeline_redraws_the_losers_when_the_real_images_are_encoded(tmp_path):
    stack = _inpainting_pipeline(tmp_path / "inpaint")
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo {i}")
    items = read_real_images(folder)
    inpainter = PipelineInpainter(tmp_path / "inpaint", steps=3, strength=1.0, device=torch.device("cpu"))
    half = torch.zeros(3, 1, 16, 16)
    half[..., :8] = 1
    calls = []

    def redraw(pixels, chunk, seeds):
        calls.append(len(chunk))
        return inpainter(pixels, half[: len(chunk)], [it.caption for it in chunk], seeds)

    pairs = encode_real(items, stack, resolution=16, loser="inpaint", redraw=redraw, batch_size=2, progress=False)
    assert calls == [2, 1] and pairs.lose.shape == pairs.win.shape
    assert not torch.allclose(pairs.lose, pairs.win)
    again = encode_real(items, stack, resolution=16, loser="inpaint", redraw=redraw, batch_size=3, progress=False)
    torch.testing.assert_close(again.lose, pairs.lose, rtol=1e-4, atol=1e-4)  # seeded per image, not per batch
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        PipelineInpainter(tmp_path, steps=3, strength=1.0, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- the recipe in the toy world


def _oracle_scores(metric, latents, prompts):
    from sail_fast.diffusion.images import decode_latents

    return metric.score(decode_latents(latents), prompts)


@pytest.mark.slow
def test_realalign_two_stage_recipe_runs_in_the_toy_world(tmp_path):
    """No iter0; rounds 1-2 Diffusion-DRO (LoRA) against the base with own samples from DPM-Solver++;
    round 3 Diffusion-DPO held to round 2's policy, on inpainted losers past a margin filter, from the
    top-k real digits by the oracle."""
    from sail_fast.commands.train import run_sail
    from sail_fast.metrics import load_metric
    from sail_fast.sail.realalign import captions

    config = load_config(
        REPO / "configs/toy-quick.yaml",
        [
            f"output_dir={tmp_path}",
            "sail.rounds=3",
            "sail.iter0_steps=0",
            "sail.pair_sources=[real]",
            "sail.real.per_round=12",
            "sail.real.disjoint=false",
            "sail.real.top_k=20",
            "sail.real.filter_metric=toy_oracle",
            "sail.real.sampler=dpmsolver",
            "sail.real.sampling_steps=5",
            "sail.real.guidance_scale=1.0",
            "train.loss=dro",
            "train.lora={rank: 4}",
            "train.learning_rate=1e-3",
            "train.mixup_alpha=1.0",
            "sail.training_reference=base",
            "sail.eval_each_round=false",
            "sail.round_overrides={3: [train.loss=sigmoid, sail.training_reference=round_start, sail.real.loser=inpaint, "
            "sail.real.min_margin=0.0]}",
        ],
    )
    run_sail(config)
    out = Path(config.output_dir)
    assert json.loads((out / "iter0/done.json").read_text())["human_pairs"] >= 0
    assert (out / "iter0/final/lora").is_dir() and not (out / "iter0/checkpoints").exists()

    def first_step(r):
        return json.loads((out / f"round-{r:02d}/train/metrics.jsonl").read_text().splitlines()[0])

    # stage 1 holds every round to the base: round 2 starts from a trained policy, so policy != reference
    assert first_step(1)["mse_policy_win"] == pytest.approx(first_step(1)["mse_ref_win"], abs=1e-7)  # base == base
    assert abs(first_step(2)["mse_policy_win"] - first_step(2)["mse_ref_win"]) > 1e-6
    # stage 2 is held to the policy it starts from: the DPO logit is exactly 0 at its first step
    assert first_step(3)["logit"] == 0.0 and first_step(3)["loss"] == pytest.approx(np.log(2), abs=1e-6)

    oracle = load_metric("toy_oracle")
    for r in (1, 2, 3):
        pairs = LatentPairs.load(out / f"round-{r:02d}/pairs.safetensors")
        caps = captions(pairs)
        margin = _oracle_scores(oracle, pairs.win, caps) - _oracle_scores(oracle, pairs.lose, caps)
        if r == 3:  # the margin filter kept only pairs where the real digit scores higher
            assert len(pairs) <= 12 and (margin > 0).all()
            # inpainted: the loser is the real digit outside its dilated stroke, redrawn inside it
            from sail_fast.toy.run import ToyWorld

            mask = ToyWorld.subject_masks(pairs.win)
            torch.testing.assert_close(pairs.lose * (1 - mask), pairs.win * (1 - mask))
            assert ((pairs.lose - pairs.win).abs() * mask).sum() > 0
        else:  # own samples: a whole new digit
            assert len(pairs) == 12 and (pairs.lose - pairs.win).abs().mean() > 0.1
    # every round trains on the same real digits: the 12 best by the oracle (of its top 20)
    items = read_real_images(out / "real-digits")
    all_scores = oracle.score([Image.open(it.image) for it in items], [it.caption for it in items])
    first = LatentPairs.load(out / "round-01/pairs.safetensors")
    winners = _oracle_scores(oracle, first.win, captions(first))
    torch.testing.assert_close(winners, all_scores.sort(descending=True).values[:12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(LatentPairs.load(out / "round-02/pairs.safetensors").win, first.win)


def test_realalign_with_no_human_pairs_and_pipeline_inpainted_losers_on_an_sd_stack(tmp_path):
    """No seed pairs and no iter0 (the rounds start from the base): one Diffusion-DRO round held to the base,
    on losers a local inpainting pipeline drew once, at encoding, inside masks read from a folder."""
    from test_loop import make_overrides
    from test_train import TINY

    from sail_fast.sail.loop import SailLoop

    _inpainting_pipeline(tmp_path / "inpaint")
    real, masks = tmp_path / "real", tmp_path / "masks"
    real.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(real / f"{i}.png")
        (real / f"{i}.txt").write_text(f"a real picture {i}")
        Image.fromarray(np.full((20, 20), 255 * (i % 2), dtype=np.uint8)).save(masks / f"{i}.png")
    overrides = make_overrides(
        tmp_path,
        "model.with_vae=true",
        "data.resolution=16",
        "data.seed_pairs=[]",
        "sail.iter0_steps=0",
        "train.mixup_alpha=1.0",
        "sail.rounds=1",
        "sail.pair_sources=[real]",
        f"sail.real.data={real}",
        "sail.real.per_round=4",
        "sail.real.loser=inpaint",
        f"sail.real.mask={masks}",
        f"sail.real.inpaint_pipeline={tmp_path / 'inpaint'}",
        "sail.real.inpaint_steps=2",
        "train.loss=dro",
        "sail.training_reference=base",
    )
    SailLoop(load_config(TINY, overrides)).run()
    run = tmp_path / "run"
    assert json.loads((run / "iter0/done.json").read_text())["human_pairs"] == 0
    encoded = LatentPairs.load(next(p for p in (run / "cache").glob("real-*.safetensors") if "masks" not in p.name))
    pairs = LatentPairs.load(run / "round-01/pairs.safetensors")
    torch.testing.assert_close(pairs.win, encoded.win)
    torch.testing.assert_close(pairs.lose, encoded.lose)  # drawn once by the pipeline, not by the round's policy
    assert not (run / "round-01/real_losers.rank0.safetensors").exists()
    assert (pairs.lose - pairs.win).abs().mean() > 0.01
    steps = [json.loads(line) for line in (run / "round-01/train/metrics.jsonl").read_text().splitlines()]
    # The base on both sides: equal up to fp32 rounding (the policy sees winners and losers as one batch).
    assert steps[0]["mse_policy_win"] == pytest.approx(steps[0]["mse_ref_win"], rel=1e-6, abs=0)
    assert (run / "round-01/train/final/unet").is_dir()
