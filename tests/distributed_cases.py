"""Shared by the torch.distributed tests: run a check in W spawned processes joined by a gloo group
(../shared/DESIGN.md, "Multiple devices"). One spawn per world size runs every check of a file:
starting processes is what costs."""
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
# Loaded here, in every rank before init_process_group: its functions bind group=group.WORLD as a
# default when imported, and imported later (by `import fastnotes` -> torch._dynamo, or by FSDP, in
# a check) they would keep the default group alive after destroy_process_group, its gloo threads
# running until the interpreter's teardown destroys it.
import torch.distributed.nn  # noqa: F401

TIMEOUT_S = 150          # the whole spawn: a hang fails the test instead of the CI job
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def spawn(world, check, tmp_path, timeout_s=TIMEOUT_S):
    """Run check(rank, world) in `world` spawned processes joined by a gloo group; a failure on any
    rank re-raises here, a hang past timeout_s kills them all. The ranks meet through a FileStore
    in tmp_path (no port to pick); gloo's own connections take free ports from the OS."""
    store_file = str(tmp_path / f"store-{world}")
    context = torch.multiprocessing.start_processes(
        _worker, args=(world, store_file, check), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed check {check.__name__} at world {world} hung for {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _worker(rank, world, store_file, check):
    torch.set_num_threads(1)
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        check(rank, world)
        dist.barrier()  # leave together
    finally:
        dist.destroy_process_group()
    # The checks passed and the group is down: skip the interpreter's teardown. In CI rehearsals a
    # rank sometimes aborted there after passing everything ('terminate called without an active
    # exception', SIGABRT: a native thread destroyed while joinable at exit), failing a passing test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
