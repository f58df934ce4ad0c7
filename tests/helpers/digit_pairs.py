"""Human-like pairs from the toy's real digits, with no oracle: the bolder of two same-class digits wins."""

import torch

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.toy.world import load_digits

PROMPTS = [f"a handwritten {d}" for d in range(10)]


def bold_over_thin(stack, per_digit: int | None = None) -> LatentPairs:
    """Each class's boldest digits against its thinnest (``per_digit`` of each; None: half the class each),
    on the class's prompt, encoded by ``stack``."""
    images, labels = load_digits()
    width = ((images + 1) / 2 > 0.5).float().mean(dim=(1, 2, 3))  # the share of inked pixels
    win, lose, digit = [], [], []
    for d in range(10):
        order = (labels == d).nonzero().squeeze(1)
        order = order[width[order].argsort()]
        k = per_digit or len(order) // 2
        win.append(images[order[-k:]])
        lose.append(images[order[:k]])
        digit += [d] * k
    prompts = PROMPTS + [""]
    m = len(digit)
    embeds = stack.encode_prompts(prompts).prompt_embeds
    return LatentPairs(
        torch.cat(win),
        torch.cat(lose),
        torch.tensor(digit),
        prompts,
        embeds,
        None,
        None,
        None,
        torch.ones(m),
        ["human"] * m,
    )
