"""The repository's kernels/ directory installs only as sail_fast.kernels."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import sail_fast.kernels

REPO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _points_at_repo_kernels(spec) -> bool:
    if spec is None:
        return False
    locations = [spec.origin, *(spec.submodule_search_locations or [])]
    return any(loc and Path(loc).resolve().is_relative_to(REPO_KERNELS) for loc in locations)


def test_sail_fast_kernels_comes_from_the_kernels_directory():
    assert Path(sail_fast.kernels.__file__).resolve().parent.name == "kernels"
    assert callable(sail_fast.kernels.paired_mse)


def test_top_level_kernels_is_not_ours_in_a_fresh_interpreter(tmp_path):
    # Run from an unrelated directory, as a user's script would, after the install.
    code = (
        "import importlib.util, sail_fast.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(None if spec is None else (spec.origin, list(spec.submodule_search_locations or [])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(REPO_KERNELS) not in out.stdout, out.stdout


def test_top_level_kernels_is_not_ours_inside_the_test_process():
    # transformers and bitsandbytes probe find_spec("kernels") during these tests too.
    assert not _points_at_repo_kernels(importlib.util.find_spec("kernels"))
