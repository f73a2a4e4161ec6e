"""Atomic writes: an output is either the complete old version or the complete new one, never half.

The temporary sibling is created the way a plain write creates its file or folder (mode 0o666 / 0o777, which
the kernel masks with the current umask), so an atomically written output has the permissions a plain one
would. Its name `.NAME.<host>-<pid>.<random>.tmp` says who writes it: a writer killed with kill -9 leaves it
behind, and the next write of NAME removes it once that writer is gone (see `remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

# A temporary that no writer on this machine can be asked about (another machine's, or one named by an earlier
# genseg without a pid) counts as abandoned once it has been left untouched this long.
STALE_S = 3600
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_OWNED = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[0-9a-f]{8}")
_UNOWNED = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkstemp / mkdtemp names, as earlier versions wrote them


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False):
    """Yield a temporary sibling path; on success rename it onto `path`, on error remove it.

    The temporary lives in the same folder so the final rename never crosses file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _create_temporary(path, is_dir)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    replace_path(tmp, path)


def _create_temporary(path: Path, is_dir: bool) -> Path:
    while True:
        tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` that killed writers left behind; return what was removed.

    A temporary of this machine is stale when its writer's pid no longer runs, so a concurrent writer's
    temporary (its pid alive) is never touched; one without a pid on this machine is stale after STALE_S
    untouched. Siblings of other targets never match: the part between `.NAME.` and `.tmp` must be one of
    the two name patterns exactly.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    with os.scandir(path.parent) as entries:
        candidates = [e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    for name in candidates:
        tag = name[len(prefix):-len(".tmp")]
        owned = _OWNED.fullmatch(tag)
        if owned and owned["host"] == _HOST:
            stale = not _running(int(owned["pid"]))
        elif owned or _UNOWNED.fullmatch(tag):
            stale = _untouched_for(path.parent / name, STALE_S)
        else:
            stale = False
        if stale:
            _remove(path.parent / name)
            removed.append(path.parent / name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:  # a concurrent writer just finished or cleaned it
        return False


def replace_path(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`, replacing a file or a whole folder that is already there.

    Safetensors weights in `src` first get the mode of a plain write: safetensors 0.8 writes every file 0600
    through a private temporary of its own (safetensors issue 782), whatever the umask.
    """
    src, dst = Path(src), Path(dst)
    weights = [src] if src.suffix == ".safetensors" else list(src.rglob("*.safetensors")) if src.is_dir() else []
    if weights:
        mode = 0o666 & ~_umask()
        for path in weights:
            if not path.is_symlink():
                os.chmod(path, mode)
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old")
        _remove(old)
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it is process-wide)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
