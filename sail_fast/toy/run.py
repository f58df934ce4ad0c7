"""The toy world as a SAIL run sees it (``sail_fast.sail.world``): its own prompts, a hidden human who
labels the seed pairs and judges every stage's samples, real MNIST digits for RealAlign, and the
table and comparison picture printed at the end."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runs.layout import HumanPairsLayout, RunLayout
from ..runs.output_folder import OutputFolder
from ..runs.run_folder import read_json
from ..runs.seeding import TOY_ROUND_PROMPTS, derive_seed
from ..sail.world import World
from .human import TEMPERATURE, ToyOracle
from .labels import make_human_pairs, oracle_samples, oracle_summary
from .report import report
from .world import split_prompts, write_real_digits

REAL_DIGITS = 2000  # real digits written for RealAlign runs (enough for 20 rounds of 96)


class ToyWorld(World):
    def __init__(self, sail, seed_pairs, *, seed, out, log=print, toy=None) -> None:
        super().__init__(sail, seed_pairs, seed=seed, out=out, log=log, toy=toy)
        self.auto_temperature = toy is not None and toy.temperature == "auto"
        fixed = toy.temperature if toy is not None and not self.auto_temperature else None
        self.oracle = ToyOracle.load(temperature=fixed or TEMPERATURE, preference=toy and toy.preference)

    def round_pool(self) -> list[str]:
        _, pool = split_prompts(self.seed)
        order = torch.randperm(
            len(pool), generator=torch.Generator().manual_seed(derive_seed(self.seed, TOY_ROUND_PROMPTS))
        )
        return [pool[i] for i in order.tolist()]

    def eval_prompts(self) -> list[str]:
        return split_prompts(self.seed, num_eval=100)[0][: self.sail.eval_prompts]

    def _human(self) -> HumanPairsLayout:
        return RunLayout(self.out).human_pairs(self.toy.data_dir if self.toy else None)

    def human_pairs(self, ctx) -> tuple[list[str], list[str]]:
        """Label pairs of base samples with the hidden human (once; runs that share ``toy.data_dir`` share them)."""
        seed_sources, heldout_sources = super().human_pairs(ctx)
        toy = self.toy
        if toy is None:
            return seed_sources, heldout_sources
        human = self._human()
        # Everything that decides the labels: a shared folder labelled otherwise is refused, not reused.
        settings = {
            "labelled_pairs": toy.labelled_pairs,
            "seed_fraction": toy.seed_fraction,
            "heldout_pairs": toy.heldout_pairs,
            "seed": self.seed,
            "temperature": "auto" if self.auto_temperature else self.oracle.temperature,
            "preference": toy.preference,
            "sampling": ctx.sampling,
        }
        if human.done.exists():
            labelled_with = read_json(human.done).get("settings", {})
            changed = {
                k: (labelled_with[k], v) for k, v in settings.items() if k in labelled_with and labelled_with[k] != v
            }
            if changed:
                raise ValueError(
                    f"toy.data_dir {human.root} was labelled with other settings: "
                    + "; ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in changed.items())
                    + ". Point toy.data_dir at a new folder (or unset it) to label with these settings"
                )
        elif ctx.dist.is_main:
            self.log(
                f"labelling {toy.labelled_pairs} + {toy.heldout_pairs} toy pairs with the hidden oracle -> {human.root}"
            )
            # A new or empty folder, or one this labelling began (its ledger proves the files); never a user's.
            folder = OutputFolder(
                human.root, "toy label", what="toy.data_dir" if toy.data_dir else "the labelled-pairs folder"
            )
            with folder.write_tree() as staging:
                summary = make_human_pairs(
                    ctx.stack,
                    self.oracle,
                    staging,
                    labelled=toy.labelled_pairs,
                    seed_fraction=toy.seed_fraction,
                    heldout=toy.heldout_pairs,
                    seed=self.seed,
                    sampling=ctx.sampling,
                    progress=ctx.progress,
                    auto_temperature=self.auto_temperature,
                )
            if self.auto_temperature:
                self.log(
                    f"toy.temperature auto: {summary['temperature']:.4g} (labels agree with the noiseless "
                    f"preference {summary['labels_agreeing_with_noiseless_oracle']:.1%} of the time)"
                )
            folder.write_text(
                human.done.name, json.dumps(summary | {"settings": settings}, indent=2) + "\n"
            )  # last: finished
        ctx.dist.barrier()
        seed = human.all if toy.train_on == "all" else human.seed
        return seed_sources or [str(seed)], heldout_sources or [str(human.heldout)]

    def real_images(self, ctx, need: int) -> Path:
        if self.sail.real.data is not None:
            return super().real_images(ctx, need)
        source = self._human().real_digits
        if ctx.dist.is_main:
            write_real_digits(source, max(need, REAL_DIGITS), seed=self.seed)
        ctx.dist.barrier()
        return source

    @staticmethod
    def subject_masks(pixels):
        # A digit's subject is its stroke (ink above half intensity), dilated by one pixel to take its edge.
        return torch.nn.functional.max_pool2d((pixels > 0).float(), kernel_size=3, stride=1, padding=1)

    reward_correlates = ("width", "log_prob")  # stroke width (ink) and legibility

    def metric_options(self, name: str) -> dict:
        # The toy metrics judge by the run's human, whichever preference it was given.
        return {"preference": self.oracle.preference} if name.startswith("toy_") else {}

    def judge(self, latents, prompts):
        return oracle_samples(self.oracle, latents, prompts)

    def summary(self, samples, prompts) -> dict:
        return oracle_summary(samples, prompts)

    def report(self, ctx, rows: list[dict], last: str) -> str:
        if not ctx.dist.is_main:
            return ""
        table = report(ctx.layout, rows, last, self.eval_prompts())
        self.log("\n" + table)
        if ctx.layout.compare.exists():
            self.log(f"base and final model, same prompts and seeds: {ctx.layout.compare}")
        return table
