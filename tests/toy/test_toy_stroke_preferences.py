"""The shipped stroke preferences (configs/preferences/strokes.py) and toy.temperature: auto."""

from pathlib import Path

import pytest
import torch

from sail_fast.runs.callables import load_callable
from sail_fast.runs.config import ConfigError, load_config
from sail_fast.toy.human import WIDTH_TARGET, ToyOracle, stroke_preference, stroke_width
from sail_fast.toy.labels import make_human_pairs
from sail_fast.toy.world import load_digits, load_toy_stack

ROOT = Path(__file__).resolve().parents[2]
STROKES = ROOT / "configs" / "preferences" / "strokes.py"


def sevens_by_width():
    """Real 7s at the built-in human's preferred width, and two clearly thinner and bolder ones."""
    images, labels = load_digits()
    sevens = images[labels == 7]
    width = stroke_width((sevens[:, 0] + 1) / 2)
    order = width.argsort()
    at_target = (width - WIDTH_TARGET[7]).abs().argmin()
    return sevens[torch.stack([order[len(order) // 10], at_target, order[-len(order) // 20]])]


def test_a_zero_shift_scores_exactly_as_the_built_in_human():
    images, labels = load_digits()
    x, d = images[::50], labels[::50]
    builtin = ToyOracle.load().score(x, d)
    assert torch.equal(stroke_preference(0.0)((x[:, 0] + 1) / 2, d), builtin)


def test_bold_prefers_the_bolder_seven_and_thin_the_thinner_one():
    bold = load_callable(f"{STROKES}:bold", "toy.preference")
    thin = load_callable(f"{STROKES}:thin", "toy.preference")
    thinner, typical, bolder = (sevens_by_width()[:, 0] + 1) / 2
    digits = torch.tensor([7, 7, 7])
    x = torch.stack([thinner, typical, bolder])
    builtin = stroke_preference(0.0)(x, digits)
    # Only the width term differs, so legibility, haze and centring cancel in the differences.
    assert (bold(x, digits) - builtin).diff().gt(0).all()
    assert (thin(x, digits) - builtin).diff().lt(0).all()


def test_auto_temperature_makes_labels_agree_as_the_built_in_ones_do(tmp_path):
    """Set from the labelled base pairs themselves: the expected agreement with the noiseless order is
    72.5%, the calibration the built-in human's temperature was set by."""
    oracle = ToyOracle.load(preference=f"{STROKES}:bold")
    sampling = {"sampler": "ddim", "num_inference_steps": 4, "guidance_scale": 5.0}
    summary = make_human_pairs(
        load_toy_stack(),
        oracle,
        tmp_path,
        labelled=60,
        seed_fraction=0.1,
        heldout=4,
        seed=0,
        sampling=sampling,
        progress=False,
        auto_temperature=True,
    )
    assert summary["temperature"] == oracle.temperature != ToyOracle.load().temperature
    assert 0.5 < summary["labels_agreeing_with_noiseless_oracle"] < 0.95


def test_temperature_accepts_auto_and_refuses_words_and_non_positive_numbers():
    assert load_config(ROOT / "configs" / "toy.yaml", ["toy.temperature=auto"]).toy.temperature == "auto"
    assert load_config(ROOT / "configs" / "toy.yaml", ["toy.temperature=0.5"]).toy.temperature == 0.5
    for bad in ("hot", "0", "-1"):
        with pytest.raises(ConfigError, match="toy.temperature"):
            load_config(ROOT / "configs" / "toy.yaml", [f"toy.temperature={bad}"])
