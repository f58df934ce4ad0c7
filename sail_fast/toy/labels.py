"""The toy human at work: labelled pairs of base samples (the run's human seed, written through the
same pairs.jsonl path as real data), and per-sample judgments of a stage's evaluation samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..diffusion.stack import DiffusionStack
from ..runs.layout import HumanPairsLayout
from ..runs.seeding import TOY_LABEL_CHOICES, TOY_LABEL_SAMPLES, derive_seed
from .human import ToyOracle, rater_temperature
from .world import digit_of, sample_digits, split_prompts


def make_human_pairs(
    stack: DiffusionStack,
    oracle: ToyOracle,
    out_dir: str | Path,
    *,
    labelled: int,
    seed_fraction: float,
    heldout: int,
    seed: int,
    sampling: dict,
    progress: bool = True,
    auto_temperature: bool = False,
) -> dict:
    """The toy's human-labelled pairs, written through the same pairs.jsonl path as real data.

    Two base-model samples per prompt (the way Pick-a-Pic pairs are two generations), judged by
    ``oracle`` with Bradley-Terry noise. Writes ``all.jsonl`` (``labelled`` pairs), ``seed.jsonl``
    (its first ``seed_fraction``: SAIL's seed) and ``heldout.jsonl`` (``heldout`` more pairs on other
    prompts, for self-label agreement), the PNGs under ``images/``, and ``summary.json``.
    ``auto_temperature``: first set the oracle's rater temperature from these base-model pairs
    (``rater_temperature``), as the built-in human's was set, so any preference's labels are as noisy.
    """
    from ..data.records import PairRecord, write_pairs_jsonl
    from ..diffusion.images import decode_latents

    out = Path(out_dir)
    _, rest = split_prompts(seed)
    total = labelled + heldout
    prompts = [rest[i % len(rest)] for i in range(total)]
    images = sample_digits(
        stack, prompts, 2, seed=derive_seed(seed, TOY_LABEL_SAMPLES), sampling=sampling, progress=progress
    )
    digits = torch.tensor([digit_of(p) for p in prompts])
    score_a = oracle.score(images[:, 0], digits)
    score_b = oracle.score(images[:, 1], digits)
    if auto_temperature:
        oracle.temperature = rater_temperature(score_a, score_b)
    first = oracle.prefer_first(score_a, score_b, torch.Generator().manual_seed(derive_seed(seed, TOY_LABEL_CHOICES)))
    pil = decode_latents(images.flatten(0, 1))
    records = []
    for i, prompt in enumerate(prompts):
        a, b = pil[2 * i], pil[2 * i + 1]
        win, lose = (a, b) if first[i] else (b, a)
        records.append(PairRecord(prompt, win, lose, source="human"))
    files = HumanPairsLayout(out)
    write_pairs_jsonl(files.all, records[:labelled])
    write_pairs_jsonl(files.heldout, records[labelled:])
    num_seed = max(1, round(labelled * seed_fraction))
    lines = files.all.read_text(encoding="utf-8").splitlines(keepends=True)
    files.seed.write_text("".join(lines[:num_seed]), encoding="utf-8")
    noiseless = score_a > score_b
    summary = {
        "labelled": labelled,
        "seed": num_seed,
        "heldout": heldout,
        "temperature": oracle.temperature,
        "labels_agreeing_with_noiseless_oracle": float((first == noiseless).float().mean()),
        "mean_oracle_score": float(torch.cat([score_a, score_b]).mean()),
    }
    files.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


TERMS = ("score", "log_prob", "width", "width_term", "haze", "offset", "correct")


def oracle_samples(oracle: ToyOracle, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per-sample terms of samples [P, n, 1, H, W]: each of ``TERMS`` as a [P, n] table (``correct``:
    1 where the classifier reads the prompted digit)."""
    num_prompts, per_prompt = images.shape[:2]
    digits = torch.tensor([digit_of(p) for p in prompts]).repeat_interleave(per_prompt)
    parts = oracle.components(images.flatten(0, 1), digits)
    parts["correct"] = (parts.pop("predicted") == digits).float()
    return {k: parts[k].float().view(num_prompts, per_prompt) for k in TERMS}


def oracle_summary(samples: dict[str, torch.Tensor], prompts: list[str]) -> dict:
    """Means of every term, the score's prompt-clustered standard error, and digit accuracy overall and
    per digit, from ``oracle_samples`` tables."""
    from ..metrics.statistics import clustered_mean

    score, score_se = (
        clustered_mean(samples["score"]) if len(prompts) > 1 else (float(samples["score"].mean()), float("nan"))
    )
    digits = torch.tensor([digit_of(p) for p in prompts])
    per_digit = {str(d): float(samples["correct"][digits == d].mean()) for d in range(10) if (digits == d).any()}
    out = {
        "oracle_score": score,
        "oracle_score_se": score_se,
        "digit_accuracy": float(samples["correct"].mean()),
        "digit_accuracy_per_digit": per_digit,
    }
    return out | {k: float(samples[k].mean()) for k in ("log_prob", "width", "width_term", "haze", "offset")}


def oracle_metrics(oracle: ToyOracle, images: torch.Tensor, prompts: list[str]) -> dict:
    """``oracle_summary`` of samples [P, n, 1, H, W]."""
    return oracle_summary(oracle_samples(oracle, images, prompts), prompts)
