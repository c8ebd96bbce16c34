"""Atomic writes of files and directories: a temporary name in the same directory, then a rename, so a killed
process never leaves a file or directory that looks complete. And the claim of a directory: stablelora deletes
only in directories it made, and one process at a time writes one."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (temporary files get 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` to fill; once the block succeeds it replaces ``target`` whole, and
    on an error it is removed (``target`` is left as it was)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, umask_mode(directory=True))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# In every directory a stablelora run or compare made; its lock is held while a process writes the directory.
OWNER_FILE = ".stablelora"


class DirectoryClaimError(ValueError):
    """A directory this process may not write: somebody else's files, or another stablelora process's run."""


def made_by_stablelora(directory: Path) -> bool:
    return (directory / OWNER_FILE).exists()


def mark_made_by_stablelora(directory: Path) -> None:
    """Mark a directory this process just made as stablelora's (compare's run directories, before the run)."""
    (directory / OWNER_FILE).touch(mode=umask_mode())


@contextmanager
def claimed_directory(directory: Path, what: str, *, only_ours: bool) -> Iterator[None]:
    """Hold ``directory`` (a "run directory", ...) for this process until the block ends: refused if another
    process holds it (its pid in the message) and, with ``only_ours``, if it holds files while stablelora never made
    it. The lock is an flock on OWNER_FILE, which the kernel releases when its holder dies, so a killed run never
    blocks the next."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        foreign = [] if not only_ours or made_by_stablelora(directory) else sorted(p.name for p in directory.iterdir())
        if not foreign:
            fd = os.open(directory / OWNER_FILE, os.O_RDWR | os.O_CREAT, umask_mode())
    except OSError as err:
        raise DirectoryClaimError(f"Cannot write the {what} {directory}: {err.strerror or err}. Choose a directory "
                                  "you can write to (--output-dir).") from err
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DirectoryClaimError(
            f"The {what} {directory} is not empty ({shown}) and was not made by stablelora, which clears the files "
            "of a failed start there: nothing in it was touched. Choose a new or empty directory (--output-dir).")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DirectoryClaimError(
            f"The {what} {directory} is in use by another stablelora process (pid {holder}); two processes would "
            "mix their files. Wait for it to end (or stop it), or choose another directory (--output-dir).") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, marking the directory as stablelora's
