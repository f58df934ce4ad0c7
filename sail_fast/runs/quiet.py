"""Third-party output a sail-fast user cannot act on, silenced once when a command starts.

diffusers imports bitsandbytes whenever it is installed (its quantizer registry), and
bitsandbytes, on a CPU with avx512_bf16, asks the Hugging Face `kernels` package for a 4-bit
CPU GEMM from the hub at import. sail-fast never builds 4-bit layers, so the lookup's failure
(offline, or an unverified publisher) says nothing a user can act on. Errors still show.

transformers and diffusers draw a progress bar while they read weights from disk ("Loading weights",
"Loading pipeline components..."): a fraction of a second of bar between the run's own lines. Those
bars go; sail-fast's own bars (plain tqdm) and the hub's download bars stay.
"""

from __future__ import annotations

import logging

NOISY_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward from kernels-community"
    "kernels._internals.hf_hub",  # "Skipping publisher trust check ... offline mode"
)


def silence_third_party_noise() -> None:
    """Raise the listed loggers to ERROR (a logger's level set before its module loads still holds), then
    turn off the libraries' weight-loading bars."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    silence_loading_bars()


def silence_loading_bars() -> None:
    """transformers' and diffusers' own progress bars off; the hub's download bars as they were."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns the hub's bars off, hence the restore below
    diffusers_logging.disable_progress_bar()
    if downloads_shown:  # a download can take minutes: its bar is news
        enable_progress_bars()
