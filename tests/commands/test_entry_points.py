"""Every entry point started from the repository root, where the top-level `kernels/` folder sits on
sys.path beside the Hugging Face `kernels` package that transformers 5 and bitsandbytes import."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sail_fast.diffusion.build import build_stack
from sail_fast.runs.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Log lines of third-party packages that a sail-fast user cannot act on (sail_fast/runs/quiet.py).
NOISE = ("kernels-community", "publisher trust", "gemm_4bit_forward")
HF_KERNELS = importlib.util.find_spec("kernels") is not None and "site-packages" in (
    importlib.util.find_spec("kernels").origin or ""
)

ENTRY_POINTS = {
    "python -m sail_fast.commands.cli": [sys.executable, "-m", "sail_fast.commands.cli", "train"],
    "python sail_fast/train.py": [sys.executable, "sail_fast/train.py"],
    # The launcher puts its working directory (here the repository root) on every rank's PYTHONPATH.
    "deepspeed sail_fast/train.py": [
        shutil.which("deepspeed") or "deepspeed",
        "--num_accelerators",
        "1",
        "--master_port",
        str(free_port()),
        "sail_fast/train.py",
    ],
}


def assert_quiet(output: str) -> None:
    noisy = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy


@pytest.mark.skipif(not HF_KERNELS, reason="the Hugging Face kernels package is not installed")
def test_the_repository_root_on_sys_path_still_imports_hugging_faces_kernels():
    code = (
        "import kernels, transformers; from kernels import get_kernel; import sail_fast.kernels as ours\n"
        "print(kernels.__file__); print(ours.__file__)\n"
        "try:\n    import kernels.paired_mse\nexcept ModuleNotFoundError:\n    print('no top-level paired_mse')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    theirs, ours, refused = done.stdout.splitlines()
    # Hugging Face's package, from site-packages (which make's .venv/ puts inside the repository), never kernels/.
    assert not Path(theirs).resolve().is_relative_to(REPO / "kernels") and "site-packages" in Path(theirs).parts, theirs
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"
    assert refused == "no top-level paired_mse"


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_each_entry_point_trains_a_lora_unet_from_the_repository_root(tmp_path, entry):
    # train.lora builds the adapter through diffusers' peft loader (UNet2DConditionModel.add_adapter),
    # the import chain that found the repository's kernels/ instead of Hugging Face's.
    stack = build_stack(load_config(TINY).model, seed=0, device=torch.device("cpu"))
    planted_pairs(stack, 8, 0).save(tmp_path / "pairs.safetensors")
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        "train.steps=1",
        "train.checkpoint_every=1",
        "train.lora.rank=4",
    ]
    cmd = [*ENTRY_POINTS[entry], "--config", str(TINY), *[a for kv in overrides for a in ("--set", kv)]]
    env = os.environ | {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "Traceback" not in done.stderr
    assert_quiet(done.stdout + done.stderr)


def test_sail_fast_help_prints_no_third_party_noise():
    done = subprocess.run(["sail-fast", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage: sail-fast" in done.stdout
    assert_quiet(done.stdout + done.stderr)
    assert not done.stderr.strip(), done.stderr
