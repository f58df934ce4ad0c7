"""Per-digit accuracy of the shipped base at the toy config's sampler and at DDPM 50 -> pretrain.json."""

import json

from sail_fast.diffusion.stack import TOY_MODEL_DIR
from sail_fast.runs.config import load_config
from sail_fast.sail.evaluation import sample_diversity
from sail_fast.toy.human import ToyOracle
from sail_fast.toy.labels import oracle_samples
from sail_fast.toy.world import (
    DIGIT_WORDS,
    PLAIN_TEMPLATES,
    load_toy_stack,
    sample_digits,
)

cfg = load_config("configs/toy.yaml").sail
prompts = [t.format(d=form) for d in range(10) for form in (str(d), DIGIT_WORDS[d]) for t in PLAIN_TEMPLATES]
stack, oracle = load_toy_stack(), ToyOracle.load()
report = json.loads((TOY_MODEL_DIR / "pretrain.json").read_text())
out = {}
for name, sampler, steps in (("config", cfg.sampler, cfg.sampling_steps), ("ddpm_50", "ddpm", 50)):
    x = sample_digits(
        stack,
        prompts,
        10,
        seed=11,
        sampling={"sampler": sampler, "num_inference_steps": steps, "guidance_scale": cfg.guidance_scale},
        progress=False,
    )
    s = oracle_samples(oracle, x, prompts)
    out[name] = {
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": cfg.guidance_scale,
        "samples_per_digit": 60,
        "per_digit": [round(v, 4) for v in s["correct"].view(10, -1).mean(1).tolist()],
        "overall": round(float(s["correct"].mean()), 4),
        "diversity": round(sample_diversity(x), 4),
        "width_std_within_prompt": round(float(s["width"].std(1).mean()), 4),
    }
    print(name, out[name], flush=True)
report["digit_accuracy"] = out | {"command": "python bench/toy_base_accuracy.py (the 60 plain prompts, 10 seeds each)"}
(TOY_MODEL_DIR / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
