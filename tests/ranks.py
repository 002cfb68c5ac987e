"""Several ranks in one test: a free port and `spawn_ranks`, shared by the multi-process tests."""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, worker: Callable, world: int, port: int, args: tuple) -> None:
    # What torchrun would set: `init_distributed` and `init_process_group("gloo")` read it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that aborts in C++ (SIGABRT) leaves no Python traceback; faulthandler prints every thread's stack.
    faulthandler.enable(all_threads=True)
    worker(rank, *args)  # an exception here reaches mp.spawn as usual (traceback file, exit code 1)
    sys.stdout.flush()
    sys.stderr.flush()
    # The worker has written its results and torn its process group down. Interpreter finalization can still abort
    # ("terminate called without an active exception"): c10d's C++ threads that release tensors then need a GIL
    # that no longer exists (pytorch/pytorch#179291). That race is not what these tests test, so a rank that got
    # here leaves without finalizing.
    os._exit(0)


def spawn_ranks(worker: Callable, nprocs: int, *args) -> None:
    """Run `worker(rank, *args)` in `nprocs` fresh processes, each with torchrun's variables for a job of `nprocs`
    ranks on a free local port; raises if any rank fails."""
    mp.spawn(_rank_entry, args=(worker, nprocs, free_port(), args), nprocs=nprocs, join=True)
