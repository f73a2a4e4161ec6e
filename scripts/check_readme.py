"""Run the README's runnable command blocks in order, as a new user would after the quick start.

    python scripts/check_readme.py            # the real thing: `genseg demo`, then every block at full size
    python scripts/check_readme.py --small    # CI (tests/test_readme.py): `genseg demo --tiny`, then every block
                                              # with SMALL_FLAGS appended: same commands, seconds each

A runnable block is a fenced block whose info string is `bash runnable` and whose first line is a comment saying
it runs "after the quick start" (the label a reader sees); blocks meant for GPUs, real datasets, servers or the
cloud are plain `bash` blocks and are not run. A runnable block holds `genseg` commands, one per line (a
trailing backslash continues a line, `#` starts a comment). They run in a fresh work folder (a temporary
one unless --work is given) that holds what the README's paths expect from the repository root: `configs/` and
the shipped `checkpoints/demo/` (linked), then the quick start's `genseg demo`. The commands run in this
interpreter through genseg's own click entry point (the same code as the `genseg` script, without 10-20 s of
imports per command); the first failing command stops the check with its README line.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FENCE = re.compile(r"^```(\S*)(.*)$")
QUICK_START = ["genseg", "demo"]
# Appended in --small mode (click keeps the last value of an option given twice): the commands stay the README's,
# only their sizes shrink to the tiny demo's.
SMALL_FLAGS = {
    "demo": ["--tiny"],
    "train-seg": ["--epochs", "1"],
    "cross-validate": ["--epochs", "1", "--folds", "1,2"],
    "train-diffusion": ["--max-steps", "2"],
    "sample": ["--num", "4", "--steps", "2"],
    "pipeline": ["--num", "2", "--steps", "2"],
}


@dataclass
class Command:
    line: int  # README line where the command starts
    argv: list[str]


def runnable_commands(readme: str) -> list[Command]:
    """The commands of the runnable blocks, in README order; anything but a genseg command is an error."""
    commands, block, start, pending = [], None, 0, ""
    for number, text in enumerate(readme.splitlines(), 1):
        fence = FENCE.match(text.strip())
        if fence and block is None:
            block = "runnable" in fence[2].split() if fence[1] == "bash" else False
            labelled = False
            continue
        if fence and not fence[1] and not fence[2]:
            if pending:
                raise ValueError(f"README line {start}: the block ends inside a continued line")
            block = None
            continue
        if not block:
            continue
        if not labelled:  # what the rendered README shows instead of the info string
            if "after the quick start" not in text:
                raise ValueError(f"README line {number}: a runnable block starts with a comment saying it runs "
                                 f"after the quick start")
            labelled = True
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + text, comments=True)
        pending = ""
        if not argv:
            continue
        if argv[0] != "genseg" or len(argv) < 2:
            raise ValueError(f"README line {start}: runnable blocks hold genseg commands only, got {argv[0]!r}")
        commands.append(Command(start, argv))
    return commands


def prepare_work(work: Path) -> None:
    """A folder that looks like the repository root to the README's paths, before the quick start ran."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "checkpoints").mkdir(exist_ok=True)
    for link, target in (("configs", REPO / "configs"), ("checkpoints/demo", REPO / "checkpoints" / "demo")):
        if not (work / link).exists():
            (work / link).symlink_to(target)


def run(argv: list[str], small: bool) -> float:
    """Run one genseg command in this process; seconds taken. Raises RuntimeError when it fails."""
    from genseg.cli import main

    args = argv[1:] + (SMALL_FLAGS.get(argv[1], []) if small else [])
    print(f"$ {shlex.join(['genseg', *args])}", flush=True)
    started = time.perf_counter()
    try:
        main.main(args=args, prog_name="genseg", standalone_mode=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"exit status {exc.code}") from None
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CI mode: the tiny demo and small sizes (SMALL_FLAGS).")
    parser.add_argument("--work", type=Path, help="Run in this new folder, kept afterwards, instead of a temporary "
                                                  "one (the commands refuse to overwrite earlier runs).")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    commands = runnable_commands(args.readme.read_text())
    home = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="check-readme-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        prepare_work(work)
        print(f"work folder {work}; the quick start, then {len(commands)} README commands", flush=True)
        os.chdir(work)
        try:
            total = 0.0
            for line, command in [(0, QUICK_START)] + [(c.line, c.argv) for c in commands]:
                where = f"README line {line}" if line else "the quick start"
                try:
                    seconds = run(command, args.small)
                except Exception as exc:  # a failing command or a genseg bug: either way the README does not run
                    traceback.print_exc()
                    print(f"FAILED ({where}): {shlex.join(command)}: {exc}", file=sys.stderr)
                    return 1
                total += seconds
                print(f"ok ({where}) in {seconds:.1f} s", flush=True)
        finally:
            os.chdir(home)
    print(f"all {len(commands) + 1} commands ran in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
