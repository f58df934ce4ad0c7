"""``sail.soup``: besides the stage ``sail.select`` keeps, the uniform weight average of iter0 and every round up
to that stage (the stages the rule passed), as a stage of its own, ``soup-00-0k``: no training, one evaluation,
named by ``chosen.json`` so that ``export``, ``generate`` and ``eval`` take it.

Why: the rounds' judged score swings from round to round while nothing the run records moves with it, so no rule
reading the round score can tell a good round from a bad one. Every round starts from the last and is held to
the same base, so the stages are close fine-tunes of one model, and averaging their weights cancels part of each
one's noise. The lever's plan and its test are bench/results/round_choice_plan.md, addendum 12; it is off by
default until that test has been read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..diffusion.lora import merged_unet
from ..runs.layout import RunLayout
from .policies import Policies

SOUP_ROLE = "soup"  # the adapter slot each stage is read into under LoRA (the policy's own is left alone)


def soup_rounds(kept: str) -> list[int]:
    """The rounds averaged when the rule keeps ``kept``: iter0 (0) up to its round; none when it keeps the base or
    iter0, where there is nothing to average."""
    last = RunLayout.round_of(kept)
    return list(range(last + 1)) if last >= 1 else []


@torch.no_grad()
def weight_average(policies: Policies, folders: list[Path]) -> nn.Module:
    """A plain UNet holding the uniform mean of the policies saved in ``folders``, summed in fp32 on the CPU one at a
    time (so the accelerator holds two UNets at most, not one per stage). Under LoRA each policy is first merged
    into the base (W + B·A per layer): the mean of the merged weights is the base plus the mean update, which the
    mean of the A's times the mean of the B's is not."""
    if not folders:
        raise ValueError("a soup needs at least one stage to average")
    total, template = None, None
    for folder in folders:
        policy = policies.load(folder, SOUP_ROLE) if policies.lora else policies.load(folder)
        unet = merged_unet(policies.unet, SOUP_ROLE) if policies.lora else policy
        state = unet.state_dict()
        if total is None:
            template = unet
            total = {k: v.detach().float().cpu().clone() for k, v in state.items() if v.is_floating_point()}
        else:
            for k in total:
                total[k] += state[k].detach().float().cpu()
        del policy, unet, state
    mean = {k: (total[k] / len(folders)).to(v.dtype) if k in total else v for k, v in template.state_dict().items()}
    template.load_state_dict(mean)
    device = next(policies.unet.parameters()).device  # a merged UNet is built on the CPU
    return template.to(device).eval().requires_grad_(False)
