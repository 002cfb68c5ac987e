"""Advisory locks between processes on one machine: a training logdir, a prompt being generated into a shared folder.

A lock is a small file held with `fcntl.flock`. The kernel releases it when its process ends, however it ends
(SIGKILL included), so a lock is never left held by a dead process: a leftover lock file is stale exactly when no
process holds it, and the next `try_lock` takes it over. The file records the holder's pid and host, for messages.
flock works between processes of one machine on local filesystems; on network filesystems it depends on the server.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class FileLock:
    """A held lock; `release()` unlocks it and deletes its file."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlinked while still held: a process that opened the old file checks, once it has the lock, that the file
        # is still the one at `path` (see `try_lock`).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None


def try_lock(path: str | os.PathLike) -> FileLock | None:
    """Take the lock file `path` (created if absent) without waiting: a `FileLock`, or None while another live
    process holds it."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have deleted the file as it released it: then we locked a file nobody else can
        # find, and must lock the one now at `path` instead.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record + b"\n", 0)
    return FileLock(path, fd)


def holder(path: str | os.PathLike) -> dict[str, Any]:
    """What a lock file says about its holder (pid, host, since); {} when unreadable."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(path: str | os.PathLike) -> str:
    info = holder(path)
    if not info:
        return "another process"
    return f"process {info.get('pid')} on {info.get('host')}"
