"""Pretraining the toy world's base model and the oracle's digit classifier (``sail-fast toy pretrain``);
the result ships in ``sail_fast/toy_model``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..runs.output_folder import OutputFolder, writable_folder
from ..runs.seeding import TOY_CLASSIFIER_INIT, TOY_CLASSIFIER_SPLIT, TOY_PRETRAIN_BATCHES, derive_seed
from . import PRETRAIN_STEPS
from .human import ORACLE_FILE, DigitClassifier
from .world import build_toy_stack, load_digits, prompt_pool


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    epochs: int = 8,
    holdout: int = 1000,
    progress: bool = True,
) -> tuple[DigitClassifier, float]:
    """Train on all but ``holdout`` digits (with small random shifts); returns the held-out accuracy."""
    gen = torch.Generator().manual_seed(derive_seed(seed, TOY_CLASSIFIER_SPLIT))
    order = torch.randperm(len(images), generator=gen)
    test, train = order[:holdout], order[holdout:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, TOY_CLASSIFIER_INIT))
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


def pretrain(
    out_dir: str | Path,
    *,
    steps: int = PRETRAIN_STEPS,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    caption_dropout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    shipped: bool = False,
) -> dict:
    """Train the toy base model and the oracle's classifier; write both to ``out_dir``.

    The text encoder trains with the UNet (there is no pretrained CLIP offline) and is then
    frozen like SD's. Caption dropout teaches the unconditional prediction that CFG needs.
    ``out_dir`` follows the commands' folder rule (``sail_fast.runs.output_folder``), checked before training;
    ``shipped``: it is the package's own toy_model/, which this command replaces by design.
    """
    out = Path(out_dir)
    folder = writable_folder(out, "--out") if shipped else OutputFolder(out, "toy pretrain")
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
    gen = torch.Generator().manual_seed(derive_seed(seed, TOY_PRETRAIN_BATCHES))
    losses = []
    bar = tqdm(range(steps), desc="toy pretrain", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, digits = images[idx], labels[idx]
        choice = torch.randint(0, 10**6, (batch_size,), generator=gen).tolist()
        drop = (torch.rand(batch_size, generator=gen) < caption_dropout).tolist()
        prompts = [
            "" if dropped else by_digit[d][c % len(by_digit[d])] for d, c, dropped in zip(digits.tolist(), choice, drop)
        ]
        ids = stack.tokenizer(
            prompts,
            padding="max_length",
            max_length=stack.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
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
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "final_loss": float(np.mean(losses[-200:])),
        "classifier_holdout_accuracy": clf_accuracy,
        "seconds": time.perf_counter() - started,
    }
    with contextlib.nullcontext(out) if shipped else folder.write_tree() as target:
        stack.save_pretrained(target)
        (target / "oracle").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, target / ORACLE_FILE)
        (target / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------- human pairs and evaluation
