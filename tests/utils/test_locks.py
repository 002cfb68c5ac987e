"""utils/locks.py: flock-based locks between processes, released when their process dies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT
from utils.locks import describe_holder, try_lock


def test_one_holder_at_a_time_and_the_file_goes_with_the_release(tmp_path):
    path = tmp_path / "x.lock"
    first = try_lock(path)
    assert first is not None and try_lock(path) is None  # a second open file description cannot take it
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert describe_holder(path) == f"process {os.getpid()} on {os.uname().nodename}"
    first.release()
    assert not path.exists()
    second = try_lock(path)
    assert second is not None
    second.release()


def test_a_killed_holder_leaves_a_stale_file_that_is_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.locks import try_lock\n"
                               f"lock = try_lock({str(path)!r}); print('held', flush=True); time.sleep(600)"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert try_lock(path) is None
        assert describe_holder(path).startswith(f"process {holder.pid} ")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert path.exists()  # the file stays behind ...
    deadline = time.monotonic() + 10
    lock = None
    while lock is None and time.monotonic() < deadline:  # ... but nobody holds it any more
        lock = try_lock(path)
    assert lock is not None and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
