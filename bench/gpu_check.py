"""Everything that needs a GPU, in one prepared run, with one summary (``bench/gpu_check.sh``).

    bash bench/gpu_check.sh --out runs/gpu-check          # on one H100/H200: under 8 minutes
    bash bench/gpu_check.sh --dry-run --out /tmp/check    # the CPU rehearsal CI runs

Steps: the Triton kernels compiled (not interpreted) against their torch twins; the compiled-training
gradient check on CUDA; the scorer, train step (full and LoRA), generation, paired_mse-vs-copy and MFU
benchmarks at SD1.5 and SDXL shapes; the planner against the allocator's peak for the shipped SDXL
config, full and LoRA. ``--dry-run`` runs the same code at tiny shapes on the CPU and reports the
CUDA-only steps as skipped, so the script cannot rot between GPU sessions.
Writes ``summary.json`` and ``summary.md`` (and each step's log and benchmark JSON) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_FILES = [
    "bench/test_bench_paired_mse.py",
    "bench/test_bench_reward.py",
    "bench/test_bench_train_step.py",
    "bench/test_bench_generation.py",
    "bench/test_bench_mfu.py",
]


def steps(out: Path, dry_run: bool) -> list[dict]:
    """name, command, needs_cuda (skipped without one), timeout (s), and the benchmark JSON it writes."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    plan = []
    plan.append(
        {
            "name": "triton kernels compiled vs torch twins",
            "needs_cuda": True,
            "timeout": 240,
            "cmd": pytest + ["tests/kernels/test_paired_mse.py", "tests/dpo/test_preference_math.py"],
        }
    )
    plan.append(
        {
            "name": "compiled training gradients on CUDA",
            "needs_cuda": True,
            "timeout": 240,
            "cmd": pytest + ["tests/diffusion/test_compiled.py", "-k", "training_step"],
        }
    )
    for arch in ("sd15", "sdxl"):
        json_out = out / f"bench-{arch}.json"
        plan.append(
            {
                "name": f"benchmarks at {arch} shapes (bf16, SDPA)",
                "needs_cuda": True,
                "timeout": 600,
                "cmd": pytest + BENCH_FILES + ["--benchmark-only", "--arch", arch, f"--benchmark-json={json_out}"],
                "bench_json": json_out,
            }
        )
    plan.append(
        {
            "name": "planner vs allocator peak, shipped SDXL config, full and LoRA",
            "needs_cuda": True,
            "timeout": 300,
            "cmd": [
                sys.executable,
                "bench/plan_check.py",
                "--config",
                "configs/sdxl.yaml",
                "--out",
                str(out / "plan_check.json"),
            ],
            "result_json": out / "plan_check.json",
        }
    )
    if dry_run:  # the same code at tiny shapes on the CPU
        json_out = out / "bench-rehearsal.json"
        plan.append(
            {
                "name": "rehearsal: kernel and LoRA scorer benchmarks at sd15-small",
                "needs_cuda": False,
                "timeout": 600,
                "bench_json": json_out,
                "cmd": pytest
                + [
                    "bench/test_bench_paired_mse.py",
                    "bench/test_bench_reward.py",
                    "-k",
                    "float32 or lora",
                    "--benchmark-only",
                    "--arch",
                    "sd15-small",
                    f"--benchmark-json={json_out}",
                ],
            }
        )
        plan.append(
            {
                "name": "rehearsal: planner vs measured peak, toy config",
                "needs_cuda": False,
                "timeout": 300,
                "cmd": [
                    sys.executable,
                    "bench/plan_check.py",
                    "--config",
                    "configs/toy.yaml",
                    "--out",
                    str(out / "plan_check_rehearsal.json"),
                ],
                "result_json": out / "plan_check_rehearsal.json",
            }
        )
    return plan


def run_step(step: dict, out: Path, has_cuda: bool) -> dict:
    record = {"name": step["name"], "command": " ".join(map(str, step["cmd"]))}
    if step["needs_cuda"] and not has_cuda:
        return record | {"status": "skipped", "why": "no CUDA device"}
    # Each step is a session of its own: a pytest-xdist worker's variables would make a nested pytest think it
    # is a worker too (pytest-benchmark then disables itself, and --benchmark-only refuses to run).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    log = out / f"step-{step['index']:02d}.log"
    started = time.perf_counter()
    try:
        done = subprocess.run(step["cmd"], cwd=REPO, env=env, capture_output=True, text=True, timeout=step["timeout"])
        status, text = ("passed" if done.returncode == 0 else "failed"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        # A timeout hands back bytes even under text=True: decode each part before joining them.
        parts = (err.stdout or "", err.stderr or "")
        status, text = "timed out", "".join(p.decode(errors="replace") if isinstance(p, bytes) else p for p in parts)
    log.write_text(text)
    record |= {
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "log": log.name,
        "tail": text.strip().splitlines()[-3:],
    }
    if step.get("bench_json") and Path(step["bench_json"]).is_file():
        sys.path.insert(0, str(REPO / "bench"))
        from report import rows

        record["benchmarks"] = rows(json.loads(Path(step["bench_json"]).read_text()))
    if step.get("result_json") and Path(step["result_json"]).is_file():
        record["result"] = json.loads(Path(step["result_json"]).read_text())
    return record


def markdown(summary: dict) -> str:
    lines = [
        f"# GPU check ({'dry run' if summary['dry_run'] else 'full'}) on {summary['device']}",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    for r in summary["steps"]:
        lines.append(
            f"| {r['name']} | {r['status']}{' (' + r['why'] + ')' if 'why' in r else ''} | {r.get('seconds', '-')} |"
        )
    for r in summary["steps"]:
        if r.get("benchmarks"):
            lines += [
                "",
                f"## {r['name']}",
                "",
                "| group | variant | median ms | rate | vs naive | vs copy |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {b['group']} | {b['name']} | {b['median_ms']:.2f} | {b['rate']} | {b['vs_base']} | {b['vs_copy']} |"
                for b in r["benchmarks"]
            ]
        if r.get("result"):
            lines += [
                "",
                f"## {r['name']}",
                "",
                "| trains | planned GiB | measured GiB | planned / measured |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {x['trains']} | {x['planned_gib']:.2f} | {x['measured_gib']:.2f} | {x['planned_over_measured']:.2f} |"
                for x in r["result"]
            ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check", help="folder for summary.json, summary.md and the logs")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny shapes, CUDA steps skipped")
    args = parser.parse_args(argv)
    import torch

    has_cuda = torch.cuda.is_available() and not args.dry_run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if has_cuda else "CPU (no CUDA)"
    records = []
    for index, step in enumerate(steps(out, args.dry_run)):
        step["index"] = index
        records.append(run_step(step, out, has_cuda))
        print(f"{records[-1]['status']:9s} {step['name']} ({records[-1].get('seconds', '-')} s)", flush=True)
    summary = {"dry_run": args.dry_run, "device": device, "torch": torch.__version__, "steps": records}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
