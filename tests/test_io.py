"""Atomic writes: permissions of a plain write under the current umask, and the temporaries killed writers leave."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from genseg import io
from genseg.io import atomic_path, remove_stale_temporaries, replace_path
from genseg.viz import save_png

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_have_the_modes_of_plain_writes(tmp_path, umask):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    with atomic_path(tmp_path / "report.md") as tmp:
        tmp.write_text("x")
    save_png(np.eye(4), tmp_path / "figure.png")
    with atomic_path(tmp_path / "model", is_dir=True) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"w")
    with atomic_path(tmp_path / "model", is_dir=True) as tmp:  # replacing a folder that exists
        save_file({"w": torch.zeros(2)}, tmp / "weights.safetensors")  # safetensors itself writes 0600 files
    staged = tmp_path / "staged"  # a folder moved into place with replace_path (training checkpoints)
    staged.mkdir()
    save_file({"w": torch.zeros(2)}, staged / "model.safetensors")
    replace_path(staged, tmp_path / "step-1")
    assert mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "plain_dir") == 0o777 & ~umask
    for name in ("report.md", "figure.png", "model/weights.safetensors", "step-1/model.safetensors"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "model") == 0o777 & ~umask


KILLED_WRITER = """
import os, signal, sys
from genseg.io import atomic_path
with atomic_path(sys.argv[1], is_dir=sys.argv[2] == "dir") as tmp:
    (tmp / "half" if sys.argv[2] == "dir" else tmp).write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""

WAITING_WRITER = """
import sys
from genseg.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("theirs")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def python(code: str, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            **kwargs)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_the_next_write_removes_what_a_killed_writer_left(tmp_path, kind):
    target = tmp_path / ("model" if kind == "dir" else "report.md")
    writer = python(KILLED_WRITER, target, kind)
    assert writer.wait(timeout=60) == -signal.SIGKILL
    (left,) = temporaries(tmp_path)
    assert left.startswith(f".{target.name}.") and f"-{writer.pid}." in left
    other = tmp_path / f".{target.name}.b.{left[len(target.name) + 2:]}"  # a temporary of target NAME.b, not NAME
    other.write_text("not ours")
    with atomic_path(target, is_dir=kind == "dir") as tmp:
        (tmp / "whole" if kind == "dir" else tmp).write_text("whole")
    assert temporaries(tmp_path) == [other.name]
    assert (target / "whole" if kind == "dir" else target).read_text() == "whole"


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "log.csv"
    writer = python(WAITING_WRITER, target, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    theirs = Path(writer.stdout.readline().strip())
    with atomic_path(target) as tmp:  # a concurrent write of the same file
        tmp.write_text("mine")
    assert theirs.read_text() == "theirs" and target.read_text() == "mine"
    writer.communicate("\n", timeout=60)
    assert writer.returncode == 0 and target.read_text() == "theirs" and temporaries(tmp_path) == []


def test_temporaries_without_a_local_writer_go_only_when_old(tmp_path):
    target = tmp_path / "data.h5"
    legacy = tmp_path / ".data.h5.k2j4_x9q.tmp"  # tempfile's name, as earlier versions wrote it
    host = "0123abcd" if io._HOST != "0123abcd" else "fedcba98"
    foreign = tmp_path / f".data.h5.{host}-4242.89abcdef.tmp"  # another machine's writer
    for path in (legacy, foreign):
        path.write_text("?")
    assert remove_stale_temporaries(target) == []
    old = time.time() - io.STALE_S - 60
    for path in (legacy, foreign):
        os.utime(path, (old, old))
    assert sorted(remove_stale_temporaries(target)) == sorted([legacy, foreign])
    assert temporaries(tmp_path) == []
