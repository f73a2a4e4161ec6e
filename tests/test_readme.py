"""The README's runnable blocks (scripts/check_readme.py): how they are read, that every command and flag in
them exists, and that they all run in order after the quick start, in the checker's small mode."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from genseg.cli import main

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
check_readme = sys.modules["check_readme"] = importlib.util.module_from_spec(spec)  # dataclasses need the entry
spec.loader.exec_module(check_readme)

FENCE = "```"


def test_only_runnable_blocks_are_read_with_continuations_and_comments():
    text = "\n".join([
        f"{FENCE}bash", "genseg train-seg --data figshare256.h5   # needs the dataset", FENCE, "",
        f"{FENCE}bash runnable", "# after the quick start", "genseg evaluate --checkpoint a \\",
        "                --data b.h5   # a comment", "", "genseg segment x.png --checkpoint a --out m/", FENCE,
        f"{FENCE}python", "print('not run')", FENCE,
    ])
    commands = check_readme.runnable_commands(text)
    assert [(c.line, c.argv) for c in commands] == [
        (7, ["genseg", "evaluate", "--checkpoint", "a", "--data", "b.h5"]),
        (10, ["genseg", "segment", "x.png", "--checkpoint", "a", "--out", "m/"])]
    with pytest.raises(ValueError, match="line 3: runnable blocks hold genseg commands only"):
        check_readme.runnable_commands(f"{FENCE}bash runnable\n# after the quick start\nrm -rf demo\n{FENCE}")
    with pytest.raises(ValueError, match="after the quick start"):
        check_readme.runnable_commands(f"{FENCE}bash runnable\ngenseg demo\n{FENCE}")


def test_every_readme_command_and_flag_exists():
    """A cheap guard on every push: the runnable commands parse against the real CLI, and so do the flags the
    small mode appends."""
    commands = check_readme.runnable_commands((REPO / "README.md").read_text())
    assert len(commands) >= 10
    for command in commands + [check_readme.Command(0, check_readme.QUICK_START)]:
        name, *args = command.argv[1:] + check_readme.SMALL_FLAGS.get(command.argv[1], [])
        assert name in main.commands, (command.line, name)
        ctx = main.commands[name].make_context(name, list(args), resilient_parsing=True)
        known = {opt for p in main.commands[name].params if isinstance(p, click.Option) for opt in p.opts}
        given = {a.split("=")[0] for a in args if a.startswith("--")}
        assert given <= known, (command.line, given - known)
        ctx.close()


@pytest.mark.slow
def test_the_readme_runs_in_order_after_the_quick_start(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_readme.py"), "--small",
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all " in done.stdout and "commands ran" in done.stdout
    # the README's `pipeline --input demo/raw/12.mat demo/pipeline/slices/0000.png`: outputs keep the inputs'
    # folders below their common parent (demo/), as `segment` names them
    assert (tmp_path / "work" / "demo" / "real" / "raw" / "12_mask.png").is_file()
