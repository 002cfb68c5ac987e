"""The bookkeeping of a folder of generated videos: is it usable, which outputs are finished and under which settings,
which prompt a process is working on, and what an interrupted process left behind.

* An output `<name>` is finished when `<name>.mp4` and `stats_<name>.json` both exist (both are written atomically,
  the stats last) and the stats record the same generation settings (`settings_record`) as this run asks for.
* A process generating `<name>` holds the lock `.<name>.claim` (`utils.locks`), so several processes may share one
  folder and none repeats another's prompt; a process that dies releases its claims with it.
* Hidden temp files (`.<file>.<random>.tmp.mp4` / `.tmp.json`, see `utils.video`) of outputs nobody claims are what
  a killed process left: `sweep_leftovers` deletes them, and stale claim files, at the next start.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from utils.errors import InputError
from utils.locks import FileLock, describe_holder, try_lock

_TEMP = re.compile(r"^\.(?:stats_)?(?P<name>.+)\.(?:mp4|json)\.[^.]+\.tmp\.(?:mp4|json)$")
_CLAIM = re.compile(r"^\.(?P<name>.+)\.claim$")


def prepare_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create the folder if needed and prove it writable, before any model loads: an `InputError` naming `flag`
    for a path that is a file, cannot be created, or cannot be written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is a file; expected a folder for the outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{flag} {folder} cannot be written: {err.strerror or err}") from None
    return folder


# Write failures that are the environment's, not the program's: reported in one line like other user errors.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """A full disk, exceeded quota or a folder that became read-only while writing into `folder` becomes an
    `InputError` naming the file; other OS errors keep their traceback."""
    try:
        yield
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        raise InputError(f"cannot write {err.filename or folder}: {err.strerror}") from err


def missing_root(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (what creating it would create first)."""
    missing = None
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def remove_created(folder: Path, root: Path | None) -> None:
    """Remove `folder` and its parents up to `root` (see `missing_root`) while they are empty: what a run created
    before it failed."""
    if root is None:
        return
    for candidate in [folder, *folder.parents]:
        try:
            candidate.rmdir()
        except OSError:  # not empty (or already gone): stop
            return
        if candidate == root:
            return


def claim_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.claim"


def claim(folder: Path, name: str) -> FileLock | None:
    """Claim output `name` for this process: a held lock, or None while another live process generates it."""
    folder.mkdir(parents=True, exist_ok=True)
    return try_lock(claim_path(folder, name))


class Claims:
    """The claims on all outputs of one prompt (its samples), released together."""

    def __init__(self, locks: list[FileLock]):
        self.locks = locks

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


def claim_all(folder: Path, names: Iterable[str]) -> Claims | None:
    """Claim every output of `names` (each has its own temp files, which the sweep must leave alone), or none: None
    while another live process holds any of them."""
    taken = []
    for name in names:
        lock = claim(folder, name)
        if lock is None:
            Claims(taken).release()
            return None
        taken.append(lock)
    return Claims(taken)


def claimed_by(folder: Path, names: Iterable[str]) -> str:
    """Who holds the claims of `names` (the first that is held), for messages."""
    names = list(names)
    for name in names:
        lock = claim(folder, name)
        if lock is None:
            return describe_holder(claim_path(folder, name))
        lock.release()
    return describe_holder(claim_path(folder, names[0]))


def sweep_leftovers(folder: Path) -> list[str]:
    """Delete the temp files and claim files that dead processes left in `folder` (those of outputs that a live
    process claims stay); returns the names of the files deleted."""
    swept = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _TEMP.match(entry.name) or _CLAIM.match(entry.name)
        if match is None or not entry.is_file():
            continue
        lock = claim(folder, match.group("name"))
        if lock is None:
            continue  # a live process is writing this output
        try:
            if entry.name != lock.path.name:
                entry.unlink(missing_ok=True)
                swept.append(entry.name)
            elif entry.stat().st_size:  # a claim file that held a record: its process is gone
                swept.append(entry.name)
        finally:
            lock.release()  # deletes the claim file
    return swept


def settings_record(**settings: Any) -> dict[str, Any]:
    """The settings that decide what an output looks like, as JSON would give them back (tuples become lists)."""
    return json.loads(json.dumps(settings, ensure_ascii=False))


def finished(folder: Path, names: Iterable[str], record: dict[str, Any]) -> bool:
    """True when every output of `names` exists with its stats; an `InputError` naming the first differing setting
    when one was made with other settings (never silently kept, never silently replaced)."""
    names = list(names)
    if not all((folder / f"{n}.mp4").is_file() and (folder / f"stats_{n}.json").is_file() for n in names):
        return False
    for name in names:
        stats_path = folder / f"stats_{name}.json"
        try:
            stored = json.loads(stats_path.read_text(encoding="utf-8")).get("run_settings")
        except (OSError, ValueError, AttributeError):
            stored = None
        if not isinstance(stored, dict):
            raise InputError(f"{stats_path} records no run_settings (written by another version?), so "
                             f"{name}.mp4 cannot be checked against this run: pass --overwrite to regenerate it, "
                             "or choose another --output-dir")
        for key in [*record, *(k for k in stored if k not in record)]:  # in the record's order: seed first
            if stored.get(key, "<not recorded>") != record.get(key, "<not given>"):
                raise InputError(
                    f"{folder / (name + '.mp4')} was made with {key}={_short(stored.get(key, '<not recorded>'))}, "
                    f"this run asks for {key}={_short(record.get(key, '<not given>'))}: pass --overwrite to "
                    "regenerate, or choose another --output-dir")
    return True


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
