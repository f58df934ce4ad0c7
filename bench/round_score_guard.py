"""How far the round score's prompt consistency moves per point of digit accuracy, measured on an intervention
that has nothing to do with any preference: the shipped toy base sampled at lower guidance scales (fewer
correct digits). Sets ``selection.CONSISTENCY_TOLERANCE`` and, from the prompt choice accuracy on the same
samples, ``selection.CHOICE_TOLERANCE`` (bench/results/round_choice_plan.md, addenda 1 and 9); never reads a human.

    python bench/round_score_guard.py   # -> bench/results/round_score_guard.json
"""

import json
from pathlib import Path

import numpy as np

from sail_fast.runs.config import load_config
from sail_fast.sail.round_score import prompt_consistency
from sail_fast.toy.human import ToyOracle
from sail_fast.toy.labels import oracle_samples
from sail_fast.toy.world import load_toy_stack, sample_digits, split_prompts

GUIDANCE = (7.5, 4.0, 2.0)
SEEDS = (0,)

cfg = load_config("configs/toy.yaml").sail
stack, oracle = load_toy_stack(), ToyOracle.load()
rows = []
for seed in SEEDS:
    prompts = split_prompts(seed, num_eval=100)[0][: cfg.eval_prompts]
    for g in GUIDANCE:
        sampling = {"sampler": cfg.sampler, "num_inference_steps": cfg.sampling_steps, "guidance_scale": g}
        x = sample_digits(
            stack, prompts, cfg.eval_images_per_prompt, seed=100 + seed, sampling=sampling, progress=False
        )
        score = prompt_consistency(stack, stack.unet, x, prompts, seed=seed, batch=cfg.scoring_batch)
        score = {k: v for k, v in score.items() if not k.endswith("_by_prompt")}  # the means only
        row = {
            "seed": seed,
            "guidance_scale": g,
            "digit_accuracy": float(oracle_samples(oracle, x, prompts)["correct"].mean()),
        }
        rows.append(row | score)
        print(rows[-1], flush=True)
# Per seed, the change from guidance 7.5 (the configs') against the change in accuracy, in points.
slopes, choice_slopes = [], []
for seed in SEEDS:
    mine = [r for r in rows if r["seed"] == seed]
    acc = np.array([100 * (r["digit_accuracy"] - mine[0]["digit_accuracy"]) for r in mine])
    rel = np.array([r["prompt_consistency"] / mine[0]["prompt_consistency"] - 1 for r in mine])
    choice = np.array([r["prompt_choice_accuracy"] - mine[0]["prompt_choice_accuracy"] for r in mine])
    slopes.append(float((acc * rel).sum() / (acc * acc).sum()))  # least squares through the origin
    choice_slopes.append(float((acc * choice).sum() / (acc * acc).sum()))
result = {
    "command": "python bench/round_score_guard.py",
    "rows": rows,
    "relative_consistency_change_per_accuracy_point": slopes,
    "mean_slope": float(np.mean(slopes)),
    # select: tested's prompt guard: the absolute change in prompt choice accuracy per point of digit accuracy
    "choice_accuracy_change_per_accuracy_point": choice_slopes,
    "mean_choice_slope": float(np.mean(choice_slopes)),
}
Path("bench/results/round_score_guard.json").write_text(json.dumps(result, indent=2) + "\n")
shown = ("relative_consistency_change_per_accuracy_point", "mean_slope", "mean_choice_slope")
print(json.dumps({k: result[k] for k in shown}))
