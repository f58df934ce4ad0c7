"""The diffusion stack: models, tiny stacks, LoRA, noising, sampling, images and prompts."""
