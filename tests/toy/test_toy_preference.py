"""Any preference can be the toy human (toy.preference), and the width proxy is a one-aspect scorer."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sail_fast.data.records import read_pairs_jsonl
from sail_fast.diffusion.images import decode_latents
from sail_fast.metrics import load_metric
from sail_fast.runs.config import load_config
from sail_fast.toy.human import ToyOracle, load_preference
from sail_fast.toy.metrics import pictures_to_pixels
from sail_fast.toy.world import load_digits

REPO = Path(__file__).resolve().parents[2]
# A human who likes little ink: the opposite of the built-in one's bold strokes.
PREFERENCE = """
def faint(images, digits):
    assert images.dim() == 3 and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    return -images.mean(dim=(1, 2)) + 0.0 * digits
"""


def faintness(pixels: torch.Tensor) -> torch.Tensor:
    return -((pixels[:, 0] + 1) / 2).mean(dim=(1, 2))


@pytest.mark.slow
def test_a_preference_written_here_labels_evaluates_and_ranks(tmp_path):
    from sail_fast.commands.train import run_sail

    (tmp_path / "taste.py").write_text(PREFERENCE)
    run = tmp_path / "run"
    config = load_config(
        REPO / "configs/toy-quick.yaml",
        [
            f"output_dir={run}",
            "sail.rounds=1",
            "toy.temperature=1e-6",
            f"toy.preference={tmp_path / 'taste.py'}:faint",
            "sail.ranker=external",
            "sail.ranker_metric=toy_oracle",
            "train.progress=false",
        ],
    )
    run_sail(config)

    # Labelling: a noiseless rater with this taste picks the fainter picture of every pair.
    records, _ = read_pairs_jsonl(run / "human/all.jsonl")

    def picture(x):
        return x if isinstance(x, Image.Image) else Image.open(x if Path(x).is_absolute() else run / "human" / x)

    win = pictures_to_pixels([picture(r.win) for r in records])
    lose = pictures_to_pixels([picture(r.lose) for r in records])
    assert (faintness(win) >= faintness(lose) - 1e-6).all()

    # Evaluation: the stage's score is this preference's mean over the stage's samples.
    samples = load_file(run / "base/eval_samples.safetensors")
    want = faintness(samples["latents"].flatten(0, 1).clamp(-1, 1))
    torch.testing.assert_close(samples["score"].flatten(), want)
    assert json.loads((run / "base/eval.json").read_text())["oracle_score"] == pytest.approx(
        float(want.mean()), abs=1e-5
    )

    # The oracle ranker: the round's candidates are ranked by this preference of their pictures.
    ranking = json.loads((run / "round-01/ranking.json").read_text())
    latents = load_file(run / "round-01/candidates.rank0.safetensors")["latents"]
    for p in range(len(ranking["prompts"])):
        want = faintness(pictures_to_pixels(decode_latents(latents[p])))
        torch.testing.assert_close(torch.tensor(ranking["rewards"][p]), want, atol=1e-5, rtol=0)


def test_a_bad_preference_spec_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        load_preference("taste.py")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference(str(tmp_path / "missing.py") + ":f")
    (tmp_path / "taste.py").write_text(PREFERENCE)
    with pytest.raises(ValueError, match="no function 'bold'"):
        load_preference(str(tmp_path / "taste.py") + ":bold")
    oracle = ToyOracle.load(preference=lambda images, digits: torch.zeros(3))
    with pytest.raises(ValueError, match="2 finite scores"):
        oracle.score(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2]))


def test_width_proxy_always_prefers_bolder_where_the_human_stops():
    """The proxy sees one aspect: a blob beats a well-drawn digit under it, and loses under the human."""
    images, labels = load_digits()
    seven = images[labels == 7][:1]
    blob = torch.nn.functional.max_pool2d(seven, 5, stride=1, padding=2)
    pictures = decode_latents(torch.cat([seven, blob]))
    proxy = load_metric("toy_width").score(pictures, ["a handwritten 7"] * 2)
    human = load_metric("toy_oracle").score(pictures, ["a handwritten 7"] * 2)
    assert proxy[1] > proxy[0] and human[0] > human[1]


@pytest.mark.slow
def test_reference_previous_ranks_against_the_weights_the_round_started_from(tmp_path):
    """sail.ranking_reference: previous. Round 2 ranks round 1's policy against iter0's: once, the previous
    policy was the object round 1 had trained in place, so every reward was exactly 0."""
    from sail_fast.commands.train import run_sail

    run_sail(
        load_config(
            REPO / "configs/toy-quick.yaml",
            [
                f"output_dir={tmp_path}",
                "sail.ranking_reference=previous",
                "sail.eval_each_round=false",
                "train.progress=false",
            ],
        )
    )
    ranking = json.loads((tmp_path / "round-02/ranking.json").read_text())
    rewards = torch.tensor(ranking["rewards"])
    assert ranking["reference"] == "previous" and ranking["reward_spread_mean"] > 0
    assert (rewards.max(1).values > rewards.min(1).values).all()
