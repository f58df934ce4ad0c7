"""OnlineDPO's external ranker and SmPO soft labels: the formulas, and a toy round end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.images import decode_latents
from sail_fast.metrics import load_metric
from sail_fast.runs.config import load_config
from sail_fast.sail.ranking import external_scores, soft_labels

REPO = Path(__file__).resolve().parents[2]


def test_soft_labels_are_a_softmax_over_normalised_scores():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.0, -2.0, 10.0, 1.0]])
    win, lose = torch.tensor([1, 0, 2]), torch.tensor([0, 3, 1])
    got = soft_labels(scores, win, lose, temperature=0.5)
    for p in range(3):
        row = scores[p].tolist()
        mean = sum(row) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 3) or 1.0
        zw, zl = (row[win[p]] - mean) / std, (row[lose[p]] - mean) / std
        want = math.exp(zw / 0.5) / (math.exp(zw / 0.5) + math.exp(zl / 0.5))
        assert got[p].item() == pytest.approx(want, rel=1e-6)
    assert got[1].item() == 0.5  # all candidates equal: no preference
    # the scorer's scale and offset do not matter
    torch.testing.assert_close(soft_labels(scores * 37 - 5, win, lose, 0.5), got)
    assert (soft_labels(scores, lose, win, 0.5) + got - 1).abs().max() < 1e-6  # swapping the pair flips p


def test_minmax_soft_labels_are_smpo_diffusions_published_formula():
    """SmPO-Diffusion (JaydenLyh/SmPO train.py): n = (s - 0.11543526500463486) / (0.28201571106910706 -
    0.11543526500463486) on PickScore's raw cosine, p = exp(n_w) / (exp(n_w) + exp(n_l))."""
    from sail_fast.metrics.clip_metrics import PICKSCORE_COSINE_RANGE

    cos = torch.tensor([[0.21, 0.25, 0.18], [0.20, 0.20, 0.20], [0.30, 0.10, 0.22]])
    win, lose = torch.tensor([1, 0, 0]), torch.tensor([2, 1, 1])
    got = soft_labels(cos, win, lose, norm="minmax", score_range=PICKSCORE_COSINE_RANGE)
    for p in range(3):
        nw, nl = (
            (cos[p, i].item() - 0.11543526500463486) / (0.28201571106910706 - 0.11543526500463486)
            for i in (win[p], lose[p])
        )
        assert got[p].item() == pytest.approx(math.exp(nw) / (math.exp(nw) + math.exp(nl)), rel=1e-6)
    assert got[1].item() == 0.5
    # unlike zscore, the label depends on the scores' absolute gap, not their spread within the prompt
    assert soft_labels(cos * 2, win, lose, norm="minmax", score_range=PICKSCORE_COSINE_RANGE)[0] > got[0]
    with pytest.raises(ValueError, match="soft_label_range"):
        soft_labels(cos, win, lose, norm="minmax")


def test_external_scores_keep_prompt_and_candidate_order():
    from sail_fast.toy.world import load_toy_stack, prompt_pool

    stack = load_toy_stack()
    metric = load_metric("toy_oracle")
    prompts = [prompt_pool()[i][0] for i in (3, 250, 700)]
    latents = torch.randn(3, 5, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    got = external_scores(metric, stack, prompts, latents, batch_size=4)  # batches straddle prompts
    assert got.shape == (3, 5)
    for p in range(3):
        want = metric.score(decode_latents(latents[p]), [prompts[p]] * 5)
        torch.testing.assert_close(got[p], want)


def test_config_rules():
    with pytest.raises(ValueError, match="ranker_metric"):
        load_config(REPO / "configs/toy-quick.yaml", ["sail.ranker=external"])
    with pytest.raises(ValueError, match="not a metric"):
        load_config(REPO / "configs/toy-quick.yaml", ["sail.ranker=external", "sail.ranker_metric=fid"])
    with pytest.raises(ValueError, match="train.loss: smpo"):
        load_config(REPO / "configs/toy-quick.yaml", ["sail.soft_labels=true"])
    smpo = ["sail.soft_labels=true", "train.loss=smpo", "sail.ranker=external"]
    with pytest.raises(ValueError, match="soft_label_range"):  # no published range for the toy oracle
        load_config(
            REPO / "configs/toy-quick.yaml", smpo + ["sail.ranker_metric=toy_oracle", "sail.soft_label_norm=minmax"]
        )
    with pytest.raises(ValueError, match="lo < hi"):
        load_config(
            REPO / "configs/toy-quick.yaml", smpo + ["sail.ranker_metric=toy_oracle", "sail.soft_label_range=[1, 0]"]
        )
    # the published normalisation is the default when PickScore ranks, z-scores otherwise
    assert (
        load_config(REPO / "configs/toy-quick.yaml", smpo + ["sail.ranker_metric=pickscore"]).sail.label_norm()
        == "minmax"
    )
    assert (
        load_config(REPO / "configs/toy-quick.yaml", smpo + ["sail.ranker_metric=toy_oracle"]).sail.label_norm()
        == "zscore"
    )


@pytest.mark.slow
def test_online_dpo_round_with_soft_labels_on_the_toy(tmp_path):
    from sail_fast.commands.train import run_sail

    config = load_config(
        REPO / "configs/toy-quick.yaml",
        [
            f"output_dir={tmp_path}",
            "sail.rounds=1",
            "sail.ranker=external",
            "sail.ranker_metric=toy_oracle",
            "sail.soft_labels=true",
            "sail.soft_label_temperature=0.5",
            "train.loss=smpo",
        ],
    )
    run_sail(config)
    ranking = json.loads((tmp_path / "round-01/ranking.json").read_text())
    assert ranking["ranker"] == "toy_oracle"
    scores = torch.tensor(ranking["rewards"])
    latents = load_file(tmp_path / "round-01/candidates.rank0.safetensors")["latents"]
    # the external scores are the oracle's scores of the decoded candidates
    metric = load_metric("toy_oracle")
    for p, prompt in enumerate(ranking["prompts"]):
        torch.testing.assert_close(scores[p], metric.score(decode_latents(latents[p]), [prompt] * latents.shape[1]))
    pairs = LatentPairs.load(tmp_path / "round-01/pairs.safetensors")
    rows = torch.arange(len(scores))
    best, worst = scores.argmax(1), scores.argmin(1)
    torch.testing.assert_close(pairs.win, latents[rows, best])
    torch.testing.assert_close(pairs.lose, latents[rows, worst])
    torch.testing.assert_close(pairs.label, soft_labels(scores, best, worst, 0.5))
    assert ((pairs.label > 0.5) & (pairs.label < 1)).all()
    assert set(pairs.source) == {"online_dpo"}
    assert (tmp_path / "round-01/train/final/unet").is_dir()


@pytest.mark.slow
def test_online_dpo_and_smpo_on_an_sd_stack_with_pickscore(tmp_path):
    """OnlineDPO ranked by PickScore (tiny weights in its published layout) with SmPO soft labels and
    DDIM-inversion noising, one round on a tiny SD1.5-shaped stack with a VAE."""
    from test_loop import make_overrides
    from test_train import TINY
    from tiny_weights import tiny_clip_dir

    from sail_fast.diffusion.build import build_stack
    from sail_fast.sail.loop import SailLoop

    tiny_clip_dir(tmp_path / "pickscore")
    overrides = make_overrides(
        tmp_path,
        "model.with_vae=true",
        "data.resolution=16",
        "sail.rounds=1",
        "sail.ranker=external",
        "sail.ranker_metric=pickscore",
        f"sail.ranker_weights={tmp_path / 'pickscore'}",
        "sail.soft_labels=true",
        "train.loss=smpo",
        "train.noising=ddim_inversion",
        "train.inversion_steps=2",
    )
    config = load_config(TINY, overrides)
    SailLoop(config).run()
    stage = tmp_path / "run/round-01"
    ranking = json.loads((stage / "ranking.json").read_text())
    assert ranking["ranker"] == "pickscore"
    scores = torch.tensor(ranking["rewards"])
    latents = load_file(stage / "candidates.rank0.safetensors")["latents"]
    metric, vae = load_metric("pickscore", tmp_path / "pickscore"), build_stack(config.model).vae
    for p, prompt in enumerate(ranking["prompts"]):
        torch.testing.assert_close(
            scores[p], metric.score(decode_latents(latents[p], vae), [prompt] * latents.shape[1]), rtol=1e-4, atol=1e-4
        )
    pairs = LatentPairs.load(stage / "pairs.safetensors")
    rows, best, worst = torch.arange(len(scores)), scores.argmax(1), scores.argmin(1)
    torch.testing.assert_close(pairs.win, latents[rows, best])
    torch.testing.assert_close(pairs.lose, latents[rows, worst])
    # PickScore ranks, so the labels are SmPO's published min-max map of the raw cosine
    assert ranking["label_norm"] == "minmax"
    cosine = scores / metric.clip.model.logit_scale.exp()
    n = (cosine - 0.11543526500463486) / (0.28201571106910706 - 0.11543526500463486)
    want = n[rows, best].exp() / (n[rows, best].exp() + n[rows, worst].exp())
    torch.testing.assert_close(pairs.label, want, rtol=1e-5, atol=1e-6)
    assert set(pairs.source) == {"online_dpo"}
    assert (stage / "train/final/unet").is_dir()


def test_sail_fast_label_writes_smpo_offline_soft_labels(tmp_path):
    """`sail-fast label` orders each pair by PickScore and labels it with SmPO's published formula; the
    pairs.jsonl it writes is what data.seed_pairs reads for train.loss: smpo."""
    from tiny_weights import random_images, tiny_clip_dir

    from sail_fast.commands.cli import main
    from sail_fast.data.records import PairRecord, read_pairs_jsonl, write_pairs_jsonl

    tiny_clip_dir(tmp_path / "pickscore")
    images = random_images(6, size=32)
    records = [PairRecord(f"a photo of thing {i}", images[2 * i], images[2 * i + 1]) for i in range(3)]
    write_pairs_jsonl(tmp_path / "human/pairs.jsonl", records)
    main(
        [
            "label",
            str(tmp_path / "human/pairs.jsonl"),
            "--weights",
            str(tmp_path / "pickscore"),
            "--out",
            str(tmp_path / "smpo/pairs.jsonl"),
            "--device",
            "cpu",
        ]
    )
    got, stats = read_pairs_jsonl(tmp_path / "smpo/pairs.jsonl")
    assert stats.kept == 3
    metric = load_metric("pickscore", tmp_path / "pickscore", device="cpu")
    scale = float(metric.clip.model.logit_scale.detach().exp())
    cos = [metric.score([r.win], [r.prompt]).item() / scale for r in records]
    cos_l = [metric.score([r.lose], [r.prompt]).item() / scale for r in records]
    for i, rec in enumerate(got):
        hi, lo = max(cos[i], cos_l[i]), min(cos[i], cos_l[i])
        n_w, n_l = ((c - 0.11543526500463486) / (0.28201571106910706 - 0.11543526500463486) for c in (hi, lo))
        assert rec.label == pytest.approx(math.exp(n_w) / (math.exp(n_w) + math.exp(n_l)), rel=1e-5)
        assert rec.label >= 0.5 and rec.source == "pickscore"
        # the winner is the image PickScore prefers, whichever the human picked
        assert metric.score([Image.open(rec.win)], [rec.prompt]) >= metric.score([Image.open(rec.lose)], [rec.prompt])
