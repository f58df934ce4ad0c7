"""The ``sail-fast`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from ..runs.quiet import silence_third_party_noise
from ..toy import PRETRAIN_STEPS
from .arguments import (
    OneLineParser,
    add_config_arguments,
    add_run_arguments,
    finite_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_int,
    user_errors,
)


def _check(args: argparse.Namespace) -> None:
    """Run paired_mse on SD-shaped rows through every backend this machine has."""
    import torch

    from ..kernels import paired_mse, paired_mse_reference, resolve_backend

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    shape = (args.rows, *args.latent)
    gen = torch.Generator().manual_seed(0)
    target, policy, ref = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    expect = paired_mse_reference(target, policy, ref)
    backends = ["torch", "compiled"]
    if resolve_backend(device) == "triton":
        backends.insert(0, "triton")
    bytes_read = 3 * target.numel() * target.element_size()
    print(f"paired_mse on {device}, rows {list(shape)}, {args.dtype}; {bytes_read / 1e6:.1f} MB read per call")
    for backend in backends:
        out = paired_mse(target, policy, ref, backend=backend)  # warm-up (and compile)
        err = max((a - b).abs().max().item() for a, b in zip(out, expect))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            paired_mse(target, policy, ref, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        print(
            f"  {backend:9s} max |diff| vs reference {err:.2e}   {seconds * 1e3:8.2f} ms   {bytes_read / seconds / 1e9:6.1f} GB/s"
        )


def _train(args: argparse.Namespace) -> None:
    from ..runs.config import load_config
    from .train import run_sail, run_training

    config = load_config(args.config, args.set)
    (run_sail if config.sail is not None else run_training)(
        config, resume=args.resume, allow_config_change=args.allow_config_change
    )


def _run(args: argparse.Namespace) -> None:
    from ..runs.config import load_config
    from .train import run_sail

    config = load_config(args.config, args.set)
    if config.sail is None:
        raise SystemExit(f"{args.config} has no sail: section; `sail-fast train` runs a single DPO stage")
    run_sail(config, resume=args.resume, allow_config_change=args.allow_config_change)


def _generate(args: argparse.Namespace) -> None:
    from .generate import generate_to_dir

    written = generate_to_dir(
        args.checkpoint,
        args.prompts,
        args.num_images,
        args.out,
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        compile=args.compile,
    )
    print(f"wrote {written} images to {args.out}")


def _export(args: argparse.Namespace) -> None:
    from .generate import export_unet

    out = export_unet(args.checkpoint, args.out, merge=args.merge)
    print(f"wrote {out}")


def _eval(args: argparse.Namespace) -> None:
    from ..diffusion.prompts import read_prompt_set
    from .evaluate import evaluate, load_metrics

    weights = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--weights takes NAME=PATH (e.g. pickscore=/models/PickScore_v1), got {item!r}")
        weights[name] = path
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    prompt_set = read_prompt_set(args.prompts, args.prompt_set).limit(args.limit)
    # Load every metric before sampling anything, so a missing weights file fails in seconds.
    metrics = load_metrics(names, args.weights_dir, weights, device=args.device)
    result = evaluate(
        args.checkpoint,
        prompt_set,
        metrics,
        args.out,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        save_images=args.save_images,
    )
    print((Path(args.out) / "eval.md").read_text())
    print(f"wrote {Path(args.out) / 'eval.json'} ({len(result['checkpoints'])} checkpoints)")


def _label(args: argparse.Namespace) -> None:
    import torch

    from ..metrics import load_metric
    from .label import label_pairs

    # LO >= HI would invert (or flatten) every label without a word: refused before the metric loads.
    if args.range and not args.range[0] < args.range[1]:
        raise ValueError(
            f"--range: LO must be below HI (the metric's lowest and highest score), got {args.range[0]:g} "
            f"{args.range[1]:g}"
        )
    metric = load_metric(args.metric, args.weights, **({"device": torch.device(args.device)} if args.device else {}))
    out = label_pairs(
        args.pairs,
        metric,
        args.out,
        score_range=tuple(args.range) if args.range else None,
        temperature=args.temperature,
        batch_size=args.batch_size,
    )
    print(f"wrote {out}")


def _toy_pretrain(args: argparse.Namespace) -> None:
    from ..diffusion.stack import TOY_MODEL_DIR
    from ..toy.pretrain import pretrain

    report = pretrain(
        args.out or TOY_MODEL_DIR,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        shipped=args.out is None,
    )
    print(json.dumps(report, indent=2))


def _toy_experiment(args: argparse.Namespace) -> None:
    from ..toy.studies.experiment import CONDITIONS, run_experiment

    if args.table_only:
        from ..runs.config import load_config
        from ..toy.studies.experiment import write_table

        rounds = load_config(args.config, args.set).sail.rounds
        print(write_table(Path(args.out), args.seeds, rounds, args.ablation_rounds or rounds).read_text())
        return
    table = run_experiment(
        args.config,
        args.out,
        args.seeds,
        conditions=args.conditions or CONDITIONS,
        overrides=args.set,
        ablation_rounds=args.ablation_rounds,
    )
    print(table.read_text())


def _toy_transfer(args: argparse.Namespace) -> None:
    from ..toy.studies.sampler_transfer import sampler_transfer

    print(
        sampler_transfer(
            args.out,
            args.seeds,
            args.conditions,
            sampler=args.sampler,
            steps=args.steps,
            images_per_prompt=args.images_per_prompt,
            batch_size=args.batch_size,
            compile=args.compile,
            trust_code=args.trust_code,
        ).read_text()
    )


def _toy_round_choice(args: argparse.Namespace) -> None:
    from ..toy.studies.experiment import LEVERS
    from ..toy.studies.round_choice import round_choice

    if args.condition not in ("sail", *LEVERS):
        raise SystemExit(
            f"--condition {args.condition!r} did not run every round; choose sail or one of {', '.join(LEVERS)}"
        )
    worlds = {}
    for item in args.worlds:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--worlds takes NAME=FOLDER (e.g. built-in=runs/exp-builtin), got {item!r}")
        worlds[name] = Path(folder)
    print(round_choice(worlds, args.seeds, args.rounds, args.variant, args.condition), end="")


def _toy_consistency(args: argparse.Namespace) -> None:
    from ..toy.studies.consistency_backfill import backfill_consistency

    for run in args.runs:
        written = backfill_consistency(run)
        print(f"{run}: {len(written)} stage(s) measured again" + (f" ({', '.join(written)})" if written else ""))


def _toy_calibrate(args: argparse.Namespace) -> None:
    from ..toy.studies.experiment import calibrate

    print(calibrate(args.config, args.out, seed=args.seed, overrides=args.set).read_text())


def _toy_reward_audit(args: argparse.Namespace) -> None:
    from ..toy.studies.reward_audit import reward_audit

    out = reward_audit(
        args.run,
        out=args.out,
        prompts=args.prompts,
        candidates=args.candidates,
        draws=args.draws,
        ks=tuple(args.ks),
        band_k=args.band_k,
        repeats=args.repeats,
        heldout_draws=args.heldout_draws,
        trust_code=args.trust_code,
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _plan(args: argparse.Namespace) -> None:
    from ..runs.config import load_config
    from .plan import format_plan

    config = load_config(args.config, args.set)
    print(format_plan(config.model, config.train, config.data.resolution, args.gpus, args.gpu_memory))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sail-fast",
        description=__doc__,
        epilog="Errors print one line; add --debug anywhere to see the traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check and time the fused paired_mse kernel on SD-shaped latents")
    check.add_argument("--rows", type=positive_int, default=80, help="rows: candidates x draws (default 8 x 10)")
    check.add_argument("--latent", type=positive_int, nargs=3, default=[4, 64, 64], metavar=("C", "H", "W"))
    check.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    check.add_argument("--repeats", type=positive_int, default=10)
    check.set_defaults(func=_check)
    train = sub.add_parser(
        "train",
        help="SAIL (a config with a sail: section) or one Diffusion-DPO stage, "
        "as sail_fast/train.py (which `deepspeed` launches)",
    )
    add_run_arguments(train)
    train.set_defaults(func=_train)

    run = sub.add_parser("run", help="the whole SAIL loop (iter0, then the rounds); default: the offline toy world")
    add_run_arguments(run, config_default="configs/toy.yaml")
    run.set_defaults(func=_run)

    gen = sub.add_parser("generate", help="sample PNGs from a checkpoint")
    gen.add_argument(
        "--checkpoint",
        required=True,
        help="a diffusers pipeline directory, a trained unet/ or lora/ directory inside a run, or a run directory "
        "(the stage it keeps: chosen.json)",
    )
    gen.add_argument("--prompts", required=True, help="prompt file: .txt, .tsv, .json or .parquet")
    gen.add_argument("--num-images", type=positive_int, default=4, help="images per prompt")
    gen.add_argument("--out", required=True, help="directory for the PNGs (and prompts.json)")
    gen.add_argument("--seed", type=seed_int, default=0)
    gen.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver"], default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-scale", type=finite_float, default=None)
    gen.add_argument(
        "--compile",
        action="store_true",
        help="sample with a torch.compile'd UNet (pays off for many images at SD sizes)",
    )
    gen.set_defaults(func=_generate)

    export = sub.add_parser("export", help="a run's policy for plain diffusers: the LoRA folder, or a merged UNet")
    export.add_argument(
        "checkpoint", help="a trained unet/ or lora/ directory inside a run, or a run directory (the stage it keeps)"
    )
    export.add_argument("out", help="a new folder")
    export.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base UNet's weights")
    export.set_defaults(func=_export)

    ev = sub.add_parser("eval", help="sample checkpoints on a prompt set and score them with local-weights metrics")
    ev.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="as for generate; repeat to compare (win rates are against the first)",
    )
    ev.add_argument(
        "--prompts",
        required=True,
        help="a prompt file, the HPSv2 benchmark (style folder or .json), or PartiPrompts .tsv",
    )
    ev.add_argument(
        "--prompt-set",
        choices=["auto", "hpsv2", "parti", "pickapic", "plain"],
        default="auto",
        help="how to read --prompts (hpsv2: per-style means; parti: per-category means)",
    )
    ev.add_argument(
        "--metrics",
        required=True,
        help="comma-separated: pickscore, hpsv2, imagereward, aesthetic, clipscore, toy_oracle, digit_accuracy",
    )
    ev.add_argument("--weights-dir", default=None, help="a folder with one subfolder per metric, named as the metric")
    ev.add_argument(
        "--weights", action="append", default=[], metavar="NAME=PATH", help="one metric's weights (repeatable)"
    )
    ev.add_argument("--out", required=True, help="directory for eval.json, eval.md, sample grids and per-image scores")
    ev.add_argument("--images-per-prompt", type=positive_int, default=1)
    ev.add_argument(
        "--limit", type=positive_int, default=None, help="first N prompts (of each group, for grouped sets)"
    )
    ev.add_argument("--seed", type=seed_int, default=0)
    ev.add_argument(
        "--sampler", choices=["ddpm", "ddim", "dpmsolver"], default=None, help="default: the run's, else the paper's"
    )
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--guidance-scale", type=finite_float, default=None)
    ev.add_argument("--batch-size", type=positive_int, default=16, help="prompts sampled and scored at a time")
    ev.add_argument("--device", default=None, help="device for the metric models (default: cuda when present)")
    ev.add_argument("--save-images", action="store_true", help="also write every picture as PNG")
    ev.set_defaults(func=_eval)

    label = sub.add_parser(
        "label",
        help="SmPO's offline soft labels: order each pair by a metric (PickScore) and "
        "label it p = softmax of min-max normalised scores -> pairs.jsonl",
    )
    label.add_argument("pairs", nargs="+", help="pairs.jsonl files or Pick-a-Pic parquet (files or folders)")
    label.add_argument("--metric", default="pickscore", help="a sail_fast.metrics name (default: pickscore)")
    label.add_argument("--weights", default=None, help="the metric's local weights")
    label.add_argument(
        "--range",
        type=finite_float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="min-max range of the metric's score (default: its published one; PickScore's ships)",
    )
    label.add_argument("--temperature", type=positive_float, default=1.0)
    label.add_argument("--batch-size", type=positive_int, default=16)
    label.add_argument("--device", default=None)
    label.add_argument("--out", required=True, help="the pairs.jsonl to write (images beside it in images/)")
    label.set_defaults(func=_label)

    plan = sub.add_parser("plan", help="per-GPU training memory by optimizer, ZeRO stage and checkpointing")
    add_config_arguments(plan)
    plan.add_argument("--gpus", type=int, default=8)
    plan.add_argument("--gpu-memory", type=finite_float, default=80.0, help="GB per GPU (default 80)")
    plan.set_defaults(func=_plan)

    toy = sub.add_parser("toy", help="the toy digits world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    pre = toy_sub.add_parser("pretrain", help="train the toy base model and the oracle's classifier")
    pre.add_argument("--out", default=None, help="where to write them (default: the package's shipped toy_model/)")
    pre.add_argument(
        "--steps", type=positive_int, default=PRETRAIN_STEPS, help=f"default {PRETRAIN_STEPS}, as the shipped model"
    )
    pre.add_argument("--batch-size", type=positive_int, default=64)
    pre.add_argument("--seed", type=seed_int, default=0)
    pre.set_defaults(func=_toy_pretrain)
    exp = toy_sub.add_parser(
        "experiment", help="SAIL vs full-label DPO and the ablations over seeds: the table in docs/toy_results.md"
    )
    add_config_arguments(exp, config_default="configs/toy.yaml")
    exp.add_argument("--out", default="runs/toy-experiment")
    exp.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2])
    exp.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        help="default: all of them (sail dpo-6 dpo-12 dpo-25 dpo-50 dpo-full no-mixup random-pairs smoothed-self "
        "online-dpo-proxy online-dpo smpo realalign sail-realalign); sail first, the others reuse its iter0",
    )
    exp.add_argument(
        "--ablation-rounds",
        type=positive_int,
        default=None,
        help="rounds of the ablations and other systems (default: as SAIL)",
    )
    exp.add_argument("--table-only", action="store_true", help="rewrite results.md from finished runs, run nothing")
    exp.set_defaults(func=_toy_experiment)
    tr = toy_sub.add_parser(
        "transfer",
        help="evaluate a finished toy experiment's stages again under another sampler "
        "(same prompts and seeds): does the gain carry over?",
    )
    tr.add_argument("out", help="the experiment folder (toy experiment --out)")
    tr.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2])
    tr.add_argument("--conditions", nargs="+", default=["sail", "dpo-6", "dpo-full"])
    tr.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver"], default="ddpm")
    tr.add_argument("--steps", type=positive_int, default=50)
    tr.add_argument(
        "--images-per-prompt", type=positive_int, default=None, help="default: as the run evaluated (toy: 10)"
    )
    tr.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples per UNet call (sail.generation_batch; default: the run's). The samples are the same up to float rounding (each has "
        "its own seed); on one CPU thread the toy UNet runs about 1.2x faster per sample at 64 than at 256",
    )
    tr.add_argument(
        "--compile",
        action="store_true",
        help="sample with a torch.compile'd UNet (sail.compile): about a minute or two to compile once per process "
        "on a CPU, then every stage's policy reuses the graph; the same samples to rounding",
    )
    add_trust_code_argument(tr)
    tr.set_defaults(func=_toy_transfer)
    choice = toy_sub.add_parser(
        "round-choice",
        help="the stage sail.select keeps and where sail.early_stop ends, against the oracle, for toy experiments "
        "whose sail condition ran every round",
    )
    choice.add_argument("--worlds", nargs="+", required=True, help="NAME=FOLDER: a toy experiment --out per world")
    choice.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2])
    choice.add_argument("--rounds", type=positive_int, default=4)
    choice.add_argument("--variant", default="", help="another sampler's evaluation (toy transfer), e.g. ddpm-50")
    choice.add_argument(
        "--condition", default="sail", help="whose rounds are chosen: sail, or a lever run every round (frozen-judge)"
    )
    choice.set_defaults(func=_toy_round_choice)
    backfill = toy_sub.add_parser(
        "consistency",
        help="measure the per-prompt prompt consistency and choice of runs evaluated before eval.json recorded "
        "them, from their stored samples (select: paired and tested read them); writes <stage>/round_score.json",
    )
    backfill.add_argument("runs", nargs="+", help="run folders (a toy experiment's <out>/seed-N/sail)")
    backfill.set_defaults(func=_toy_consistency)
    cal = toy_sub.add_parser(
        "calibrate",
        help="sweep full-label Diffusion-DPO (beta, lr, steps) against the base: the toy world's calibration table",
    )
    add_config_arguments(cal, config_default="configs/toy.yaml")
    cal.add_argument("--out", default="runs/toy-calibration")
    cal.add_argument("--seed", type=seed_int, default=0)
    cal.set_defaults(func=_toy_calibrate)
    audit = toy_sub.add_parser(
        "reward-audit",
        help="what a finished toy run's implicit reward measures, policy by policy: "
        "estimators by K and t band, test-retest, ink, legibility, cost",
    )
    audit.add_argument("run", help="the run folder (output_dir of a finished toy `sail-fast run`)")
    audit.add_argument(
        "--out", default="bench/results/toy_reward_audit.md", help="the report (its numbers go beside it as .json)"
    )
    audit.add_argument("--prompts", type=positive_int, default=48, help="prompts no round used (default 48)")
    audit.add_argument("--candidates", type=int, default=8, help="candidates per prompt (default 8)")
    audit.add_argument(
        "--draws", type=positive_int, default=140, help="the fixed bank of (t, eps) draws per prompt (default 140)"
    )
    audit.add_argument(
        "--ks", type=positive_int, nargs="+", default=[6, 10, 20, 40, 80], help="draw counts K to compare"
    )
    audit.add_argument(
        "--band-k", type=positive_int, default=10, help="K for the timestep bands and the estimators (default 10)"
    )
    audit.add_argument("--repeats", type=positive_int, default=20, help="fresh draw subsets per estimate (default 20)")
    audit.add_argument(
        "--heldout-draws", type=nonnegative_int, default=40, help="draws per held-out human pair (0: skip them)"
    )
    add_trust_code_argument(audit)
    audit.set_defaults(func=_toy_reward_audit)
    return parser


def add_trust_code_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="run the code a run folder's config.yaml names (toy.preference); only for folders you trust",
    )


def main(argv: list[str] | None = None) -> None:
    """The console entry point. Ctrl-C at any moment, the heavy imports at start-up included, ends it with
    one line and exit status 130 (``--debug``: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _main(argv)
    except KeyboardInterrupt:  # before user_errors took over: start-up, parsing
        if "--debug" in argv:
            raise
        sys.stderr.write("\nsail-fast: interrupted (Ctrl-C)\n")
        raise SystemExit(128 + signal.SIGINT) from None


def _command(args: argparse.Namespace) -> str:
    """The command's name as typed: ``generate``, ``toy experiment``."""
    return f"{args.command} {args.toy_command}" if args.command == "toy" else args.command


def _main(argv: list[str]) -> None:
    # --debug may come anywhere on the line: show the full traceback of an error.
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    silence_third_party_noise()  # after parsing (--help needs no heavy import), before any model loads
    if debug:
        from ..runs.interrupts import install

        install()  # SIGTERM still stops at a checkpoint and releases the lock; the traceback shows where
        args.func(args)
        return
    resumable = ["sail-fast", *argv] if hasattr(args, "resume") else None  # the commands that train
    with user_errors(parser.prog, resume_command=resumable, command=_command(args)):
        args.func(args)


if __name__ == "__main__":
    main()
