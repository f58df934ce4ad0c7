import math
from pathlib import Path

import pytest
import torch

from sail_fast.data.records import read_pairs_jsonl
from sail_fast.toy.human import (
    HAZE_SCALE,
    LOG_PROB_FLOOR,
    OFFSET_WEIGHT,
    WIDTH_SCALE,
    WIDTH_TARGET,
    DigitClassifier,
    ToyOracle,
    rater_temperature,
    real_digit_constants,
)
from sail_fast.toy.labels import make_human_pairs, oracle_metrics
from sail_fast.toy.world import (
    digit_of,
    load_digits,
    load_toy_stack,
    prompt_pool,
    sample_digits,
    split_prompts,
)

REPO_TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"
SAMPLING = {"sampler": "ddim", "num_inference_steps": 10, "guidance_scale": 5.0}


def uniform_oracle(temperature=0.5):
    clf = DigitClassifier()
    torch.nn.init.zeros_(clf.net[-1].weight)
    torch.nn.init.zeros_(clf.net[-1].bias)
    return ToyOracle(clf, temperature)


def test_prompts_name_their_digit():
    pool = prompt_pool()
    assert len(pool) == len({p for p, _ in pool}) == 1020
    assert all(digit_of(p) == d for p, d in pool)
    assert digit_of("a bold handwritten seven") == 7 and digit_of("the number 0, neat") == 0
    with pytest.raises(ValueError, match="exactly one digit"):
        digit_of("a handwritten 7 and 8")
    with pytest.raises(ValueError, match="exactly one digit"):
        digit_of("a cat")


def test_eval_prompts_are_balanced_fixed_and_disjoint_from_the_rest():
    eval_prompts, rest = split_prompts(3)
    assert len(eval_prompts) == 100 and len(rest) == 920
    assert sorted(digit_of(p) for p in eval_prompts) == sorted(list(range(10)) * 10)
    assert not set(eval_prompts) & set(rest)
    assert split_prompts(3) == (eval_prompts, rest) and split_prompts(4)[0] != eval_prompts


def test_oracle_score_is_the_documented_formula():
    image = -torch.ones(1, 1, 16, 16)
    image[0, 0, 2:6, 10:14] = 1.0  # a 4x4 stroke block, centre (row 4, col 12) of the 16x16 square
    image[0, 0, 12, 2] = 2 * 0.3 - 1  # intensity 0.3 far from the stroke: haze
    image[0, 0, 6, 11] = 2 * 0.3 - 1  # intensity 0.3 touching the stroke: an antialiased edge, not haze
    parts = uniform_oracle().components(image, torch.tensor([3]))
    width, hz = 16 / 256, 1 / 256
    mass = 16 + 0.3 + 0.3
    cy = (16 * (4 / 16 - 0.5) + 0.3 * (12.5 / 16 - 0.5) + 0.3 * (6.5 / 16 - 0.5)) / mass
    cx = (16 * (12 / 16 - 0.5) + 0.3 * (2.5 / 16 - 0.5) + 0.3 * (11.5 / 16 - 0.5)) / mass
    offset = math.hypot(cx, cy)
    assert parts["width"].item() == pytest.approx(width)
    assert parts["haze"].item() == pytest.approx(hz)
    assert parts["offset"].item() == pytest.approx(offset, rel=1e-5)
    assert parts["log_prob"].item() == pytest.approx(math.log(0.1), rel=1e-5)
    width_term = -(((width - WIDTH_TARGET[3]) / WIDTH_SCALE[3]) ** 2)
    expected = math.log(0.1) + width_term - hz / HAZE_SCALE - OFFSET_WEIGHT * offset
    assert parts["score"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_every_term_has_its_optimum_inside_the_real_digits():
    """Bolder pays only up to w*: a blob loses to a digit at the preferred width, and so does a
    thin one; the constants are what the real digits give today."""
    oracle = uniform_oracle()
    images, labels = load_digits()
    sevens = images[labels == 7]
    intensity = (sevens[:, 0] + 1) / 2
    width = (intensity > 0.5).float().mean(dim=(1, 2))
    at_target = sevens[(width - WIDTH_TARGET[7]).abs().argmin()].unsqueeze(0)
    thinnest = sevens[width.argmin()].unsqueeze(0)
    blob = torch.nn.functional.max_pool2d(at_target, 5, stride=1, padding=2)  # strokes dilated into a blob
    scores = oracle.score(torch.cat([at_target, thinnest, blob]), torch.tensor([7, 7, 7]))
    assert scores[0] > scores[1] and scores[0] > scores[2]
    fresh = real_digit_constants()
    assert fresh["width_target"] == pytest.approx(list(WIDTH_TARGET), abs=1e-4)
    assert fresh["width_scale"] == pytest.approx(list(WIDTH_SCALE), abs=1e-4)
    assert fresh["haze_scale"] == pytest.approx(HAZE_SCALE)


def test_rater_temperature_hits_the_asked_agreement():
    gaps = torch.linspace(0.01, 3.0, 5000)
    t = rater_temperature(gaps, torch.zeros_like(gaps), agreement=0.72)
    assert float(torch.sigmoid(gaps / t).mean()) == pytest.approx(0.72, abs=1e-6)
    oracle = uniform_oracle(temperature=t)
    labels = oracle.prefer_first(gaps, torch.zeros_like(gaps), torch.Generator().manual_seed(0))
    assert float(labels.float().mean()) == pytest.approx(0.72, abs=0.02)


def test_oracle_floors_a_confidently_wrong_digit():
    oracle = uniform_oracle()
    oracle.classifier.net[-1].bias.data[5] = 100.0  # certain it is a 5
    parts = oracle.components(-torch.ones(2, 1, 16, 16), torch.tensor([5, 2]))
    assert parts["log_prob"].tolist() == pytest.approx([0.0, LOG_PROB_FLOOR])
    assert parts["predicted"].tolist() == [5, 5]


def test_raters_follow_bradley_terry():
    oracle = uniform_oracle(temperature=0.5)
    a, b = torch.full((20000,), 0.4), torch.zeros(20000)
    first = oracle.prefer_first(a, b, torch.Generator().manual_seed(0)).float().mean().item()
    assert first == pytest.approx(1 / (1 + math.exp(-0.4 / 0.5)), abs=0.01)


def test_digits_load_offline_in_range():
    images, labels = load_digits()
    assert images.shape == (5000, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.bincount(labels).tolist() == [500] * 10


def test_shipped_oracle_recognises_real_digits():
    images, labels = load_digits()
    oracle = ToyOracle.load()
    with torch.no_grad():
        accuracy = (oracle.classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95


def test_shipped_base_model_draws_the_prompted_digit():
    stack = load_toy_stack()
    prompts = [f"a handwritten {d}" for d in range(10)] + [
        f"the digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    ]
    images = sample_digits(stack, prompts, 2, seed=0, sampling=SAMPLING, progress=False)
    metrics = oracle_metrics(ToyOracle.load(), images, prompts)
    assert metrics["digit_accuracy"] > 0.6  # chance is 0.1


def test_human_pairs_go_through_the_pairs_jsonl_path(tmp_path):
    stack = load_toy_stack()
    oracle = ToyOracle.load(temperature=1e-6)  # a noiseless rater
    summary = make_human_pairs(
        stack,
        oracle,
        tmp_path,
        labelled=20,
        seed_fraction=0.1,
        heldout=4,
        seed=0,
        sampling=SAMPLING | {"num_inference_steps": 4},
        progress=False,
    )
    records, _ = read_pairs_jsonl(tmp_path / "all.jsonl")
    seed, _ = read_pairs_jsonl(tmp_path / "seed.jsonl")
    heldout, _ = read_pairs_jsonl(tmp_path / "heldout.jsonl")
    assert (len(records), len(seed), len(heldout)) == (20, 2, 4)
    assert [r.prompt for r in seed] == [r.prompt for r in records[:2]]
    assert summary["labels_agreeing_with_noiseless_oracle"] == 1.0
    assert all(r.source == "human" and r.label == 1.0 for r in records)


@pytest.mark.slow
def test_dpo_moves_generation_toward_the_winners(tmp_path):
    """Real digits, bold (wider strokes) preferred over thin ones of the same class: after DPO the
    model draws bolder digits. Checks the sign of the whole train -> sample path."""
    import copy
    import dataclasses

    from digit_pairs import bold_over_thin

    from sail_fast.dpo.builder import trainer_for
    from sail_fast.runs.config import load_config

    stack = load_toy_stack()
    pairs = bold_over_thin(stack)
    eval_prompts = split_prompts(0)[0][:20]

    def mean_width(unet):
        drawn = sample_digits(
            dataclasses.replace(stack, unet=unet.eval()), eval_prompts, 4, seed=5, sampling=SAMPLING, progress=False
        )
        return oracle_metrics(ToyOracle.load(), drawn, eval_prompts)["width"]

    config = load_config(
        REPO_TOY, ["train.steps=30", "train.progress=false", "train.checkpoint_every=1000", f"output_dir={tmp_path}"]
    )
    trainer = trainer_for(config, copy.deepcopy(stack.unet).requires_grad_(True), stack.scheduler, pairs)
    assert mean_width(trainer.train()) > mean_width(stack.unet) + 0.02
