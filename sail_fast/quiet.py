"""Third-party log lines a sail-fast user cannot act on, silenced once when a command starts.

diffusers imports bitsandbytes whenever it is installed (its quantizer registry), and
bitsandbytes, on a CPU with avx512_bf16, asks the Hugging Face `kernels` package for a 4-bit
CPU GEMM from the hub at import. sail-fast never builds 4-bit layers, so the lookup's failure
(offline, or an unverified publisher) says nothing a user can act on. Errors still show.
"""

from __future__ import annotations

import logging

NOISY_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward from kernels-community"
    "kernels._internals.hf_hub",  # "Skipping publisher trust check ... offline mode"
)


def silence_third_party_noise() -> None:
    """Raise the listed loggers to ERROR; a logger's level set before its module loads still holds."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
