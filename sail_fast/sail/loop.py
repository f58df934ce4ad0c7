"""The SAIL loop: iter0 Diffusion-DPO on the seed pairs, then T rounds of
generate -> rank by implicit reward -> pair best vs worst -> mix with the seed -> DPO.

``sail.ranker: external`` ranks with a reward model instead (OnlineDPO), and
``sail.soft_labels`` gives each pair the SmPO soft label of its ranking scores.
``sail.pair_sources`` adds RealAlign's pairs (real images beating losers made for their
captions, ``sail_fast.sail.real_pairs``) to the ranked ones, or uses them alone. ``sail.round_overrides``
changes settings for single rounds (RealAlign's second stage), and ``sail.iter0_steps: 0`` skips iter0.
After the rounds, ``sail.select`` names the stage the run keeps (``selection``), and ``sail.soup`` replaces it
with the weight average of iter0 up to it (``soup``).

The run folder's layout is in ``sail_fast.runs.run_folder``; each stage writes ``done.json`` last, and ``--resume``
skips finished stages and continues a half-trained one from its latest intact checkpoint.

The loop only sequences the stages, and it is the one place past the entry points that reads the whole
config; each stage is a function of a ``RunContext`` (``context``): the world (``world``: prompts, human
pairs, real images, a judge), ranking, pairing, RealAlign's pairs (``real_pairs``), training
(``sail_fast.dpo``, given its own section) and evaluation. Under the DeepSpeed launcher each rank generates
and ranks its slice of a round's prompts; the pairs are gathered on every rank before the DPO stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm

from ..data.latent_pairs import LatentPairs
from ..data.sources import load_pairs
from ..diffusion.build import build_stack, check_model_available
from ..diffusion.lora import JUDGE, PREVIOUS
from ..dpo.builder import trainer_for
from ..dpo.trainer import DPOTrainer
from ..runs.config import RunConfig, round_config
from ..runs.distributed import DistInfo
from ..runs.layout import RunLayout
from ..runs.output_folder import writable_folder
from ..runs.readback import check_run_records
from ..runs.run_folder import RunLock, atomic_write_text, read_json, record_config, write_json, write_manifest
from ..runs.seeding import HELDOUT_SPLIT, STAGE_TRAINING, derive_seed
from ..runs.yaml_files import dump_yaml
from .context import RunContext
from .evaluation import evaluate_stage, metric_rows, write_metrics
from .pairing import round_pairs
from .policies import Policies
from .real_pairs import encoded_real_images
from .reuse import reuse_iter0
from .selection import choose_stage, stop_reason
from .soup import soup_rounds, weight_average
from .summary import summary_text
from .world import world_class


class SailLoop:
    """Runs ``config``'s SAIL rounds in ``config.output_dir`` (see the module docstring)."""

    def __init__(
        self, config: RunConfig, *, dist: DistInfo = DistInfo(), device: torch.device | str = "cpu", log=None
    ) -> None:
        if config.sail is None:
            raise ValueError(
                "this config has no sail: section; add one (see configs/toy.yaml) or use `sail-fast train`"
            )
        self.config, self.sail, self.dist, self._log = config, config.sail, dist, log
        check_model_available(config.model)
        self.out = writable_folder(config.output_dir, "output_dir")  # a path mistake ends here, before any work
        self.layout = RunLayout(self.out, config.sail.iter0_from)  # before anything can log
        stack = build_stack(config.model, seed=config.seed, device=torch.device(device))
        self.policies = Policies(
            stack.unet, config.train.lora, config.seed
        )  # whole UNets, or LoRA adapters on the one base UNet
        world = world_class(config.model.toy)(
            config.sail, config.data.seed_pairs, seed=config.seed, out=self.out, log=self.log, toy=config.toy
        )
        shared = {
            "stack": stack,
            "base": self.policies.base,
            "dist": dist,
            "device": torch.device(device),
            "out": self.out,
            "world": world,
            "log": self.log,
            "progress": config.train.progress and dist.is_main,
        }
        self.ctx = self.context_for(config, **shared)
        self.base = self.ctx.base
        self._frozen_judge = None  # sail.frozen_judge: iter0's policy, loaded at the first round that ranks

    def context_for(self, config: RunConfig, **shared) -> RunContext:
        """What the stages read of ``config`` (its sections and values, never the whole of it), with ``shared``
        (the stack, ranks, folder, world, log) or else this loop's."""
        sails = tuple(round_config(config, r).sail for r in range(1, config.sail.rounds + 1))
        sections = {
            "sail": config.sail,
            "data": config.data,
            "model": config.model,
            "beta": config.train.beta,
            "seed": config.seed,
            "round_sails": sails,
        }
        return RunContext(**sections, **shared) if shared else dataclasses.replace(self.ctx, **sections)

    def log(self, text: str) -> None:
        if not self.dist.is_main:
            return
        (self._log or tqdm.write)(text)
        with self.layout.log.open("a") as f:
            f.write(text + "\n")

    def run(self, *, resume: bool = False, allow_config_change: bool = False) -> Path:
        """Run every unfinished stage; returns the last trained policy's UNet directory. The folder is locked for the run's
        lifetime; ``resume`` refuses a config unlike the run's first unless ``allow_config_change`` (``runs.run_folder``)."""
        if not resume and self.layout.stage(RunLayout.BASE).exists():
            raise FileExistsError(
                f"{self.out} already holds a SAIL run; pass --resume to continue it, or choose another output_dir"
            )
        rounds = self._round_prompts()  # enough prompts for every round? Found out now, not after iter0 has trained.
        with RunLock(self.out, log=self.log) if self.dist.is_main else contextlib.nullcontext():
            record_config(
                self.out,
                self.config.model_dump(mode="json"),
                resume=resume,
                allow_change=allow_config_change,
                log=self.log,
                write=self.dist.is_main,
            )
            return self._run_stages(rounds)

    def _run_stages(self, rounds: list[list[str]]) -> Path:
        check_run_records(self.layout, self.sail.rounds)  # a finished stage's damaged record: named before any work
        seed_sources, heldout_sources = self.ctx.world.human_pairs(self.ctx)
        pair_args = {
            "model": self.config.model,
            "data": self.config.data,
            "cache_dir": self.config.data.cache_dir or self.layout.cache,
            "seed": self.config.seed,
            "dist": self.dist,
            "log": self.log,
        }
        seed_pairs = (
            load_pairs(seed_sources, self.ctx.stack, **pair_args) if seed_sources else None
        )  # None: rounds alone
        heldout = load_pairs(heldout_sources, self.ctx.stack, **pair_args) if heldout_sources else None
        seed_pairs, heldout = self._split_heldout(seed_pairs, heldout)
        # The seed file is the human budget: a cap meant for real data must not cut it silently.
        self.log(f"seed: {len(seed_pairs or [])} human pairs; held-out: {len(heldout) if heldout else 0} pairs")
        if heldout is None and self.sail.select != "last":
            self.log(
                f"no held-out human pairs: the round score has no held-out fit, so sail.select: {self.sail.select} "
                "chooses without it; set sail.heldout_split (seed pairs to hold out) or sail.heldout_pairs"
            )
        real_set = encoded_real_images(self.ctx) if "real" in self.sail.pair_sources else None

        evaluate_stage(self.ctx, RunLayout.BASE, self.base, heldout)
        policy = self.iter0_stage(seed_pairs, heldout)
        previous, last, stopped = self.base, 0, None
        for r, prompts in enumerate(rounds, start=1):
            policy = self.round_stage(r, prompts, policy, previous, seed_pairs, heldout, real_set)
            last = r
            # The rule reads only the round score on disk, so a resumed run stops where it stopped before.
            stopped = self._stop_reason(r) if self.sail.early_stop else None
            if stopped:
                self.log(f"early stop after round {r} of {self.sail.rounds}: {stopped}")
                break
            # Round r trains its input policy in place, so the next round's reference (sail.ranking_reference:
            # previous) is read back from disk: the weights round r started from, as on --resume.
            previous = (
                self.policies.load(self.policy_dir(r - 1), PREVIOUS)
                if self.sail.ranking_reference == "previous"
                else self.base
            )
        return self._finish(last, stopped, heldout)

    def _judge(self):
        """iter0's policy, frozen, read from disk once (the round policy trains in place): sail.frozen_judge."""
        if self._frozen_judge is None:
            judge = self.policies.load(self.policy_dir(0), JUDGE)  # under LoRA an adapter made frozen
            self._frozen_judge = judge if self.policies.lora else judge.requires_grad_(False)
        return self._frozen_judge

    def _stop_reason(self, r: int) -> str | None:
        return stop_reason(metric_rows(self.layout, r), self.sail.patience, rule=self.sail.select)

    def _finish(self, last: int, stopped: str | None, heldout: LatentPairs | None) -> Path:
        """metrics.json, chosen.json and summary.md once the rounds are over (and under sail.soup, the soup stage);
        returns the last round's policy folder (the stage the run keeps is chosen.json's, which ``generate``,
        ``export`` and ``eval`` read)."""
        rows = metric_rows(self.layout, last)
        chosen = choose_stage(rows, self.sail.select) | {"rounds_run": last, "early_stop": stopped}
        shown = rows
        if self.sail.soup:
            chosen = self.soup_stage(chosen, heldout)
            if RunLayout.is_soup(chosen["stage"]):
                shown = rows + [{"stage": chosen["stage"]} | read_json(self.layout.eval_json(chosen["stage"]))]
        if self.dist.is_main:
            write_metrics(self.layout, last)
            write_json(self.layout.chosen, chosen)
        world_text = self.ctx.world.report(self.ctx, shown, RunLayout.stage_name(last))
        if self.dist.is_main:
            atomic_write_text(self.layout.summary, summary_text(shown, chosen, world_text))
        self.dist.barrier()
        final = self.layout.stage_final(chosen["stage"])
        where = "the base model" if final is None else str(final)
        self.log(
            f"SAIL finished: keeps {chosen['stage']}, {where} ({chosen['reason']}); metrics in {self.layout.metrics}"
        )
        return self.policy_dir(last)

    def soup_stage(self, chosen: dict, heldout: LatentPairs | None) -> dict:
        """``sail.soup``: the weight average of iter0..the stage ``chosen`` keeps, saved, evaluated like a stage and
        marked done (a finished soup is read, never rebuilt); returns ``chosen`` naming it. Where the rule keeps the
        base or iter0 there is nothing to average, and ``chosen`` keeps its stage."""
        rounds = soup_rounds(chosen["stage"])
        if not rounds:
            return chosen | {"soup_of": None}
        name, members = RunLayout.soup_name(rounds[-1]), [RunLayout.stage_name(r) for r in rounds]
        if not self.layout.done(name).exists():
            started = time.perf_counter()
            self.log(f"sail.soup: averaging the weights of {', '.join(members)} into {name}")
            soup = weight_average(self.policies, [self.policy_dir(r) for r in rounds])
            final = self.layout.stage_final(name)
            if self.dist.is_main:
                soup.save_pretrained(final / "unet")
                write_manifest(final)
            self.dist.barrier()
            evaluate_stage(self.ctx, name, soup, heldout)
            if self.dist.is_main:
                write_json(self.layout.done(name), {"seconds": time.perf_counter() - started, "soup_of": members})
            self.dist.barrier()
        reason = f"sail.soup: the weight average of {', '.join(members)}; {chosen['stage']} was {chosen['reason']}"
        return chosen | {"stage": name, "selected": chosen["stage"], "soup_of": members, "reason": reason}

    def stage_policy(self, stage: str) -> nn.Module:
        """The policy of an evaluated stage, read back from disk: the base, a round's, or a soup (a whole UNet)."""
        if RunLayout.is_soup(stage):
            return self.policies.load_whole(self.layout.stage_final(stage) / "unet")
        r = RunLayout.round_of(stage)
        return self.base if r < 0 else self.policies.load(self.policy_dir(r))

    def policy_dir(self, r: int) -> Path:
        """The UNet (or LoRA) directory of the policy after round r (0: iter0, wherever it was trained)."""
        return self.layout.final(r) / self.policies.folder

    def _round_prompts(self) -> list[list[str]]:
        """Disjoint prompt sets, one per round."""
        pool, per, rounds = self.ctx.world.round_pool(), self.sail.prompts_per_round, self.sail.rounds
        if per * rounds > len(pool):
            raise ValueError(
                f"{rounds} rounds x sail.prompts_per_round={per} need {per * rounds} distinct prompts, but the pool has "
                f"{len(pool)}; lower one of them or give a larger sail.prompts file"
            )
        return [pool[r * per : (r + 1) * per] for r in range(rounds)]

    def _stage_config(self, stage: int, steps: int | None, config: RunConfig) -> RunConfig:
        """The config one training stage runs with; recorded in its folder (``config.yaml``) when it starts."""
        train = config.train.model_copy(update={"steps": steps or config.train.steps})
        config = config.model_copy(
            update={"seed": derive_seed(config.seed, STAGE_TRAINING + stage) % 2**31, "train": train}
        )
        if self.dist.is_main and not self.layout.stage_config(stage).exists():
            atomic_write_text(self.layout.stage_config(stage), dump_yaml(config.model_dump(mode="json")))
        return config

    def _trainer(
        self, config: RunConfig, policy, seed_pairs, **options
    ) -> DPOTrainer:  # the stage config's section and seed
        return trainer_for(
            config, policy, self.ctx.stack.scheduler, seed_pairs, dist=self.dist, device=self.ctx.device, **options
        )

    def _write_metrics(self) -> None:
        if self.dist.is_main:
            write_metrics(self.layout, self.sail.rounds)

    def _split_heldout(self, seed_pairs: LatentPairs | None, heldout: LatentPairs | None):
        """``sail.heldout_split``: (the seed pairs trained on, the held-out pairs), drawn the same way on every
        rank and every resume."""
        count = self.sail.heldout_split
        if not count:
            return seed_pairs, heldout
        if heldout is not None:  # a world's own held-out pairs (the toy's)
            raise ValueError(
                f"sail.heldout_split: {count} holds out seed pairs, but this run's world brings {len(heldout)} "
                "held-out pairs of its own; set sail.heldout_split: 0"
            )
        if seed_pairs is None or count >= len(seed_pairs):
            have = len(seed_pairs) if seed_pairs is not None else 0
            raise ValueError(
                f"sail.heldout_split: {count} of {have} seed pairs leaves none to train on; hold out fewer "
                "(a few hundred is plenty) or add seed pairs (data.seed_pairs)"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, HELDOUT_SPLIT))
        trained, held = seed_pairs.hold_out(count, generator)
        self.log(f"sail.heldout_split: {count} of {len(seed_pairs)} seed pairs held out for the round score")
        return trained, held

    def iter0_stage(self, seed_pairs: LatentPairs, heldout) -> UNet2DConditionModel:
        layout, stage = self.layout, RunLayout.ITER0
        if self.sail.iter0_from:
            reuse_iter0(Path(self.sail.iter0_from), layout, self.dist)
            return self.policies.load(self.policy_dir(0))
        if not layout.done(stage).exists():
            started = time.perf_counter()
            if self.sail.iter0_steps == 0:  # the rounds start from the base model
                self.log("iter0: none (sail.iter0_steps: 0); the rounds start from the base model")
                if self.dist.is_main:
                    self.policies.save_fresh(layout.final(0))
            else:
                self.log(f"iter0: Diffusion-DPO on {len(seed_pairs)} seed pairs against the base model")
                trainer = self._trainer(
                    self._stage_config(0, self.sail.iter0_steps, self.config),
                    self.policies.fresh(),
                    seed_pairs,
                    output_dir=layout.training(0).root,
                )
                trainer.train(resume=True)
                del trainer
            self.dist.barrier()
            policy = self.policies.load(self.policy_dir(0))
            evaluate_stage(self.ctx, stage, policy, heldout)
            if self.dist.is_main:
                write_json(
                    layout.done(stage), {"seconds": time.perf_counter() - started, "human_pairs": len(seed_pairs or [])}
                )
            self.dist.barrier()
        self._write_metrics()
        return self.policies.load(self.policy_dir(0))

    def round_stage(self, r: int, prompts: list[str], policy, previous, seed_pairs: LatentPairs, heldout, real_set):
        layout, stage = self.layout, RunLayout.stage_name(r)
        if layout.done(stage).exists():
            return self.policies.load(self.policy_dir(r))
        config = round_config(self.config, r)  # with sail.round_overrides[r]
        started, ctx = time.perf_counter(), self.context_for(config)
        layout.stage(stage).mkdir(parents=True, exist_ok=True)
        pairs = round_pairs(
            ctx,
            real_set,
            r,
            prompts,
            policy,
            self.base if ctx.sail.ranking_reference == "base" else previous,
            judge=self._judge() if ctx.sail.frozen_judge else None,
        )
        by_source = {name: pairs.source.count(name) for name in dict.fromkeys(pairs.source)}
        if self.dist.is_main:
            pairs.save(layout.pairs(r))
        mixed = f"mixed with {len(seed_pairs)} seed pairs" if seed_pairs and config.train.mixup_alpha < 1 else "alone"
        self.log(f"round {r}: training on {len(pairs)} round pairs ({by_source}) {mixed}")
        trainer = self._trainer(
            self._stage_config(r, ctx.sail.round_steps, config),
            self.policies.trainable(policy),
            seed_pairs,
            generated_pairs=pairs,
            output_dir=layout.training(r).root,
            reference=self.base if ctx.sail.training_reference == "base" else None,
        )
        trainer.train(resume=True)
        del trainer
        policy = self.policies.load(self.policy_dir(r))
        if self.sail.eval_each_round or r == self.sail.rounds:
            evaluate_stage(self.ctx, stage, policy, heldout)
        if self.dist.is_main:
            write_json(
                layout.done(stage),
                {
                    "seconds": time.perf_counter() - started,
                    "generated_pairs": len(pairs),
                    "pairs_by_source": by_source,
                    "human_pairs": len(seed_pairs or []),
                },
            )
        self.dist.barrier()
        self._write_metrics()
        return policy
