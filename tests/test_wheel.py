"""A plain (non-editable) wheel install works on its own: built from this checkout, installed into a fresh
virtual environment and run from a directory outside the repository, it finds its shipped configs and demo
models as package data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may come from the checkout
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_wheel_install_runs_the_pipeline_and_the_demo_from_another_directory(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         REPO], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("genseg-*.whl"))
    venv = tmp_path / "venv"  # the dependencies come from this interpreter's site-packages, genseg from the wheel
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path)
    python, genseg = venv / "bin" / "python", venv / "bin" / "genseg"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = run([python, "-c", "import genseg; print(genseg.__file__)"], cwd=elsewhere).stdout.strip()
    assert where.startswith(str(venv)), where

    run([genseg, "pipeline", "--num", "1", "--out", "generated"], cwd=elsewhere)
    assert (elsewhere / "generated" / "summary.json").is_file()
    run([genseg, "demo", "--tiny", "--out", "demo"], cwd=elsewhere)
    assert (elsewhere / "demo" / "report.md").is_file()
    shipped = run([python, "-c", "from genseg.config import builtin_config; print(builtin_config('seg-demo'))"],
                  cwd=elsewhere).stdout.strip()
    assert shipped.startswith(str(venv)), shipped
    page = run([python, "-c", "from importlib import resources; s = resources.files('genseg.serve') / 'static'; "
                              "print(*(len((s / n).read_bytes()) for n in ('viewer.html', 'viewer.js', 'viewer.css')))"],
               cwd=elsewhere).stdout.split()
    assert len(page) == 3 and all(int(n) > 0 for n in page), page  # the viewer page ships in the wheel
