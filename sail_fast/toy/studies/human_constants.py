"""The toy human's constants, recomputed: ``python -m sail_fast.toy.studies.human_constants`` prints the
real-digit statistics the built-in preference is centred on, and with ``--temperature`` the Bradley-Terry
temperature at which base-model pairs are labelled as noisily as Pick-a-Pic's raters (72.5% agreement)."""

from __future__ import annotations

import argparse
import json

import torch

from ...runs.config import load_config
from ..human import ToyOracle, rater_temperature, real_digit_constants
from ..world import digit_of, load_toy_stack, sample_digits, split_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description="recompute the toy human's constants")
    parser.add_argument("--temperature", action="store_true", help="also set T from base-model pairs (slow)")
    parser.add_argument("--pairs", type=int, default=1700)
    parser.add_argument("--config", default="configs/toy.yaml", help="the run config whose sampler draws the pairs")
    args = parser.parse_args()
    print(json.dumps(real_digit_constants(), indent=2))
    if args.temperature:
        sampling = load_config(args.config).sail.sampling()
        _, rest = split_prompts(0)
        prompts = [rest[i % len(rest)] for i in range(args.pairs)]
        images = sample_digits(load_toy_stack(), prompts, 2, seed=12345, sampling=sampling)
        digits = torch.tensor([digit_of(p) for p in prompts])
        oracle = ToyOracle.load()
        a, b = oracle.score(images[:, 0], digits), oracle.score(images[:, 1], digits)
        t = rater_temperature(a, b)
        print(json.dumps({"temperature": t, "median_gap": float((a - b).abs().median()), "pairs": args.pairs}))


if __name__ == "__main__":
    main()
