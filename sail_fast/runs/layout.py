"""Where everything lives in a run folder: ``RunLayout`` (a SAIL run: stages, their evaluations, rankings,
pairs and trained policies) and ``TrainingLayout`` (one DPO training folder: checkpoints, final weights,
logs). These are the only places that spell a stage's path or file name; the layout as a tree is in
``sail_fast.runs.run_folder``'s docstring."""

from __future__ import annotations

import re
from pathlib import Path

DONE = "done.json"  # a stage's marker, written last
EVAL_JSON = "eval.json"
EVAL_SAMPLES = "eval_samples.safetensors"  # a stage's eval latents and per-sample judged terms [P, n]


class TrainingLayout:
    """One DPO training folder (``output_dir`` of a stage or of ``sail-fast train``): checkpoints, the final
    weights for the next stage, and the logs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final"
        self.log = self.root / "train.log"
        self.metrics = self.root / "metrics.jsonl"

    def metrics_of_rank(self, rank: int) -> Path:
        """Rank ``rank``'s training metrics (the main rank's: ``metrics``)."""
        return self.metrics if rank == 0 else self.root / f"metrics.rank{rank}.jsonl"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def written_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (a half-written one ends in .tmp)."""
        return sorted(self.checkpoints.glob("step-[0-9]*[0-9]"))

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        return int(checkpoint.name[len("step-") :])


class RunLayout:
    """Every path in a SAIL run folder (the layout in this module's docstring), and the only place that names
    them. Stages are named ``base``, ``iter0`` and ``round-01``...; a soup of iter0..round k (``sail.soup``) is
    the stage ``soup-00-0k``. ``iter0_from``: a finished iter0 of another run (``sail.iter0_from``), whose trained
    policy is read in place."""

    BASE, ITER0 = "base", "iter0"

    def __init__(self, root: str | Path, iter0_from: str | Path | None = None) -> None:
        self.root = Path(root)
        self.iter0_from = None if iter0_from is None else Path(iter0_from)
        self.config = self.root / "config.yaml"
        self.record = self.root / "run.json"  # the sail-fast that began the run, and config.yaml's sha256
        self.log = self.root / "sail.log"
        self.metrics = self.root / "metrics.json"
        self.curves = self.root / "curves.png"
        self.summary = self.root / "summary.md"
        self.chosen = self.root / "chosen.json"  # the stage the run keeps (sail.select) and why
        self.compare = self.root / "compare.png"
        self.human = self.root / "human"  # toy world: the labelled pairs (human_pairs)
        self.cache = self.root / "cache"  # encoded pairs, unless data.cache_dir names another folder

    def human_pairs(self, data_dir: str | Path | None = None) -> "HumanPairsLayout":
        """The toy world's labelled pairs: ``human/`` in the run, or a shared ``toy.data_dir``."""
        return HumanPairsLayout(Path(data_dir) if data_dir else self.human)

    def replaced_files(self) -> list[Path]:
        """The top-level files a run writes whole (and rewrites after each stage), the resumed configs included."""
        resumed = sorted(self.root.glob("config.resume-*.yaml"))
        return [self.config, self.record, self.metrics, self.curves, self.summary, self.chosen, self.compare, *resumed]

    def resumed_config(self, k: int) -> Path:
        """The k-th config a run was resumed with under --allow-config-change (the first stays ``config``)."""
        return self.root / f"config.resume-{k}.yaml"

    @classmethod
    def stage_name(cls, r: int) -> str:
        """Round r's stage (0: iter0)."""
        return cls.ITER0 if r == 0 else f"round-{r:02d}"

    @classmethod
    def round_of(cls, stage: str) -> int:
        """The round a stage trained (iter0: 0; the base: -1)."""
        known = {cls.BASE: -1, cls.ITER0: 0}
        return known[stage] if stage in known else int(stage.removeprefix("round-"))

    @staticmethod
    def soup_name(last: int) -> str:
        """The stage holding the weight average of iter0..round ``last`` (``sail.soup``)."""
        return f"soup-00-{last:02d}"

    @staticmethod
    def is_soup(stage: str) -> bool:
        return re.fullmatch(r"soup-00-\d{2,4}", stage) is not None

    @classmethod
    def is_stage(cls, stage: str) -> bool:
        """Whether ``stage`` is a name this layout could have written (read back from a file: untrusted)."""
        return re.fullmatch(r"base|iter0|round-\d{2,4}", stage) is not None or cls.is_soup(stage)

    @classmethod
    def stage_names(cls, rounds: int) -> list[str]:
        return [cls.BASE] + [cls.stage_name(r) for r in range(rounds + 1)]

    def stage(self, name: str) -> Path:
        return self.root / name

    def round_dir(self, r: int) -> Path:
        return self.stage(self.stage_name(r))

    def evaluated_stages(self) -> list[str]:
        """The stages with an evaluation, in the loop's order (soups last)."""
        rounds = sorted(p.name for p in self.root.glob("round-[0-9]*") if (p / EVAL_JSON).exists())
        soups = [s for s in self.soups() if self.eval_json(s).exists()]
        return [s for s in (self.BASE, self.ITER0) if self.eval_json(s).exists()] + rounds + soups

    def soups(self) -> list[str]:
        """The soup stages (``sail.soup``) this folder holds, by name."""
        return sorted(p.name for p in self.root.glob("soup-00-[0-9]*") if self.is_soup(p.name) and p.is_dir())

    def eval_json(self, stage: str) -> Path:
        return self.stage(stage) / EVAL_JSON

    def eval_samples(self, stage: str) -> Path:
        return self.stage(stage) / EVAL_SAMPLES

    def samples_grid(self, stage: str) -> Path:
        return self.stage(stage) / "samples.png"

    def done(self, stage: str) -> Path:
        return self.stage(stage) / DONE

    def training(self, r: int) -> TrainingLayout:
        """Where round r trained (0: iter0, in the stage folder; rounds in their train/ subfolder)."""
        return TrainingLayout(self.round_dir(r) if r == 0 else self.round_dir(r) / "train")

    def final(self, r: int) -> Path:
        """The trained policy after round r (0: iter0, wherever it was trained)."""
        if r == 0 and self.iter0_from is not None:
            return TrainingLayout(self.iter0_from).final
        return self.training(r).final

    def stage_final(self, stage: str) -> Path | None:
        """The final folder of the policy a stage holds (None: the base model, which the config names)."""
        if self.is_soup(stage):
            return self.stage(stage) / "final"
        r = self.round_of(stage)
        return None if r < 0 else self.final(r)

    def stage_config(self, r: int) -> Path:
        return self.round_dir(r) / "config.yaml"

    def candidates(self, r: int, rank: int) -> Path:
        return self.round_dir(r) / f"candidates.rank{rank}.safetensors"

    def real_losers(self, r: int, rank: int) -> Path:
        return self.round_dir(r) / f"real_losers.rank{rank}.safetensors"

    def candidate_grid(self, r: int) -> Path:
        return self.round_dir(r) / "candidates.png"

    def real_pairs_grid(self, r: int) -> Path:
        return self.round_dir(r) / "real_pairs.png"

    def ranking(self, r: int) -> Path:
        return self.round_dir(r) / "ranking.json"

    def pairs(self, r: int) -> Path:
        return self.round_dir(r) / "pairs.safetensors"

    def finals(self) -> list[Path]:
        """Every stage's final folder that exists, newest first: the rounds, iter0, then a plain training run's."""
        rounds = sorted(self.root.glob("round-[0-9]*"), reverse=True)
        found = [TrainingLayout(p / "train").final for p in rounds] + [
            self.training(0).final,
            TrainingLayout(self.root).final,
        ]
        return [f for f in found if f.exists()]


class HumanPairsLayout:
    """The toy world's labelled pairs (``human/`` or ``toy.data_dir``): every pair, SAIL's seed, the held-out pairs
    and the record written last that marks the labelling finished."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.all = self.root / "all.jsonl"
        self.seed = self.root / "seed.jsonl"
        self.heldout = self.root / "heldout.jsonl"
        self.summary = self.root / "summary.json"
        self.done = self.root / DONE
        self.real_digits = self.root.parent / "real-digits"  # RealAlign's real images, beside the pairs
