"""Joining the process group: the launcher's (DeepSpeed, torchrun, Ray Train) or a 1-process one.

Process-level set-up every entry point shares: threads per rank, the backend, and tearing the
group down at exit.
"""
from __future__ import annotations

import atexit
import os
import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on this host now: the sockets are held open together while the kernel picks
    them, so two of them can never be the same port (asking one at a time can hand the same port back twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One TCP port free on this host now (for a launcher's `--master_port`)."""
    return free_ports(1)[0]


def init_distributed() -> None:
    """Join the launcher's process group (DeepSpeed, torchrun, or the one Ray Train made), or make a 1-process
    group when run directly.

    The backend is the accelerator's: DeepSpeed's `get_accelerator().communication_backend_name()`, NCCL on
    CUDA, gloo on the CPU (a group the launcher made keeps its own).  Nothing here names one."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    cpu_only_machine()
    limit_threads_per_rank()
    no_shm_allreduce_segments()
    no_shm_comm_op_build()
    deepspeed.init_distributed(verbose=False)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # each rank drives its own device (Ray Train and torchrun set none)
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    atexit.unregister(destroy_process_group_at_exit)  # once, however often this is called
    atexit.register(destroy_process_group_at_exit)


def destroy_process_group_at_exit() -> None:
    """Tear the process group down while the interpreter is still whole (registered by `init_distributed`).

    A rank that exits with the group alive leaves gloo's worker threads holding finished async
    work (the rank_once count exchange is one) until interpreter finalisation, where releasing
    their tensors can abort the process ("terminate called without an active exception", exit
    code -6): a finished run then fails under the launcher, now and then.  Calling it twice, or
    after the script destroyed the group itself, does nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def backend_name() -> str:
    """The process-group backend of this machine's accelerator (nccl on CUDA, gloo on the CPU, ...)."""
    cpu_only_machine()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


def cpu_only_machine() -> None:
    """On a machine without CUDA, tell DeepSpeed to use its CPU accelerator (it would find it anyway, after a
    warning); where CUDA exists, DeepSpeed's own detection decides (DS_ACCELERATOR, if set, wins)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def no_shm_allreduce_segments() -> None:
    """Keep DeepSpeed's CPU backend from creating its shared-memory all-reduce workspace.

    When LOCAL_SIZE (set by DeepSpeed's launcher) equals the world size, DeepSpeed 0.19.8's CPU
    comm op creates a 69 MB /dev/shm segment per rank for its inference all-reduce and never
    unlinks it: every 2-rank run left 138 MB of RAM behind until reboot (a day of test runs filled
    17 GB and got Ray workers OOM-killed).  Nothing here uses that all-reduce (training runs on the
    process group's collectives), so the variable is dropped before the backend starts."""
    os.environ.pop("LOCAL_SIZE", None)


def no_shm_comm_op_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory comm op (`deepspeed_shm_comm`).

    DeepSpeed 0.19.8 builds that C++ op on the first comm-backend start of every new virtualenv, in the
    user-wide torch extensions folder, under a lock file.  A rank killed while building (a timeout, a
    Ctrl-C) leaves the lock behind, and every later DeepSpeed start on the machine then waits on it
    forever, silently (seen here: every 2-rank run of the test suite hung).  The op only serves
    DeepSpeed's CPU inference all-reduce, which nothing here calls (`no_shm_allreduce_segments`), and
    CUDA machines have no such op.  DeepSpeed keeps its op-compatibility table as one module dict whose
    edits persist; marking the op incompatible there makes its backend skip the build.  Call before
    `deepspeed.init_distributed` or `deepspeed.initialize`; calling it again does nothing."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def limit_threads_per_rank() -> None:
    """Share the CPU cores among the ranks on this machine (unless OMP_NUM_THREADS says otherwise).

    Each rank otherwise starts one intra-op thread per core; with 2 ranks on 2 cores that
    oversubscription made training 6x slower."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
