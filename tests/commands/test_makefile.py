"""`make run` and `make test` on a system Python that refuses pip installs (PEP 668, Debian and Ubuntu) and may
have no `python` command: the Makefile installs into the active venv, else into a .venv/ of its own."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _planned(tmp_path, target, **env):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    done = subprocess.run(
        ["make", "-n", target],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **env},
    )
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_without_a_venv_make_makes_its_own_with_python3(tmp_path):
    plan = _planned(tmp_path, "run")
    assert "python3 -m venv .venv" in plan
    assert ".venv/bin/python -m pip install" in plan and "\npython -m" not in plan and " python -m" not in plan
    assert "(no venv is active: a venv of its own)" in plan
    assert "sail-fast run --config configs/toy.yaml --resume" in plan


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_an_active_venv_is_used_as_it_is(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    plan = _planned(tmp_path, "test", VIRTUAL_ENV=str(venv))
    assert "-m venv" not in plan and f"{venv}/bin/python -m pip install" in plan
    assert "(the active venv)" in plan and "pytest -p no:cacheprovider" in plan
