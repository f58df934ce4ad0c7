"""What ``deepspeed`` launches: the SAIL loop when the config has a ``sail:`` section, else one
Diffusion-DPO stage on the config's pairs (``sail_fast.commands.train``).

    python sail_fast/train.py --config configs/X.yaml [--set key=value ...] [--resume]
    deepspeed sail_fast/train.py --config configs/X.yaml        # several ranks, ZeRO
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory heads sys.path, which would make config.py,
# commands/, runs/, data/... importable as top-level packages and shadow same-named ones.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

if __name__ == "__main__":
    try:  # Ctrl-C while the imports below run is one line too (commands.arguments.user_errors takes over after)
        from sail_fast.runs.quiet import silence_third_party_noise

        silence_third_party_noise()  # before the imports below load diffusers (and with it bitsandbytes)
        from sail_fast.commands.train import main
    except KeyboardInterrupt:
        sys.stderr.write("\ntrain.py: interrupted (Ctrl-C)\n")
        raise SystemExit(130) from None
    main()
