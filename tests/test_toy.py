import math
from pathlib import Path

import pytest
import torch

from sail_fast.data import read_pairs_jsonl
from sail_fast.toy import (
    INK_WEIGHT,
    LOG_PROB_FLOOR,
    OFFSET_WEIGHT,
    DigitClassifier,
    ToyOracle,
    digit_of,
    load_digits,
    load_toy_stack,
    make_human_pairs,
    oracle_metrics,
    prompt_pool,
    sample_digits,
    split_prompts,
)

REPO_TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
SAMPLING = {"sampler": "ddim", "num_inference_steps": 10, "guidance_scale": 3.0}


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
    image[0, 0, 2:6, 10:14] = 1.0  # a 4x4 block, centre (row 4, col 12) of the 16x16 square
    parts = uniform_oracle().components(image, torch.tensor([3]))
    ink = 16 / 256
    offset = math.hypot(4 / 16 - 0.5, 12 / 16 - 0.5)
    assert parts["ink"].item() == pytest.approx(ink)
    assert parts["offset"].item() == pytest.approx(offset, rel=1e-5)
    assert parts["log_prob"].item() == pytest.approx(math.log(0.1), rel=1e-5)
    expected = math.log(0.1) + INK_WEIGHT * ink - OFFSET_WEIGHT * offset
    assert parts["score"].item() == pytest.approx(expected, rel=1e-5)


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
    prompts = [f"a handwritten {d}" for d in range(10)] + [f"the digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    images = sample_digits(stack, prompts, 2, seed=0, sampling=SAMPLING, progress=False)
    metrics = oracle_metrics(ToyOracle.load(), images, prompts)
    assert metrics["digit_accuracy"] > 0.6  # chance is 0.1


def test_human_pairs_go_through_the_pairs_jsonl_path(tmp_path):
    stack = load_toy_stack()
    oracle = ToyOracle.load(temperature=1e-6)  # a noiseless rater
    summary = make_human_pairs(stack, oracle, tmp_path, labelled=20, seed_fraction=0.1, heldout=4, seed=0,
                               sampling=SAMPLING | {"num_inference_steps": 4}, progress=False)
    records, _ = read_pairs_jsonl(tmp_path / "all.jsonl")
    seed, _ = read_pairs_jsonl(tmp_path / "seed.jsonl")
    heldout, _ = read_pairs_jsonl(tmp_path / "heldout.jsonl")
    assert (len(records), len(seed), len(heldout)) == (20, 2, 4)
    assert [r.prompt for r in seed] == [r.prompt for r in records[:2]]
    assert summary["labels_agreeing_with_noiseless_oracle"] == 1.0
    assert all(r.source == "human" and r.label == 1.0 for r in records)


def test_dpo_moves_generation_toward_the_winners(tmp_path):
    """Real digits, bold (more ink) preferred over thin ones of the same class: after DPO the
    model draws bolder digits. Checks the sign of the whole train -> sample path."""
    import copy
    import dataclasses

    from sail_fast.config import load_config
    from sail_fast.data import LatentPairs
    from sail_fast.trainer import DPOTrainer

    stack = load_toy_stack()
    images, labels = load_digits()
    ink = ((images + 1) / 2).mean(dim=(1, 2, 3))
    win, lose, digit = [], [], []
    for d in range(10):
        order = (labels == d).nonzero().squeeze(1)
        order = order[ink[order].argsort()]
        half = len(order) // 2
        lose.append(images[order[:half]])
        win.append(images[order[-half:]])
        digit += [d] * half
    prompts = [f"a handwritten {d}" for d in range(10)] + [""]
    pairs = LatentPairs(torch.cat(win), torch.cat(lose), torch.tensor(digit), prompts,
                        stack.encode_prompts(prompts).prompt_embeds, None, None, None, torch.ones(len(digit)),
                        ["human"] * len(digit))
    eval_prompts = split_prompts(0)[0][:20]

    def mean_ink(unet):
        drawn = sample_digits(dataclasses.replace(stack, unet=unet.eval()), eval_prompts, 4, seed=5, sampling=SAMPLING,
                              progress=False)
        return oracle_metrics(ToyOracle.load(), drawn, eval_prompts)["ink"]

    config = load_config(REPO_TOY, ["train.steps=30", "train.progress=false", "train.checkpoint_every=1000",
                                    f"output_dir={tmp_path}"])
    trainer = DPOTrainer(config, copy.deepcopy(stack.unet).requires_grad_(True), stack.scheduler, pairs)
    assert mean_ink(trainer.train()) > mean_ink(stack.unet) + 0.03
