"""The SAIL loop: iter0 Diffusion-DPO on the seed pairs, then T rounds of
generate -> rank by implicit reward -> pair best vs worst -> mix with the seed -> DPO.

``sail.ranker: external`` ranks with a reward model instead (OnlineDPO), and
``sail.soft_labels`` gives each pair the SmPO soft label of its ranking scores.
``sail.pair_sources`` adds RealAlign's pairs (real images beating losers made for their
captions, ``sail_fast.realalign``) to the ranked ones, or uses them alone.

Run directory (each stage writes ``done.json`` last; ``--resume`` skips finished stages
and continues a half-trained one from its latest checkpoint)::

    config.yaml       the config the run started with (config.resume-N.yaml: later ones, --allow-config-change)
    run.lock          host and pid of the run working here (sail_fast.rundir)
    human/            toy world: the labelled pairs (all.jsonl, seed.jsonl, heldout.jsonl)
    base/eval.json    the base model's evaluation
    iter0/            DPO on the seed against the base: config.yaml (as the stage ran), checkpoints/, final/unet, eval.json
    real-digits/      toy world, RealAlign: the real images with captions (metadata.jsonl)
    round-01/         candidates.rank0.safetensors, pairs.safetensors (latent shard),
                      ranking.json, candidates.png, train/ (checkpoints/, final/unet), eval.json;
                      RealAlign: real_losers.rank0.safetensors, real_pairs.png
    metrics.json      one row per stage: reward spread, self-label agreement, diversity, metrics
    curves.png        those rows as curves

Under the DeepSpeed launcher each rank generates and ranks its slice of a round's prompts;
the pairs are gathered on every rank before the data-parallel DPO stage.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import RunConfig
from .data import LatentPairs
from .distributed import DistInfo
from .images import decode_latents, enlarge, image_grid
from .models import DiffusionStack, build_stack
from .pair_sources import fingerprint, load_pairs
from .prompts import read_prompts
from .ranking import drop_non_finite, external_scores, soft_labels
from .realalign import (
    PER_ROUND_LOSERS,
    captions,
    encode_real,
    read_real_images,
    region_masks,
)
from .reward import Draws, ImplicitRewardScorer
from .rundir import RunLock, atomic_write_text, claim_folder, read_json, record_config, release_folder, write_json
from .sampling import generate_candidates, regenerate_region
from .seeding import derive_seed
from .trainer import DPOTrainer

DONE = "done.json"
EVAL_SAMPLES = "eval_samples.safetensors"  # a stage's eval latents and per-sample oracle terms [P, n]
TOY_REAL_DIGITS = 2000  # real digits written for toy RealAlign runs (enough for 20 rounds of 96)


def sample_diversity(latents: torch.Tensor) -> float:
    """Mean RMS distance between two samples of the same prompt, for latents [P, n, ...]."""
    flat = latents.flatten(2).float()
    n = flat.shape[1]
    if n < 2:
        return float("nan")
    dist = torch.cdist(flat, flat) / math.sqrt(flat.shape[-1])  # [P, n, n]
    return float(dist.sum(dim=(1, 2)).mean() / (n * (n - 1)))


def load_unet(path: Path, like: UNet2DConditionModel) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(path, torch_dtype=like.dtype).to(like.device).eval()


class SailLoop:
    """Runs ``config``'s SAIL rounds in ``config.output_dir`` (see the module docstring)."""

    def __init__(self, config: RunConfig, *, dist: DistInfo = DistInfo(), device: torch.device | str = "cpu",
                 log=None) -> None:
        if config.sail is None:
            raise ValueError("this config has no sail: section; add one (see configs/toy.yaml) or use `sail-fast train`")
        self.config, self.sail, self.dist = config, config.sail, dist
        self.device = torch.device(device)
        self.out = Path(config.output_dir)
        self.progress = config.train.progress and dist.is_main
        self._log = log
        self.stack = build_stack(config.model, seed=config.seed, device=self.device)
        self.base = self.stack.unet.eval().requires_grad_(False)
        self.oracle = None
        if config.model.toy:
            from .toy_human import TEMPERATURE, ToyOracle

            toy = config.toy
            self.oracle = ToyOracle.load(temperature=(toy and toy.temperature) or TEMPERATURE,
                                         preference=toy and toy.preference)
        self.ranker = None
        if self.sail.ranker == "external":
            from .metrics import load_metric

            # The toy metrics judge by the run's human, whichever preference it was given.
            extra = {"preference": self.oracle.preference} if self.oracle and self.sail.ranker_metric.startswith("toy_") else {}
            self.ranker = load_metric(self.sail.ranker_metric, self.sail.ranker_weights, device=self.device, **extra)
        self.sampling = self.sail.sampling()
        self.real_set: LatentPairs | None = None  # RealAlign's encoded real images, loaded by run()

    # ------------------------------------------------------------------ helpers
    def log(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self._log is not None:
            self._log(text)
        else:
            tqdm.write(text)
        with (self.out / "sail.log").open("a") as f:
            f.write(text + "\n")

    def _stack_with(self, unet) -> DiffusionStack:
        """The stack sampling with ``unet`` (compiled when ``sail.compile``)."""
        return dataclasses.replace(self.stack, unet=torch.compile(unet) if self.sail.compile else unet)

    def _stage_config(self, stage: int, steps: int | None, stage_dir: Path) -> RunConfig:
        """The config one training stage runs with; recorded in its folder (``config.yaml``) when it starts."""
        train = self.config.train.model_copy(update={"steps": steps or self.config.train.steps})
        config = self.config.model_copy(update={"seed": derive_seed(self.config.seed, 100 + stage) % 2**31, "train": train})
        if self.dist.is_main and not (stage_dir / "config.yaml").exists():
            atomic_write_text(stage_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return config

    def _round_prompts(self) -> list[list[str]]:
        """Disjoint prompt sets, one per round."""
        if self.config.model.toy:
            from .toy import split_prompts

            _, pool = split_prompts(self.config.seed)
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(derive_seed(self.config.seed, 8001)))
            pool = [pool[i] for i in order.tolist()]
        elif self.sail.prompts is not None:
            pool = list(dict.fromkeys(read_prompts(self.sail.prompts)))  # unique, file order
        else:
            raise ValueError("sail.prompts is not set: point it at a prompt file (.txt, .tsv, .json or .parquet)")
        per, rounds = self.sail.prompts_per_round, self.sail.rounds
        if per * rounds > len(pool):
            raise ValueError(
                f"{rounds} rounds x sail.prompts_per_round={per} need {per * rounds} distinct prompts, but the pool has "
                f"{len(pool)}; lower one of them or give a larger sail.prompts file"
            )
        return [pool[r * per : (r + 1) * per] for r in range(rounds)]

    def _eval_prompts(self) -> list[str]:
        if self.config.model.toy:
            from .toy import split_prompts

            return split_prompts(self.config.seed, num_eval=100)[0][: self.sail.eval_prompts]
        # Real stacks: the first prompts of the pool that no round uses.
        pool = list(dict.fromkeys(read_prompts(self.sail.prompts)))
        used = self.sail.prompts_per_round * self.sail.rounds
        return (pool[used:] or pool)[: self.sail.eval_prompts]

    # ------------------------------------------------------------------ the run
    def run(self, *, resume: bool = False, allow_config_change: bool = False) -> Path:
        """Run every unfinished stage; returns the final policy's UNet directory.

        The run folder is locked for the run's lifetime; ``resume`` refuses a config that differs from
        the one the run started with unless ``allow_config_change`` (see ``sail_fast.rundir``)."""
        if not resume and (self.out / "base").exists():
            raise FileExistsError(
                f"{self.out} already holds a SAIL run; pass --resume to continue it, or choose another output_dir"
            )
        self._round_prompts()  # enough prompts for every round? Found out now, not after iter0 has trained.
        with RunLock(self.out, log=self.log) if self.dist.is_main else contextlib.nullcontext():
            record_config(self.out, self.config.model_dump(mode="json"), resume=resume, allow_change=allow_config_change,
                          log=self.log, write=self.dist.is_main)
            return self._run_stages()

    def _run_stages(self) -> Path:
        seed_sources, heldout_sources = list(self.config.data.seed_pairs), list(self.sail.heldout_pairs)
        if self.config.toy is not None:
            human = self.human_stage()
            seed_sources = seed_sources or [str(human / ("all.jsonl" if self.config.toy.train_on == "all" else "seed.jsonl"))]
            heldout_sources = heldout_sources or [str(human / "heldout.jsonl")]
        pair_args = {"model": self.config.model, "data": self.config.data, "cache_dir": self.config.data.cache_dir or self.out / "cache",
                     "seed": self.config.seed, "dist": self.dist, "log": self.log}
        seed_pairs = load_pairs(seed_sources, self.stack, **pair_args)
        heldout = load_pairs(heldout_sources, self.stack, **pair_args) if heldout_sources else None
        # The seed file is the human budget: a cap meant for real data must not cut it silently.
        self.log(f"seed: {len(seed_pairs)} human pairs; held-out: {len(heldout) if heldout else 0} pairs")
        self.real_set = self.real_stage() if "real" in self.sail.pair_sources else None

        self.evaluate("base", self.base, heldout)
        policy = self.iter0_stage(seed_pairs, heldout)
        previous = self.base
        for r, prompts in enumerate(self._round_prompts(), start=1):
            policy = self.round_stage(r, prompts, policy, previous, seed_pairs, heldout)
            # Round r trains its input policy in place, so the next round's reference (sail.reference:
            # previous) is read back from disk: the weights round r started from, as on --resume.
            previous = load_unet(self._policy_dir(r - 1), self.base) if self.sail.reference == "previous" else self.base
        final = self.final_dir()
        self.write_metrics()
        if self.dist.is_main and self.oracle is not None:
            from .run_report import report

            last = f"round-{self.sail.rounds:02d}" if self.sail.rounds else "iter0"
            self.log("\n" + report(self.out, self.metric_rows(), last, self._eval_prompts()))
            if (self.out / "compare.png").exists():
                self.log(f"base and final model, same prompts and seeds: {self.out / 'compare.png'}")
        self.log(f"SAIL finished: final policy in {final}; metrics in {self.out / 'metrics.json'}")
        return final

    def final_dir(self) -> Path:
        return self._policy_dir(self.sail.rounds)

    def _policy_dir(self, r: int) -> Path:
        """The UNet directory of the policy after round r (0: iter0, wherever it was trained)."""
        if r == 0:
            return Path(self.sail.iter0_from or self.out / "iter0") / "final" / "unet"
        return self.out / f"round-{r:02d}/train/final/unet"

    # ------------------------------------------------------------------ stages
    def human_stage(self) -> Path:
        """Toy world: label pairs of base samples with the hidden oracle (once, shared by runs that point at it)."""
        from .toy import make_human_pairs

        toy = self.config.toy
        human = Path(toy.data_dir) if toy.data_dir else self.out / "human"
        # Everything that decides the labels: a shared folder labelled otherwise is refused, not reused.
        settings = {"labelled_pairs": toy.labelled_pairs, "seed_fraction": toy.seed_fraction,
                    "heldout_pairs": toy.heldout_pairs, "seed": self.config.seed, "temperature": self.oracle.temperature,
                    "preference": toy.preference, "sampling": self.sampling}
        if (human / DONE).exists():
            labelled_with = read_json(human / DONE).get("settings", {})
            changed = {k: (labelled_with[k], v) for k, v in settings.items() if k in labelled_with and labelled_with[k] != v}
            if changed:
                raise ValueError(
                    f"toy.data_dir {human} was labelled with other settings: "
                    + "; ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in changed.items())
                    + ". Point toy.data_dir at a new folder (or unset it) to label with these settings"
                )
        elif self.dist.is_main:
            self.log(f"labelling {toy.labelled_pairs} + {toy.heldout_pairs} toy pairs with the hidden oracle -> {human}")
            claim_folder(human, "toy.data_dir" if toy.data_dir else "the labelled-pairs folder")
            summary = make_human_pairs(
                self.stack, self.oracle, human, labelled=toy.labelled_pairs, seed_fraction=toy.seed_fraction,
                heldout=toy.heldout_pairs, seed=self.config.seed, sampling=self.sampling, progress=self.progress,
            )
            release_folder(human)
            write_json(human / DONE, summary | {"settings": settings})
        self.dist.barrier()
        return human

    def real_stage(self) -> LatentPairs:
        """RealAlign's real images for every round, encoded once (with their blurred or noised losers)
        and cached; the toy world writes real MNIST digits first when sail.real.data is unset."""
        real, need = self.sail.real, self.sail.rounds * self.sail.real_per_round()
        source = real.data
        if source is None:  # only the toy world gets here (the config demands sail.real.data otherwise)
            from .toy import write_real_digits

            toy = self.config.toy
            source = (Path(toy.data_dir) if toy and toy.data_dir else self.out / "human").parent / "real-digits"
            if self.dist.is_main:
                write_real_digits(source, max(need, TOY_REAL_DIGITS), seed=self.config.seed)
            self.dist.barrier()
        items = read_real_images(source)
        if len(items) < need:
            raise ValueError(f"{source} holds {len(items)} real images, but {self.sail.rounds} rounds x "
                             f"{self.sail.real_per_round()} real pairs per round need {need}; add images or lower "
                             "sail.real.per_round (or sail.rounds)")
        settings = {"model": self.config.model.model_dump(), "resolution": self.config.data.resolution, "count": need,
                    "seed": self.config.seed, "loser": real.loser}
        if real.loser in ("blur", "noise"):  # the only losers encoded with the real images
            settings[real.loser] = real.blur_sigma if real.loser == "blur" else real.noise_std
        cache = Path(self.config.data.cache_dir or self.out / "cache") / f"real-{fingerprint([Path(source)], settings)}.safetensors"
        if self.dist.is_main and not cache.exists():
            self.log(f"RealAlign: encoding {need} real images from {source} (loser: {real.loser})")
            encoded = encode_real(items[:need], self.stack, resolution=self.config.data.resolution, loser=real.loser,
                                  blur_sigma=real.blur_sigma, noise_std=real.noise_std, seed=self.config.seed,
                                  batch_size=self.config.data.encode_batch_size, progress=self.progress)
            encoded.save(cache)  # written to a temporary name and renamed
        self.dist.barrier()
        return LatentPairs.load(cache)

    def iter0_stage(self, seed_pairs: LatentPairs, heldout) -> UNet2DConditionModel:
        stage = self.out / "iter0"
        if self.sail.iter0_from:
            source = Path(self.sail.iter0_from)
            if not (source / DONE).exists():
                raise FileNotFoundError(f"sail.iter0_from={source} is not a finished iter0 stage (no {DONE})")
            if self.dist.is_main and not (stage / DONE).exists():
                stage.mkdir(parents=True, exist_ok=True)
                for name in ("eval.json", EVAL_SAMPLES):
                    if (source / name).exists():
                        shutil.copy(source / name, stage / name)
                write_json(stage / DONE, read_json(source / DONE) | {"from": str(source.resolve())})
            self.dist.barrier()
            return load_unet(source / "final" / "unet", self.base)
        if not (stage / DONE).exists():
            self.log(f"iter0: Diffusion-DPO on {len(seed_pairs)} seed pairs against the base model")
            started = time.perf_counter()
            trainer = DPOTrainer(self._stage_config(0, self.sail.iter0_steps, stage), copy.deepcopy(self.base).requires_grad_(True),
                                 self.stack.scheduler, seed_pairs, output_dir=stage, dist=self.dist, device=self.device)
            trainer.train(resume=True)
            del trainer
            policy = load_unet(stage / "final" / "unet", self.base)
            self.evaluate("iter0", policy, heldout)
            if self.dist.is_main:
                write_json(stage / DONE, {"seconds": time.perf_counter() - started, "human_pairs": len(seed_pairs)})
            self.dist.barrier()
        self.write_metrics()
        return load_unet(stage / "final" / "unet", self.base)

    def round_stage(self, r: int, prompts: list[str], policy, previous, seed_pairs: LatentPairs, heldout):
        stage = self.out / f"round-{r:02d}"
        if (stage / DONE).exists():
            return load_unet(stage / "train" / "final" / "unet", self.base)
        started = time.perf_counter()
        stage.mkdir(parents=True, exist_ok=True)
        parts = []
        if "self" in self.sail.pair_sources:
            parts.append(self._ranked_pairs(stage, r, prompts, policy, previous))
        if "real" in self.sail.pair_sources:
            parts.append(self._real_pairs(stage, r, policy))
        pairs = parts[0] if len(parts) == 1 else LatentPairs.cat(parts)
        by_source = {name: pairs.source.count(name) for name in dict.fromkeys(pairs.source)}
        if self.dist.is_main:
            pairs.save(stage / "pairs.safetensors")
        self.log(f"round {r}: training on {len(pairs)} round pairs ({by_source}) mixed with {len(seed_pairs)} seed pairs")

        trainer = DPOTrainer(self._stage_config(r, self.sail.round_steps, stage), policy.requires_grad_(True), self.stack.scheduler,
                             seed_pairs, generated_pairs=pairs, output_dir=stage / "train", dist=self.dist, device=self.device)
        trainer.train(resume=True)
        del trainer
        policy = load_unet(stage / "train" / "final" / "unet", self.base)
        if self.sail.eval_each_round or r == self.sail.rounds:
            self.evaluate(f"round-{r:02d}", policy, heldout)
        if self.dist.is_main:
            write_json(stage / DONE, {"seconds": time.perf_counter() - started, "generated_pairs": len(pairs),
                                       "pairs_by_source": by_source, "human_pairs": len(seed_pairs)})
        self.dist.barrier()
        self.write_metrics()
        return policy

    def _ranked_pairs(self, stage: Path, r: int, prompts: list[str], policy, previous) -> LatentPairs:
        """SAIL's (or OnlineDPO's) pairs: candidates of the round's prompts, ranked, best against worst."""
        mine = prompts[self.dist.rank :: self.dist.world_size]
        self.log(f"round {r}: {len(prompts)} prompts x {self.sail.candidates} candidates"
                 + (f", dealt round-robin to {self.dist.world_size} ranks" if self.dist.enabled else ""))
        latents = self._candidates(stage, r, mine, policy)
        reference = self.base if self.sail.reference == "base" else previous
        rewards, win, lose = self._rank(r, mine, latents, policy, reference)
        rewards, win, lose, keep, _ = drop_non_finite(rewards, latents, win, lose, best_worst=self.sail.pairing == "best_worst")
        labels = soft_labels(rewards, win, lose, self.sail.soft_label_temperature) if self.sail.soft_labels else None
        gathered, order = self._gather_in_order(self._pairs(mine, latents, win, lose, labels), mine, rewards, keep)
        all_rewards = torch.cat([g[2] for g in gathered])[order]
        all_keep = torch.cat([g[3] for g in gathered])[order]
        # Prompts left with fewer than two finite candidates give no pair (counted and logged).
        pairs = LatentPairs.cat([g[0] for g in gathered]).subset(order[all_keep].tolist())
        all_prompts = [p for g in gathered for p in g[1]]
        dropped = int((~torch.isfinite(all_rewards)).sum())
        if dropped:
            self.log(f"round {r}: WARNING {dropped} candidates had a non-finite reward or latent and were dropped; "
                     f"{int((~all_keep).sum())} prompts were left without a pair")
        finite = all_rewards[all_keep]
        spread = (finite.nan_to_num(float("-inf")).max(1).values - finite.nan_to_num(float("inf")).min(1).values)
        ranking = {
            "prompts": [all_prompts[i] for i in order.tolist()],
            "rewards": [[v if math.isfinite(v) else None for v in row] for row in all_rewards.tolist()],
            "dropped_candidates": dropped, "prompts_without_pair": int((~all_keep).sum()),
            "reward_spread_mean": float(spread.mean()), "reward_spread_std": float(spread.std()) if len(spread) > 1 else 0.0,
            "reward_std_within_prompt": float(torch.stack([row[torch.isfinite(row)].std() for row in finite]).mean())
            if len(finite) else float("nan"),
            "diversity": sample_diversity(latents), "reference": self.sail.reference, "pairing": self.sail.pairing,
            "ranker": self.sail.ranker_metric if self.sail.ranker == "external" else "implicit",
            "labels": pairs.label.tolist(),
        }
        if self.dist.is_main:
            write_json(stage / "ranking.json", ranking)
            self._candidate_grid(stage / "candidates.png", mine, latents, rewards, win, lose)
        self.log(f"round {r}: {len(pairs)} ranked pairs; reward spread {ranking['reward_spread_mean']:.3g} "
                 f"(mean best - worst per prompt)")
        return pairs

    def _real_pairs(self, stage: Path, r: int, policy) -> LatentPairs:
        """RealAlign's pairs: this round's slice of the real images, each against its loser."""
        per = self.sail.real_per_round()
        positions = list(range((r - 1) * per, r * per))[self.dist.rank :: self.dist.world_size]
        part = self.real_set.subset(positions)
        if self.sail.real.loser in PER_ROUND_LOSERS:
            part = dataclasses.replace(part, lose=self._real_losers(stage, r, part, positions, policy))
        gathered, order = self._gather_in_order(part)
        pairs = LatentPairs.cat([g[0] for g in gathered]).subset(order)
        if self.dist.is_main:
            self._real_grid(stage / "real_pairs.png", pairs)
        self.log(f"round {r}: {len(pairs)} real pairs (RealAlign, loser: {self.sail.real.loser})")
        return pairs

    def _gather_in_order(self, *parts):
        """Every rank's ``parts`` and the permutation that puts their concatenation back into round
        order (rank k holds items k, k + W, ...), so training sees the same data whatever the rank count."""
        gathered = self.dist.gather_objects(parts)
        world = self.dist.world_size
        order = torch.tensor([k + i * world for k, g in enumerate(gathered) for i in range(len(g[0]))]).argsort()
        return gathered, order

    # ------------------------------------------------------------------ round parts
    def _candidates(self, stage: Path, r: int, prompts: list[str], policy) -> torch.Tensor:
        """N latents per prompt from the current policy, saved so a resumed round skips sampling."""
        file = stage / f"candidates.rank{self.dist.rank}.safetensors"
        if file.exists():
            return load_file(file)["latents"]
        # Each candidate's seed is a function of (seed, round, its prompt's place in the round):
        # the round samples the same candidates whatever the number of ranks.
        seeds = torch.tensor([[derive_seed(self.config.seed, 8100 + r, self._global(i), n) for n in range(self.sail.candidates)]
                              for i in range(len(prompts))], dtype=torch.int64).view(len(prompts), self.sail.candidates)
        latents = generate_candidates(self._stack_with(policy), prompts, self.sail.candidates, seeds=seeds,
                                      batch_size=self.sail.generation_batch, progress=self.progress, **self.sampling).latents
        tmp = file.with_name(file.name + ".tmp")
        save_file({"latents": latents.contiguous()}, tmp)
        tmp.replace(file)
        return latents

    def _global(self, i: int) -> int:
        """The round-wide position of this rank's i-th prompt (prompts are dealt round-robin)."""
        return self.dist.rank + i * self.dist.world_size

    def _rank(self, r: int, prompts: list[str], latents: torch.Tensor, policy, reference):
        """Scores [P, N] of every candidate (implicit rewards, or the external ranker's), and the
        (winner, loser) index per prompt."""
        if self.sail.ranker == "external":
            scores = external_scores(self.ranker, self.stack, prompts, latents, batch_size=self.sail.generation_batch)
            if self.sail.pairing == "best_worst":
                return scores, scores.argmax(1), scores.argmin(1)
            return scores, *self._random_pairs(r, list(range(len(prompts))), scores)
        scorer = ImplicitRewardScorer(policy, reference, self.stack.scheduler, beta=self.config.train.beta,
                                      num_draws=self.sail.num_draws, micro_batch=self.sail.scoring_batch,
                                      compile=self.sail.compile)
        embeds = self.stack.encode_prompts(prompts)
        height, width = latents.shape[-2:]
        chunk = max(1, self.sail.scoring_batch // (self.sail.candidates * self.sail.num_draws))
        rewards, win, lose = [], [], []
        for start in tqdm(range(0, len(prompts), chunk), desc=f"round {r} rank", unit="chunk", disable=not self.progress):
            idx = list(range(start, min(start + chunk, len(prompts))))
            draws = self._draws(r, idx, latents.shape[2:], scorer)
            part = embeds.index(idx).to(self.device, scorer.dtype)
            added = self.stack.added_cond_kwargs(part, height, width)
            chosen = scorer.best_worst(latents[idx].to(self.device), part.prompt_embeds, added_cond_kwargs=added,
                                       timesteps=draws.timesteps, noise=draws.noise,
                                       adaptive=self.sail.adaptive and self.sail.pairing == "best_worst")
            rewards.append(chosen.rewards.float().cpu())
            if self.sail.pairing == "best_worst":
                win.append(chosen.best.cpu())
                lose.append(chosen.worst.cpu())
            else:
                w, lo = self._random_pairs(r, idx, chosen.rewards.float().cpu())
                win.append(w)
                lose.append(lo)
        return torch.cat(rewards), torch.cat(win), torch.cat(lose)

    def _draws(self, r: int, idx: list[int], latent_shape, scorer: ImplicitRewardScorer) -> Draws:
        """K draws per prompt, a function of (seed, round, the prompt's global position) only."""
        per_prompt = [
            scorer.sample_draws(1, tuple(latent_shape), generator=torch.Generator().manual_seed(
                derive_seed(self.config.seed, 8200 + r, self._global(i))))
            for i in idx
        ]
        return Draws(torch.cat([d.timesteps for d in per_prompt]), torch.cat([d.noise for d in per_prompt]))

    def _random_pairs(self, r: int, idx: list[int], rewards: torch.Tensor):
        """The ablation: two random candidates per prompt, ordered by their implicit reward."""
        win, lose = [], []
        for row, i in enumerate(idx):
            gen = torch.Generator().manual_seed(derive_seed(self.config.seed, 8300 + r, self._global(i)))
            a, b = torch.randperm(self.sail.candidates, generator=gen)[:2].tolist()
            if rewards[row, b] > rewards[row, a]:
                a, b = b, a
            win.append(a)
            lose.append(b)
        return torch.tensor(win), torch.tensor(lose)

    def _real_losers(self, stage: Path, r: int, part: LatentPairs, positions: list[int], policy) -> torch.Tensor:
        """The round policy's losers for real pairs (its own sample, or the real latent with a redrawn
        region), seeded by (seed, round, position) and saved so a resumed round does not redraw them."""
        file = stage / f"real_losers.rank{self.dist.rank}.safetensors"
        if file.exists():
            return load_file(file)["latents"]
        real = self.sail.real
        caps = captions(part)
        seeds = torch.tensor([derive_seed(self.config.seed, 8400 + r, p) for p in positions], dtype=torch.int64)
        stack = self._stack_with(policy)
        height, width = part.win.shape[-2:]
        if real.loser == "own_sample":
            latents = generate_candidates(stack, caps, 1, seeds=seeds.view(-1, 1), height=height, width=width,
                                          batch_size=self.sail.generation_batch, progress=self.progress,
                                          **self.sampling).latents[:, 0]
        else:
            masks = region_masks(height, width, real.mask_fraction,
                                 [derive_seed(self.config.seed, 8500 + r, p) for p in positions])
            latents = regenerate_region(stack, part.win, caps, masks, strength=real.renoise_strength, seeds=seeds,
                                        batch_size=self.sail.generation_batch, progress=self.progress, **self.sampling)
        tmp = file.with_name(file.name + ".tmp")
        save_file({"latents": latents.contiguous()}, tmp)
        tmp.replace(file)
        return latents

    def _real_grid(self, path: Path, pairs: LatentPairs) -> None:
        rows = min(self.sail.grid_prompts, len(pairs))
        images = self._pictures(torch.stack([pairs.win[:rows], pairs.lose[:rows]], dim=1).flatten(0, 1).float())
        if images is not None:
            loser = {"own_sample": "sample", "masked_renoise": "redrawn"}.get(self.sail.real.loser, self.sail.real.loser)
            image_grid(images, columns=2, captions=["real", loser] * rows).save(path)

    def _pairs(self, prompts: list[str], latents: torch.Tensor, win: torch.Tensor, lose: torch.Tensor,
               labels: torch.Tensor | None = None) -> LatentPairs:
        rows = torch.arange(len(prompts))
        embeds = self.stack.encode_prompts(list(prompts) + [""]).to("cpu", torch.float32)
        time_ids = None
        if self.stack.is_sdxl:
            h, w = (s * self.stack.vae_scale_factor for s in latents.shape[-2:])
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32).expand(len(prompts), 6).clone()
        return LatentPairs(
            win=latents[rows, win].float(), lose=latents[rows, lose].float(), prompt_index=rows.clone(),
            prompts=list(prompts) + [""], prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
            time_ids_win=time_ids, time_ids_lose=None if time_ids is None else time_ids.clone(),
            label=torch.ones(len(prompts)) if labels is None else labels.float().cpu(),
            source=["online_dpo" if self.sail.ranker == "external" else "sail"] * len(prompts),
        )

    # ------------------------------------------------------------------ pictures and metrics
    def _pictures(self, latents: torch.Tensor) -> list | None:
        """PIL images of latents [B, C, H, W], enlarged to at least 64 px; None without a decoder."""
        if self.stack.vae is None and self.stack.latent_channels not in (1, 3):
            return None  # a latent-space model loaded without its VAE: nothing to look at
        return enlarge(decode_latents(latents, self.stack.vae))

    def _candidate_grid(self, path: Path, prompts, latents, rewards, win, lose) -> None:
        rows = min(self.sail.grid_prompts, len(prompts))
        order = rewards[:rows].argsort(dim=1, descending=True)  # each row best to worst
        picked = torch.stack([latents[p, order[p]] for p in range(rows)]).flatten(0, 1)
        images = self._pictures(picked)
        if images is None:
            return
        captions = []
        for p in range(rows):
            for k, n in enumerate(order[p].tolist()):
                mark = "W " if n == int(win[p]) else "L " if n == int(lose[p]) else ""
                captions.append((f"{prompts[p]}: " if k == 0 else "") + f"{mark}{rewards[p, n]:+.2f}")
        image_grid(images, columns=latents.shape[1], captions=captions).save(path)

    @torch.no_grad()
    def evaluate(self, name: str, unet, heldout: LatentPairs | None) -> dict:
        """A stage's metrics: fixed-seed samples on the eval prompts, self-label agreement, oracle (toy)."""
        path = self.out / name / "eval.json"
        if path.exists():
            return read_json(path)
        prompts = self._eval_prompts()
        n = self.sail.eval_images_per_prompt
        # The same seeds at every stage, so stages differ only by their weights.
        latents = generate_candidates(self._stack_with(unet), prompts, n, seed=derive_seed(self.config.seed, 9000),
                                      batch_size=self.sail.generation_batch, progress=self.progress, **self.sampling).latents
        metrics = {"stage": name, "diversity": sample_diversity(latents)}
        if heldout is not None and unet is not self.base:
            scorer = ImplicitRewardScorer(unet, self.base, self.stack.scheduler, beta=self.config.train.beta,
                                          num_draws=self.sail.num_draws, micro_batch=self.sail.scoring_batch,
                                          compile=self.sail.compile)
            metrics["self_label_agreement"] = scorer.pair_accuracy(
                heldout, generator=torch.Generator().manual_seed(derive_seed(self.config.seed, 9001)))
        samples = None
        if self.oracle is not None:
            from .toy import oracle_samples, oracle_summary

            samples = oracle_samples(self.oracle, latents, prompts)
            metrics |= oracle_summary(samples, prompts) | self._paired(name, samples)
        if self.dist.is_main:
            images = self._pictures(latents[: min(10, len(prompts))].flatten(0, 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            if images is not None:
                shown = [f"{prompts[i // n]} ({name})" for i in range(len(images))]
                image_grid(images, columns=n, captions=shown).save(path.with_name("samples.png"))
            if samples is not None:  # per-sample tables: later stages pair their scores with these
                tmp = path.with_name("eval_samples.tmp")
                save_file({"latents": latents.contiguous()} | samples, tmp)
                tmp.replace(path.with_name(EVAL_SAMPLES))
            write_json(path, metrics)
        self.dist.barrier()
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        self.log(f"{name}: {shown}")
        return metrics

    def _paired(self, name: str, samples: dict[str, torch.Tensor]) -> dict:
        """Paired differences (mean, prompt-clustered SE) of every term against the base and iter0,
        which were sampled on the same prompts with the same seeds."""
        from .paired import paired_difference

        out = {}
        for other in ("base", "iter0"):
            file = self.out / other / EVAL_SAMPLES
            if other == name or not file.exists():
                continue
            theirs = load_file(file)
            out[f"vs_{other}"] = {k: paired_difference(samples[k], theirs[k]) for k in samples}
        return out

    def metric_rows(self) -> list[dict]:
        rows = []
        stages = ["base", "iter0"] + [f"round-{r:02d}" for r in range(1, self.sail.rounds + 1)]
        for i, name in enumerate(stages):
            file = self.out / name / "eval.json"
            if not file.exists():
                continue  # not finished, or not evaluated (sail.eval_each_round: false)
            row = {"stage": name, "round": i - 1} | read_json(file)
            ranking = self.out / name / "ranking.json"
            if ranking.exists():
                info = read_json(ranking)
                row |= {k: info[k] for k in ("reward_spread_mean", "reward_std_within_prompt")}
                row["candidate_diversity"] = info["diversity"]
            rows.append(row)
        return rows

    def write_metrics(self) -> None:
        if not self.dist.is_main:
            return
        rows = self.metric_rows()
        write_json(self.out / "metrics.json", rows)
        plot_curves(rows, self.out / "curves.png")


def plot_curves(rows: list[dict], path: Path) -> None:
    """One panel per metric against the stage (base, iter0, round 1, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("oracle_score", "digit_accuracy", "self_label_agreement", "diversity", "reward_spread_mean")
            if any(k in row for row in rows)]
    if not rows or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [row["round"] for row in rows if key in row]
        ax.plot(xs, [row[key] for row in rows if key in row], marker="o")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("round (-1 = base, 0 = iter0)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
