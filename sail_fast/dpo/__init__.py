"""Diffusion-DPO training: ``trainer`` (the optimizer loop, checkpoints, DeepSpeed), ``losses`` (sigmoid,
SmPO, hinge, IPO, SFT, MaPO), ``mixup`` (the batch sampler mixing generated and seed pairs), ``optim``
(AdamW, 8-bit AdamW, Adafactor) and ``inversion`` (SmPO's DDIM-inversion noising)."""
