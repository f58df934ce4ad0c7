"""RealAlign: real-image readers, the perturbations against literal formulas, encoding, the
masked redraw against a literal SDEdit loop, and rounds end to end on the toy and a tiny SD stack."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_data import _encoded, _to_unit

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.sampling import (
    generate_candidates,
    regenerate_region,
    sampling_scheduler,
)
from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.runs.config import load_config
from sail_fast.runs.seeding import derive_seed
from sail_fast.sail.realalign import (
    captions,
    encode_real,
    gaussian_blur,
    pixel_noise,
    read_real_images,
    region_masks,
)

REPO = Path(__file__).resolve().parents[2]


def _image(seed, size=16, mode="L"):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))


# ----------------------------------------------------------------------------- readers


def test_reads_metadata_jsonl_sidecar_captions_and_parquet(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    for i in range(3):
        _image(i).save(meta / f"{i}.png")
    rows = [{"file_name": "0.png", "text": "a zero"}, {"file_name": "2.png", "caption": " two "}]
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_real_images(meta)
    assert [(it.caption, Path(it.image).name) for it in items] == [("a zero", "0.png"), ("two", "2.png")]

    side = tmp_path / "side"
    side.mkdir()
    for i in range(2):
        _image(i).save(side / f"im{i}.jpg")
        (side / f"im{i}.txt").write_text(f"caption {i}\n")
    assert [it.caption for it in read_real_images(side)] == ["caption 0", "caption 1"]

    table = pa.table(
        {
            "image": [
                {"bytes": _encoded(_image(5), "PNG"), "path": None},
                {"bytes": _encoded(_image(6), "PNG"), "path": None},
            ],
            "prompt": ["five", "six"],
            "uid": [1, 2],
        }
    )
    pq.write_table(table, tmp_path / "real.parquet")
    items = read_real_images(tmp_path / "real.parquet")
    assert [it.caption for it in items] == ["five", "six"] and items[1].origin.endswith("real.parquet:1")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(items[0].image))), np.asarray(_image(5)))


def test_reader_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_real_images(tmp_path / "nowhere")
    side = tmp_path / "side"
    side.mkdir()
    _image(0).save(side / "a.png")
    with pytest.raises(ValueError, match=r"no caption.*a\.txt"):
        read_real_images(side)
    (side / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: image 'b\.png' not found"):
        read_real_images(side)
    (side / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: no caption"):
        read_real_images(side)
    pq.write_table(pa.table({"jpg_0": [b"x"], "caption": ["c"]}), tmp_path / "pairs.parquet")
    with pytest.raises(ValueError, match=r"found columns \['jpg_0', 'caption'\].*image column"):
        read_real_images(tmp_path / "pairs.parquet")


# ----------------------------------------------------------------------------- perturbations


def _literal_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """out[c, y, x] = sum_{i, j} k[i] k[j] img[c, clamp(y + i), clamp(x + j)], k a normalised Gaussian."""
    radius = max(1, math.ceil(3 * sigma))
    k = [math.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-radius, radius + 1)]
    k = [v / sum(k) for v in k]
    c, h, w = img.shape
    out = torch.zeros(c, h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for i, ki in enumerate(k):
                for j, kj in enumerate(k):
                    yy = min(max(y + i - radius, 0), h - 1)
                    xx = min(max(x + j - radius, 0), w - 1)
                    out[:, y, x] += ki * kj * img[:, yy, xx].double()
    return out


@pytest.mark.parametrize("shape,sigma", [((2, 1, 7, 5), 1.3), ((1, 3, 6, 9), 0.4), ((1, 1, 3, 3), 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_blur_matches_the_literal_convolution(shape, sigma, dtype):
    pixels = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    got = gaussian_blur(pixels.float(), sigma)
    for b in range(shape[0]):
        torch.testing.assert_close(got[b].double(), _literal_blur(pixels[b].float(), sigma), atol=1e-5, rtol=1e-5)
    flat = torch.full(shape, 0.3)
    torch.testing.assert_close(gaussian_blur(flat, sigma), flat)  # weights sum to one
    assert pixels.float().var() > got.var()  # it smooths


def test_pixel_noise_is_seeded_per_image_and_clamped():
    pixels = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    got = pixel_noise(pixels, 0.5, [11, 12])
    expected = pixels[1] + 0.5 * torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(got[1], expected.clamp(-1, 1))
    torch.testing.assert_close(pixel_noise(pixels[1:], 0.5, [12])[0], got[1])  # independent of its batch
    assert got.min() >= -1 and got.max() <= 1


def test_region_masks_are_seeded_rectangles_of_the_asked_area():
    masks = region_masks(16, 12, 0.25, [1, 2, 3, 1])
    assert masks.shape == (4, 1, 16, 12)
    for m in masks[:, 0]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert (len(rows), len(cols)) == (8, 6) and m.sum() == 48  # one full 8x6 rectangle
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
    assert torch.equal(masks[0], masks[3]) and not torch.equal(masks[0], masks[1])
    assert region_masks(4, 4, 1.0, [0]).sum() == 16


# ----------------------------------------------------------------------------- encoding


def test_encode_real_in_pixel_space_gives_the_real_images_and_their_perturbed_copies():
    stack = tiny_stack("sd15", in_channels=1)
    images = [_image(i) for i in range(3)]
    from sail_fast.sail.realalign import RealImage

    items = [RealImage(f"caption {i % 2}", im, f"item {i}") for i, im in enumerate(images)]
    pixels = torch.stack([_to_unit(im) for im in images])
    blur = encode_real(items, stack, resolution=16, loser="blur", blur_sigma=1.5, progress=False)
    torch.testing.assert_close(blur.win, pixels)
    torch.testing.assert_close(blur.lose, gaussian_blur(pixels, 1.5))
    assert captions(blur) == ["caption 0", "caption 1", "caption 0"] and blur.source == ["realalign"] * 3
    assert torch.equal(blur.label, torch.ones(3))
    noise = encode_real(items, stack, resolution=16, loser="noise", noise_std=0.3, seed=4, batch_size=2, progress=False)
    again = encode_real(items, stack, resolution=16, loser="noise", noise_std=0.3, seed=4, batch_size=3, progress=False)
    torch.testing.assert_close(noise.lose, again.lose)  # seeded per image, not per batch
    residual = noise.lose - pixels
    assert 0.1 < residual.std() < 0.35 and noise.lose.abs().max() <= 1
    own = encode_real(items, stack, resolution=16, loser="own_sample", progress=False)
    torch.testing.assert_close(own.lose, own.win)  # a placeholder the round replaces


def test_encode_real_with_a_vae_shares_sdxl_time_ids_across_the_pair():
    stack = tiny_stack("sdxl", with_vae=True)
    from sail_fast.sail.realalign import RealImage

    items = [
        RealImage("a", _image(0, size=24, mode="RGB").resize((32, 24)), "x"),
        RealImage("b", _image(1, mode="RGB"), "y"),
    ]
    out = encode_real(items, stack, resolution=16, loser="blur", progress=False)
    assert out.win.shape == (2, 4, 16 // stack.vae_scale_factor, 16 // stack.vae_scale_factor)
    assert torch.equal(out.time_ids_win, out.time_ids_lose)
    assert out.time_ids_win[0].tolist() == [24, 32, 0, 2, 16, 16]  # 32x24 -> 21x16, cropped from left 2
    assert not torch.allclose(out.win, out.lose)
    # The winner is a scaled sample of the VAE posterior of the (already 16 px) real pixels.
    with torch.no_grad():
        dist = stack.vae.encode(_to_unit(items[1].image)[None]).latent_dist
    z = (out.win[1] / stack.vae.config.scaling_factor - dist.mean[0]) / dist.std[0]
    assert z.abs().max() < 6 and z.abs().max() > 0


# ----------------------------------------------------------------------------- the masked redraw


@pytest.fixture(scope="module")
def toy_stack():
    from sail_fast.toy.world import load_toy_stack

    return load_toy_stack()


def _literal_redraw(stack, clean, prompt, mask, strength, seed, steps, guidance):
    """One row, one UNet call per branch: noise to the start step, denoise with CFG, and after each
    step put back the unmasked region noised (sqrt(a) x0 + sqrt(1 - a) eps) to the next step's level."""
    sched = sampling_scheduler(stack, "ddim")
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[steps - round(steps * strength) :]
    alphas = sched.alphas_cumprod
    noise = torch.randn((1, *clean.shape), generator=torch.Generator().manual_seed(seed))
    x0 = clean[None]

    def noised(t):
        return alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * noise

    cond, uncond = stack.encode_prompts([prompt]).prompt_embeds, stack.encode_prompts([""]).prompt_embeds
    x = noised(timesteps[0])
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            e_c = stack.unet(x, t, encoder_hidden_states=cond).sample
            e_u = stack.unet(x, t, encoder_hidden_states=uncond).sample
            # The toy scheduler clips x0, so a DDIM step of one image re-derives eps from the clipped x0.
            x = sched.step(e_u + guidance * (e_c - e_u), t, x, use_clipped_model_output=True).prev_sample
            known = x0 if i + 1 == len(timesteps) else noised(timesteps[i + 1])
            x = mask * x + (1 - mask) * known
    return x[0]


def test_regenerate_region_matches_a_literal_masked_sdedit_loop(toy_stack):
    from sail_fast.toy.world import load_digits

    digits, _ = load_digits()
    clean = digits[:3]
    prompts = ["a handwritten 1", "the digit seven", "a bold 3 written by hand"]
    masks = region_masks(16, 16, 0.3, [5, 6, 7])
    seeds = torch.tensor([21, 22, 23])
    kw = {"strength": 0.6, "sampler": "ddim", "num_inference_steps": 10, "guidance_scale": 3.0, "progress": False}
    got = regenerate_region(toy_stack, clean, prompts, masks, seeds=seeds, batch_size=2, **kw)
    for b in range(3):
        expected = _literal_redraw(toy_stack, clean[b], prompts[b], masks[b], 0.6, 20 + b + 1, 10, 3.0)
        torch.testing.assert_close(got[b], expected, atol=1e-4, rtol=1e-4)
    outside = masks == 0
    assert torch.equal(got[outside.expand_as(got)], clean[outside.expand_as(clean)])  # exactly the real pixels
    assert (got - clean)[~outside.expand_as(got)].abs().mean() > 0.05  # the region was redrawn
    untouched = regenerate_region(toy_stack, clean, prompts, torch.zeros_like(masks), seeds=seeds, **kw)
    assert torch.equal(untouched, clean)
    with pytest.raises(ValueError, match="leaves no step"):
        regenerate_region(toy_stack, clean, prompts, masks, seeds=seeds, **(kw | {"strength": 0.01}))


# ----------------------------------------------------------------------------- config and the loop


def test_config_rules():
    with pytest.raises(ValueError, match="set sail.real.data"):
        load_config(None, ["model.tiny=sd15", "sail.pair_sources=[real]"])
    with pytest.raises(ValueError, match="once each"):
        load_config(REPO / "configs/toy-quick.yaml", ["sail.pair_sources=[real, real]"])
    with pytest.raises(ValueError, match="sail.real.loser"):
        load_config(REPO / "configs/toy-quick.yaml", ["sail.real.loser=sharpen"])
    toy = load_config(REPO / "configs/toy-quick.yaml", ["sail.pair_sources=[real]"])
    assert toy.sail.real.data is None and toy.sail.real_per_round() == toy.sail.prompts_per_round


def _real_digits(folder: Path, count: int) -> tuple[torch.Tensor, list[str]]:
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()][:count]
    return torch.stack([_to_unit(Image.open(folder / r["file_name"])) for r in lines]), [r["text"] for r in lines]


@pytest.mark.slow
def test_realalign_mixed_with_sail_pairs_uses_the_policy_sample_as_loser(tmp_path, toy_stack):
    from sail_fast.commands.train import run_sail

    config = load_config(
        REPO / "configs/toy-quick.yaml",
        [f"output_dir={tmp_path}", "sail.rounds=1", "sail.pair_sources=[self, real]", "sail.real.per_round=6"],
    )
    run_sail(config)
    real, caps = _real_digits(tmp_path / "real-digits", 6)
    pairs = LatentPairs.load(tmp_path / "round-01/pairs.safetensors")
    assert pairs.source == ["sail"] * 8 + ["realalign"] * 6
    mine = pairs.subset(list(range(8, 14)))
    torch.testing.assert_close(mine.win, real)
    assert captions(mine) == caps
    # The loser is the round's policy (iter0) sampling the caption with the round's seed for that position.
    from sail_fast.diffusion.stack import load_unet

    policy = load_unet(tmp_path / "iter0/final/unet", toy_stack.unet)
    import dataclasses

    seeds = torch.tensor([[derive_seed(0, 8401, p)] for p in range(6)])
    expected = generate_candidates(
        dataclasses.replace(toy_stack, unet=policy),
        caps,
        1,
        seeds=seeds,
        sampler="ddim",
        num_inference_steps=5,
        guidance_scale=3.0,
        progress=False,
    ).latents[:, 0]
    torch.testing.assert_close(mine.lose, expected, atol=1e-4, rtol=1e-4)
    done = json.loads((tmp_path / "round-01/done.json").read_text())
    assert done["pairs_by_source"] == {"sail": 8, "realalign": 6}
    assert (tmp_path / "round-01/real_pairs.png").is_file() and (tmp_path / "round-01/candidates.png").is_file()


@pytest.mark.slow
def test_realalign_alone_on_an_sd_stack_with_a_vae_redraws_in_latent_space_and_resumes(tmp_path):
    """Real RGB pictures through a tiny SD1.5-shaped stack with a VAE: two RealAlign-only rounds with
    masked-redraw losers, then round 2 interrupted after its pairs and resumed."""
    import shutil

    from test_loop import make_overrides
    from test_train import TINY

    from sail_fast.sail.loop import SailLoop

    real = tmp_path / "real"
    real.mkdir()
    for i in range(6):
        _image(i, size=20, mode="RGB").save(real / f"{i}.png")
        (real / f"{i}.txt").write_text(f"a real picture {i}")
    overrides = make_overrides(
        tmp_path,
        "model.with_vae=true",
        "data.resolution=16",
        "sail.pair_sources=[real]",
        f"sail.real.data={real}",
        "sail.real.per_round=3",
        "sail.real.loser=masked_renoise",
        "sail.real.mask_fraction=0.5",
        "sail.real.renoise_strength=1.0",
        "train.mixup_alpha=0.5",
    )
    SailLoop(load_config(TINY, overrides)).run()
    run = tmp_path / "run"
    cached = list((run / "cache").glob("real-*.safetensors"))
    assert len(cached) == 1  # encoded once for both rounds
    encoded = LatentPairs.load(cached[0])
    assert encoded.win.shape == (6, 4, 8, 8) and captions(encoded) == [f"a real picture {i}" for i in range(6)]
    for r in (1, 2):
        stage = run / f"round-{r:02d}"
        assert not (stage / "candidates.rank0.safetensors").exists() and not (stage / "ranking.json").exists()
        pairs = LatentPairs.load(stage / "pairs.safetensors")
        assert pairs.source == ["realalign"] * 3
        torch.testing.assert_close(pairs.win, encoded.win[3 * (r - 1) : 3 * r])
        masks = region_masks(8, 8, 0.5, [derive_seed(0, 8500 + r, p) for p in range(3 * (r - 1), 3 * r)])
        keep = (masks == 0).expand_as(pairs.win)
        torch.testing.assert_close(pairs.lose[keep], pairs.win[keep], rtol=0, atol=1e-6)  # the latent outside the box
        assert (pairs.lose - pairs.win)[~keep].abs().mean() > 0.1  # fully re-noised and redrawn inside it
    assert json.loads((run / "round-02/done.json").read_text())["pairs_by_source"] == {"realalign": 3}

    # Interrupted after round 2 drew its losers: the resumed round trains on the same pairs, redrawing nothing.
    losers = run / "round-02/real_losers.rank0.safetensors"
    before, pairs_before = losers.stat().st_mtime_ns, LatentPairs.load(run / "round-02/pairs.safetensors")
    (run / "round-02/done.json").unlink()
    shutil.rmtree(run / "round-02/train")
    SailLoop(load_config(TINY, overrides)).run(resume=True)
    assert losers.stat().st_mtime_ns == before and (run / "round-02/done.json").exists()
    assert torch.equal(LatentPairs.load(run / "round-02/pairs.safetensors").lose, pairs_before.lose)
