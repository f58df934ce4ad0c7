"""Typed run configuration: YAML files plus ``--set key=value`` overrides.

Every section forbids unknown keys, so a typo fails at start-up with the key's name,
the closest valid key, and the list of valid ones, instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .yaml_files import YamlError, read_yaml


class Section(BaseModel):
    # Every float finite: YAML reads .inf and .nan, and a string such as 1e309 parses to inf.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    path: str | None = None  # a local diffusers directory or a hub id
    tiny: Literal["sd15", "sdxl"] | None = None  # a tiny random stack (tests, benchmarks)
    toy: bool = False  # the toy world's pretrained digits stack, shipped in the package
    tiny_sample_size: int = Field(16, ge=1)
    tiny_in_channels: int = Field(4, ge=1)
    kind: Literal["sd15", "sdxl"] | None = None  # inferred from the directory when unset
    with_vae: bool = True

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is not None) + (self.tiny is not None) + self.toy != 1:
            raise ValueError(
                "set exactly one of model.path (a diffusers directory or hub id), model.tiny (sd15 or sdxl) "
                "and model.toy (true)"
            )
        return self

    def schedule_length(self) -> int:
        """num_train_timesteps of a local model folder's scheduler; else 1000, as the toy, tiny, SD1.5 and SDXL have."""
        try:
            return int(
                json.loads((Path(self.path) / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]
            )
        except (TypeError, OSError, ValueError, KeyError):  # no path, a hub id; a damaged file fails as the model loads
            return 1000


class DataConfig(Section):
    seed_pairs: list[str] = []  # pairs.jsonl files, Pick-a-Pic parquet files/dirs, or latent shard files/dirs
    max_seed_pairs: int | None = Field(None, ge=1)  # keep the first N pairs (after dropping ties)
    resolution: int = Field(512, ge=1, le=4096)  # pixels fed to the VAE (latent side = resolution / vae scale factor)
    flip: Literal["none", "random", "always"] = "none"
    caption_dropout: float = Field(0.0, ge=0, le=1)  # probability of training a pair on the empty prompt
    cache_dir: str | None = None  # where encoded latents are cached (default: <output_dir>/cache)
    encode_batch_size: int = Field(16, ge=1)


class LoraSettings(Section):
    """Train a LoRA adapter (peft) instead of every UNet weight; the reference is the same UNet with
    other adapter states, so no second UNet exists (``sail_fast.diffusion.lora``)."""

    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0)  # default: the rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections


class TrainConfig(Section):
    loss: Literal["sigmoid", "smpo", "hinge", "ipo", "dmpo", "dspo", "dro", "sft", "mapo"] = "sigmoid"  # dpo/losses.py
    beta: float = Field(5000.0, gt=0)
    mapo_gamma: float = 0.1
    smpo_scale: float = Field(10.0, gt=0)  # SmPO-Diffusion's factor beside beta: -logsigmoid(scale (2p - 1) u)
    dmpo_alpha: float = Field(0.01, ge=0, lt=1)  # DMPO's target Bernoulli is 1 - alpha (Diffusion-SDPO's scripts: 0.01)
    dro_margin: float = Field(0.001, ge=0)  # Diffusion-DRO's hinge margin (RealAlign stage 1)
    dspo_form: Literal["sd15", "sdxl"] | None = None  # Diffusion-SDPO's DSPO differs by model; None: the model's kind
    # SDPO: scale the loser's gradient so no step raises the winner's loss; mu in [0, 1] (None: off).
    winner_preserving_mu: float | None = Field(None, ge=0, le=1)
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)  # 0 would clip every gradient to nothing
    warmup_steps: int = Field(0, ge=0)
    steps: int = Field(100, ge=1)  # optimizer steps
    pairs_per_step: int = Field(128, ge=1, le=65536)  # effective batch, across ranks and accumulation (paper: 128)
    micro_batch_pairs: int = Field(8, ge=1, le=65536)  # pairs per rank per forward
    mixup_alpha: float = Field(0.25, ge=0, le=1)  # fraction of each batch from generated pairs (when there are any)
    # forward: x_t from random noise (Diffusion-DPO). ddim_inversion: x_t from a few-step ReNoise
    # DDIM inversion of x_0 with the policy, eps recovered from x_t and x_0 (SmPO-Diffusion).
    noising: Literal["forward", "ddim_inversion"] = "forward"
    inversion_steps: int | None = Field(None, ge=1)  # default: SmPO-Diffusion's 5 for SD1.5, 10 for SDXL
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # the newest N are kept
    log_every: int = Field(1, ge=1)
    deepspeed: str | None = None  # a DeepSpeed JSON config (ZeRO stage etc.); batch sizes are filled in
    lora: LoraSettings | None = None  # absent: full fine-tuning
    progress: bool = True

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _plain_precision(cls, value):
        # YAML reads a bare `no` as False; accept it (and "no") for full precision.
        return "fp32" if value in (False, None, "no") else value

    @model_validator(mode="after")
    def _combinations(self):
        if self.winner_preserving_mu is not None and self.loss in ("sft", "mapo"):
            raise ValueError(
                f"train.winner_preserving_mu scales the loser's gradient in the DPO logit; train.loss="
                f"{self.loss!r} has no reference and no logit. Unset one of them"
            )
        if self.lora is not None and self.ema_decay is not None:
            raise ValueError(
                "train.ema_decay is not supported with train.lora (the EMA would cover the frozen base "
                "weights too); unset one of them"
            )
        return self


RealLoser = Literal["own_sample", "blur", "noise", "masked_renoise", "inpaint"]  # see sail_fast.sail.realalign
Sampler = Literal["ddpm", "ddim", "dpmsolver"]  # dpmsolver: DPM-Solver++ multistep (sail_fast.diffusion.sampling)


class RealAlignConfig(Section):
    """RealAlign's pairs: a real image (winner) against a loser made for its caption (``sail_fast.sail.realalign``)."""

    # A folder of images with captions (metadata.jsonl, or a .txt beside each image) or parquet
    # (image and caption columns). The toy world writes real MNIST digits when this is unset.
    data: str | None = None
    loser: RealLoser = "own_sample"
    per_round: int | None = Field(
        None, ge=1
    )  # real pairs per round, disjoint across rounds (default sail.prompts_per_round)
    blur_sigma: float = Field(2.0, gt=0)  # pixels at data.resolution
    noise_std: float = Field(0.2, gt=0)  # pixels in [-1, 1]
    mask_fraction: float = Field(0.25, gt=0, le=1)  # area of the redrawn rectangle (masked_renoise)
    renoise_strength: float = Field(
        0.6, gt=0, le=1
    )  # how far towards noise the rectangle is taken before it is redrawn
    # inpaint (RealAlign's loser): the salient subject redrawn. The soft mask [0, 1] (1 = redraw) comes from
    # a folder of masks named as the images, or 'path/to/file.py:function' (pixels [B, C, H, W] in [-1, 1]
    # -> masks [B, 1, H, W]); unset: the world's own (the toy world: the stroke dilated by one pixel).
    mask: str | None = None
    # Who redraws the masked subject: unset, the round's policy (SDEdit inside the mask from inpaint_strength);
    # or a local diffusers inpainting pipeline directory, once, when the real images are encoded.
    inpaint_pipeline: str | None = None
    inpaint_steps: int = Field(50, ge=1)  # the pipeline's steps (RealAlign: 50)
    inpaint_strength: float = Field(1.0, gt=0, le=1)  # 1: the subject is redrawn from pure noise
    # The policy's own samples (own_sample, inpaint by the policy) use these sampler settings when set, else
    # sail.sampler/...; RealAlign's replay buffer samples with DPM-Solver++ 20 steps, CFG 1.
    sampler: Sampler | None = None
    sampling_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    # Filters (RealAlign's data curation): a metric scores real images and losers (sail_fast.metrics name).
    filter_metric: str | None = None
    filter_weights: str | None = None  # the metric's local weights (the toy metrics default to the shipped model)
    top_k: int | None = Field(None, ge=1)  # keep the k real images the metric scores highest (RealAlign: 512)
    min_margin: float | None = None  # keep pairs with score(real) - score(loser) > this (RealAlign, PickScore: 0.02)
    disjoint: bool = True  # each round its own real images; false: every round the same per_round images (RealAlign)

    def sampling(self, fallback: dict) -> dict:
        """The sampler settings of the policy's losers: these, else the run's."""
        mine = {
            "sampler": self.sampler,
            "num_inference_steps": self.sampling_steps,
            "guidance_scale": self.guidance_scale,
        }
        return {k: fallback[k] if v is None else v for k, v in mine.items()}

    @model_validator(mode="after")
    def _ranges(self):
        if (self.top_k is not None or self.min_margin is not None) and self.filter_metric is None:
            raise ValueError(
                "sail.real.top_k and sail.real.min_margin score images with sail.real.filter_metric "
                "(e.g. pickscore, or toy_oracle in the toy world); set it"
            )
        if self.filter_metric is not None:
            from ..metrics import METRICS

            if self.filter_metric not in METRICS:
                raise ValueError(
                    f"sail.real.filter_metric {self.filter_metric!r} is not a metric; choose from {', '.join(METRICS)}"
                )
        return self


class SailConfig(Section):
    """The SAIL rounds; a config without this section trains one Diffusion-DPO stage."""

    # T rounds after iter0. At most 1000: a typo's extra zeros fail at load (the rounds' configs are built then).
    rounds: int = Field(3, ge=0, le=1000)
    prompts: str | None = None  # a .txt (one prompt per line) or .json list; the toy world has its own
    prompts_per_round: int = Field(10000, ge=1)  # disjoint across rounds
    candidates: int = Field(8, ge=2)  # N per prompt (a pair needs a best and a worst)
    num_draws: int = Field(10, ge=1)  # K shared (t, eps) draws per prompt for the implicit reward
    ranking_reference: Literal["base", "previous"] = "base"  # what the implicit reward ranks against
    # Rank every round's candidates with iter0's implicit reward, frozen (a judge fitted to the human seed alone;
    # bench/results/round_choice_plan.md), instead of the reward of the policy that sampled them (the paper's).
    frozen_judge: bool = False
    pairing: Literal["best_worst", "random"] = "best_worst"  # random: the ablation
    adaptive: bool = False  # race candidates for best/worst instead of spending all K draws
    # How per-draw errors become the reward (sail_fast.reward.estimators): mean (the paper's), standardised,
    # ref_normalised or rank; and the band [lo, hi) the draws' t comes from (default: every training step).
    reward_estimator: Literal["mean", "standardised", "ref_normalised", "rank"] = "mean"
    reward_timesteps: tuple[int, int] | None = None
    sampler: Sampler | None = None  # default: the paper's for the model kind
    sampling_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    generation_batch: int = Field(64, ge=1)  # candidates per UNet call
    scoring_batch: int = Field(256, ge=1)  # noised latents per UNet call
    # torch.compile the UNets that generate and score (worth it at SD sizes; compiling costs
    # about a minute per graph on a CPU, paid again for each new batch shape).
    compile: bool = False
    # DPO steps of iter0 (default train.steps); 0: no iter0, the rounds start from the base model and
    # data.seed_pairs may be empty (RealAlign trains on real images alone).
    iter0_steps: int | None = Field(None, ge=0)
    round_steps: int | None = Field(None, ge=1)  # DPO steps of each round (default train.steps)
    iter0_from: str | None = None  # reuse a finished iter0 stage directory (ablations share one)
    heldout_pairs: list[str] = []  # human pairs for self-label agreement (toy: written by the run)
    # Without heldout_pairs: hold this many of the seed pairs out of training (a seeded draw, the same on resume)
    # as the round score's held-out pairs, so sail.select's held-out guard has pairs to read.
    heldout_split: int = Field(0, ge=0)
    eval_prompts: int = Field(50, ge=1)  # prompts sampled for each stage's evaluation
    eval_each_round: bool = True  # false: evaluate base, iter0 and the last round only (ablations)
    eval_images_per_prompt: int = Field(4, ge=1)
    # With a judge (the toy): how well each stage's reward ranks its own evaluation samples (label_accuracy, ...),
    # a diagnostic that costs a quarter of a toy stage's evaluation; `toy transfer` turns it off.
    eval_label_quality: bool = True
    # Which stage the run keeps (sail_fast.sail.selection, from the round score alone; chosen.json): guarded, the
    # last of the unbroken run of sound stages (prompt kept, held-out accuracy above chance); loss, the lowest
    # held-out DPO loss against the base; agreement, within guarded's sound run the stage whose reward best agrees
    # with the held-out human pairs (tested on seed 2: no better than guarded); paired, guarded with the prompt test
    # as a paired drop beyond 2 SE (tested on seed 3: no better than guarded); tested, guarded with the prompt test
    # on the base's prompt choice paired by prompt and the held-out test against chance at 2 SE (addendum 9, under
    # test); last, the last round (the paper's).
    select: Literal["guarded", "paired", "tested", "loss", "agreement", "last"] = "guarded"
    # End the rounds after a round that is not sound (select: loss, also after `patience` rounds without a lower
    # held-out loss). Needs every round evaluated (off with eval_each_round: false).
    early_stop: bool = True
    patience: int = Field(1, ge=1)
    # Keep, instead of the stage select picks, the uniform weight average of iter0 up to it (sail_fast.sail.soup,
    # the stage soup-00-0k); off until its planned test on unseen seeds and preferences has been read
    # (bench/results/round_choice_plan.md, addendum 12).
    soup: bool = False
    grid_prompts: int = Field(8, ge=1)  # rows of the per-round candidate grid
    # OnlineDPO (the paper's Table 4 baseline): an external reward model ranks the candidates.
    ranker: Literal["implicit", "external"] = "implicit"
    ranker_metric: str | None = None  # a sail_fast.metrics name: toy_oracle, aesthetic, pickscore, hpsv2, ...
    ranker_weights: str | None = None  # its local weights (the toy metrics default to the shipped model)
    # SmPO-style smoothing: each pair's label p comes from the ranking scores (implicit rewards give
    # smoothed self-labels); needs train.loss: smpo. p = sigmoid((n_win - n_lose) / temperature), a
    # two-way softmax over normalised scores n: "zscore" over the prompt's candidates, or "minmax",
    # SmPO-Diffusion's fixed (s - lo) / (hi - lo) with soft_label_range = [lo, hi] in the ranker's
    # units. Default: minmax with the authors' range when PickScore ranks, zscore otherwise.
    soft_labels: bool = False
    soft_label_temperature: float = Field(1.0, gt=0)
    soft_label_norm: Literal["zscore", "minmax"] | None = None
    soft_label_range: tuple[float, float] | None = None  # default for minmax: the ranker metric's published range
    # Where each round's pairs come from: "self" (the ranked candidates: SAIL, or OnlineDPO with an
    # external ranker) and/or "real" (RealAlign: real images beat losers made for their captions).
    pair_sources: list[Literal["self", "real"]] = ["self"]
    real: RealAlignConfig = RealAlignConfig()
    # What each round's DPO is held to: the base model (the default: the reference the implicit reward and the
    # round score measure against, so the rounds' moves add up under one reference; bench/results/
    # round_choice_plan.md), or the policy as the round starts (the paper's SAIL).
    training_reference: Literal["round_start", "base"] = "base"
    # Rounds that differ, as --set overrides of train.* and sail.* keys: {round: ["train.loss=sigmoid", ...]}
    # (RealAlign's stage 2 is a last round of Diffusion-DPO on inpainted losers; configs/realalign-sd15.yaml).
    round_overrides: dict[int, list[str]] = {}

    def sampling(self) -> dict:
        """The sampler settings as generate_candidates takes them (None: the paper's default)."""
        return {
            "sampler": self.sampler,
            "num_inference_steps": self.sampling_steps,
            "guidance_scale": self.guidance_scale,
        }

    @model_validator(mode="after")
    def _one_heldout_source(self):
        if self.heldout_split and self.heldout_pairs:
            raise ValueError(
                "sail.heldout_split holds seed pairs out as the held-out pairs, but sail.heldout_pairs names them "
                "already; set one of them (heldout_split: 0 or heldout_pairs: [])"
            )
        return self

    @model_validator(mode="after")
    def _sizes(self):
        if self.ranker == "external" and not self.ranker_metric:
            raise ValueError("sail.ranker: external needs sail.ranker_metric (e.g. toy_oracle, aesthetic, pickscore)")
        if self.ranker_metric is not None:
            from ..metrics import METRICS

            if self.ranker_metric not in METRICS:
                raise ValueError(
                    f"sail.ranker_metric {self.ranker_metric!r} is not a metric; choose from {', '.join(METRICS)}"
                )
        if self.reward_timesteps is not None and not 0 <= self.reward_timesteps[0] < self.reward_timesteps[1]:
            raise ValueError(
                f"sail.reward_timesteps must be [lo, hi) with 0 <= lo < hi, got {list(self.reward_timesteps)}"
            )
        if self.adaptive and self.reward_estimator != "mean":
            raise ValueError(
                f"sail.adaptive races with the mean estimator only; set sail.reward_estimator: mean "
                f"or sail.adaptive: false (got {self.reward_estimator})"
            )
        if self.frozen_judge and self.ranker == "external":
            raise ValueError(
                "sail.frozen_judge picks whose implicit reward ranks; sail.ranker: external ranks with "
                f"{self.ranker_metric} instead. Set one of them back (frozen_judge: false or ranker: implicit)"
            )
        if self.frozen_judge and self.iter0_steps == 0 and self.iter0_from is None:
            raise ValueError(
                "sail.frozen_judge with sail.iter0_steps: 0 ranks with the base against itself (every reward is "
                "zero); train iter0 (iter0_steps > 0 or iter0_from) or set frozen_judge: false"
            )
        if self.soft_label_range is not None and not self.soft_label_range[0] < self.soft_label_range[1]:
            raise ValueError(f"sail.soft_label_range must be [lo, hi] with lo < hi, got {list(self.soft_label_range)}")
        if self.label_norm() == "minmax" and self.soft_label_range is None and not self._ranked_by_pickscore():
            raise ValueError(
                "sail.soft_label_norm: minmax needs sail.soft_label_range: [lo, hi] in the ranker's score "
                "units (only PickScore ships a published range)"
            )
        if any(not 1 <= r <= self.rounds for r in self.round_overrides):
            raise ValueError(
                f"sail.round_overrides names rounds {sorted(self.round_overrides)}; rounds run 1..{self.rounds}"
            )
        if self.early_stop and not self.eval_each_round:
            if "early_stop" in self.model_fields_set:  # asked for in so many words: say why it cannot be
                raise ValueError(
                    "sail.early_stop reads every round's score; set sail.eval_each_round: true or sail.early_stop: false"
                )
            self.early_stop = False  # the default, where rounds are not all scored: every round runs
        if not self.pair_sources or len(set(self.pair_sources)) != len(self.pair_sources):
            raise ValueError(f"sail.pair_sources must list self and/or real once each, got {self.pair_sources}")
        return self

    def scorer_options(self) -> dict:
        """The implicit-reward scorer's estimator settings (``ImplicitRewardScorer`` keywords)."""
        return {"estimator": self.reward_estimator, "timestep_range": self.reward_timesteps}

    def _ranked_by_pickscore(self) -> bool:
        return self.ranker == "external" and self.ranker_metric == "pickscore"

    def label_norm(self) -> str:
        """How soft labels normalise scores: as set, else SmPO's published minmax for PickScore, else zscore."""
        return self.soft_label_norm or ("minmax" if self._ranked_by_pickscore() else "zscore")

    def real_per_round(self) -> int:
        return self.real.per_round or self.prompts_per_round

    def real_images_needed(self) -> int:
        return self.real_per_round() * (self.rounds if self.real.disjoint else 1)


class ToyConfig(Section):
    """The toy world's hidden human: how many pairs it labels and how noisily."""

    labelled_pairs: int = Field(800, ge=1)  # the full labelled set (what 100%-label DPO trains on)
    seed_fraction: float = Field(0.06, gt=0, le=1)  # SAIL's seed: this fraction of the labelled set
    heldout_pairs: int = Field(100, ge=1)  # extra labelled pairs for self-label agreement
    # Bradley-Terry rater noise (default: the calibrated toy.human.TEMPERATURE); auto: set from the labelled
    # base-model pairs so labels agree with the noiseless preference 72.5% of the time, as the built-in one was.
    temperature: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None
    # Replace the built-in human preference everywhere (labelling, evaluation, the toy_oracle ranker):
    # 'path/to/file.py:function', a callable (images [B, H, W] in [0, 1], digits [B] int) -> scores [B].
    preference: str | None = None
    train_on: Literal["seed", "all"] = "seed"  # all: the full-label Diffusion-DPO baseline
    data_dir: str | None = None  # where the labelled pairs live (default <output_dir>/human; share it across runs)


class RunConfig(Section):
    output_dir: str = "runs/default"
    seed: int = Field(0, ge=0, lt=2**63)  # torch generators take 64 bits; numpy's SeedSequence refuses negatives
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sail: SailConfig | None = None
    toy: ToyConfig | None = None

    @model_validator(mode="after")
    def _cross_section_rules(self):
        # Settings a SAIL run would silently ignore are refused instead.
        if self.sail is not None and self.train.ema_decay is not None:
            raise ValueError(
                "train.ema_decay writes an EMA twin (final/unet_ema) that no SAIL round reads: each round "
                "trains the policy itself. Unset it, or use `sail-fast train` for one stage with an EMA"
            )
        if (
            self.sail is not None
            and self.sail.adaptive
            and (self.sail.pairing != "best_worst" or self.sail.ranker != "implicit")
        ):
            raise ValueError(
                "sail.adaptive races candidates for best and worst by their implicit reward; it needs "
                "sail.pairing: best_worst and sail.ranker: implicit"
            )
        if self.sail is not None and "real" in self.sail.pair_sources and self.data.flip != "none":
            raise ValueError(
                f"data.flip={self.data.flip!r} is not applied to RealAlign's real images; set data.flip: none "
                "for a run with sail.pair_sources: real"
            )
        if self.sail is not None and self.model.toy and self.sail.prompts is not None:
            raise ValueError(
                f"sail.prompts={self.sail.prompts!r} is set, but the toy world draws its rounds' prompts from "
                "its own digit prompts; unset sail.prompts"
            )
        if self.toy is not None and not self.model.toy:
            raise ValueError("the toy: section needs model.toy: true (its oracle judges the toy digits)")
        if self.sail is not None and self.sail.soft_labels and self.train.loss != "smpo":
            raise ValueError(
                f"sail.soft_labels needs train.loss: smpo (the loss that reads soft labels), got {self.train.loss!r}"
            )
        if (
            self.sail is not None
            and "real" in self.sail.pair_sources
            and self.sail.real.data is None
            and not self.model.toy
        ):
            raise ValueError(
                "sail.pair_sources includes real, so set sail.real.data to a folder or parquet of real images "
                "with captions"
            )
        if self.sail is not None and self.sail.iter0_steps != 0 and not self.data.seed_pairs and not self.model.toy:
            raise ValueError(
                "data.seed_pairs is empty; list the human pairs iter0 trains on, or set sail.iter0_steps: 0 "
                "to start the rounds from the base model"
            )
        if self.sail is not None and not self.data.seed_pairs and not self.model.toy and self.train.mixup_alpha != 1:
            raise ValueError(
                f"without data.seed_pairs every batch comes from the rounds' pairs; set train.mixup_alpha: 1 "
                f"(now {self.train.mixup_alpha})"
            )
        rounds = [round_config(self, r) for r in range(1, self.sail.rounds + 1)] if self.sail is not None else []
        if (
            self.sail is not None
            and self.sail.real.inpaint_pipeline
            and "real" in self.sail.pair_sources
            and not any(c.sail.real.loser == "inpaint" for c in rounds)
        ):
            raise ValueError("sail.real.inpaint_pipeline is set, but no round uses sail.real.loser: inpaint")
        timesteps = self.sail.reward_timesteps if self.sail is not None else None
        if timesteps is not None and timesteps[1] > (n := self.model.schedule_length()):
            raise ValueError(
                f"sail.reward_timesteps = {list(timesteps)}: hi must be <= {n}, the model's training schedule "
                "length (num_train_timesteps); draws take t in [lo, hi)"
            )
        return self


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        # `SailConfig | None` -> SailConfig
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# Refused in a config one writes; a config a run recorded before the rename reads under the new name (run_folder).
RENAMED = {"sail.reference": "sail.ranking_reference", "sail.round_reference": "sail.training_reference"}
# Values renamed since: sail.select's first rule (lowest held-out loss) was called auto until guarded became the
# default. Run folders recorded before are read under the new value (run_folder.current_names).
RENAMED_VALUES = {"sail.select": {"auto": "loss"}}


class ConfigError(ValueError):
    """A config that cannot run: the message names the file, the key, the value and the fix."""


def _explain(error: ValidationError, source: str) -> str:
    valid = _valid_keys(RunConfig)
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden" and key in RENAMED:
            lines.append(f"config key '{key}' was renamed '{RENAMED[key]}'; use that")
        elif err["type"] == "extra_forbidden":
            section = key.rpartition(".")[0]
            siblings = [k for k in valid if k.rpartition(".")[0] == section]
            if not section:  # a top-level name: the sections are what one usually meant
                siblings += [
                    f"{name}: ({', '.join(dict.fromkeys(k.split('.')[1] for k in valid if k.startswith(name + '.')))})"
                    for name in dict.fromkeys(k.split(".")[0] for k in valid if "." in k)
                ]
            close = difflib.get_close_matches(key, [*valid, *(s.split(":")[0] for s in siblings)], n=1)
            hint = (
                f"; did you mean '{close[0]}'?"
                if close
                else f"; {section or 'the top level'} has: {', '.join(siblings)}"
            )
            lines.append(f"config key '{key}' does not exist{hint}")
        elif isinstance(err.get("input"), str) and err["input"] in RENAMED_VALUES.get(key, {}):
            lines.append(f"{key}: {err['input']!r} was renamed {RENAMED_VALUES[key][err['input']]!r}; use that")
        elif err["loc"] and not isinstance(err.get("input"), dict):
            lines.append(f"{key} = {err.get('input')!r}: {err['msg'].replace('Value error, ', '')}")
        else:
            msg = err["msg"].replace("Value error, ", "")
            lines.append(f"{key}: {msg}" if key else msg)
    return f"invalid configuration ({source}): " + "; ".join(lines)


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value (e.g. train.steps=10), got {assignment!r}")
    key, raw = assignment.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw)  # YAML typing: 10 -> int, true -> bool, [a, b] -> list


def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start empty, or from a mapping read already), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if isinstance(path, dict):
        data, path = path, None
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; the configs/ directory has the shipped ones")
        try:
            data = read_yaml(path) or {}
        except YamlError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections (model:, data:, train:), got {type(data).__name__}"
            )
    for assignment in overrides or []:
        _apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, str(path) if path else "overrides")) from None


ROUND_KEYS_FIXED = (
    "sail.rounds",
    "sail.prompts",
    "sail.prompts_per_round",
    "sail.pair_sources",
    "sail.iter0",
    "sail.round_overrides",
    "sail.real.data",
    "sail.real.per_round",
    "sail.real.top_k",
    "sail.real.disjoint",
    "sail.real.mask",
    "sail.real.inpaint_pipeline",
    "sail.real.inpaint_steps",
    "sail.heldout_pairs",
    "sail.heldout_split",
    "sail.eval",
    "sail.ranker",
    "train.lora",
)  # read once, before the rounds


def round_config(config: RunConfig, r: int) -> RunConfig:
    """The settings round ``r`` runs with: ``config`` with ``sail.round_overrides[r]`` applied."""
    overrides = config.sail.round_overrides.get(r, []) if config.sail is not None else []
    if not overrides:
        return config
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if not key.startswith(("train.", "sail.")) or key.startswith(ROUND_KEYS_FIXED):
            raise ConfigError(
                f"sail.round_overrides[{r}]: {key!r} cannot change between rounds; a round may change "
                f"train.* and sail.* keys other than {', '.join(ROUND_KEYS_FIXED)}"
            )
    data = config.model_dump(mode="json")
    data["sail"]["round_overrides"] = {}
    for assignment in overrides:
        _apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, f"sail.round_overrides[{r}]")) from None
