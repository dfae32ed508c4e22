"""Job attempts' private work directories, and the sweep that removes dead ones.

An attempt works in `<spool>/work/<job id>-<random>/` and holds an exclusive `flock` on
the sibling `<job id>-<random>.lock` for as long as it runs. The lock file is created and
locked *before* the directory exists, so every directory the sweep can see was locked
first; the kernel drops the lock when its process ends, however it ends (a SIGKILLed work
horse, an OOM kill). So a directory whose lock can be taken belongs to nobody:
`sweep_work_dirs` removes exactly those (with their lock files). Attempts of any worker on
the host share the spool; a live attempt's directory is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


def work_root(spool: Path) -> Path:
    root = spool / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def attempt_dir(spool: Path, job_id: str) -> Iterator[Path]:
    """A fresh work directory for one attempt, locked while in use, removed afterwards."""
    fd, lock_name = tempfile.mkstemp(prefix=f"{job_id}-", suffix=LOCK_SUFFIX,
                                     dir=work_root(spool))
    lock = Path(lock_name)
    path = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # the directory first: never one unlocked
        lock.unlink(missing_ok=True)
        os.close(fd)


def _take_lock(lock: Path) -> int | None:
    """The lock's fd, held, if no live attempt holds it; None while one does."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return os.open(os.devnull, os.O_RDONLY)  # no lock file: nobody can hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def sweep_work_dirs(spool: Path) -> list[Path]:
    """Remove the work directories no live attempt holds; the ones removed."""
    removed = []
    for path in sorted(p for p in work_root(spool).iterdir() if p.is_dir()):
        lock = path.with_name(path.name + LOCK_SUFFIX)
        fd = _take_lock(lock)
        if fd is None:
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d work dir(s) left by dead attempts", len(removed))
    return removed
