"""The CPUs this process may use, and PyTorch's threads kept within them."""

import os


def available_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS has one (a SLURM job's allocation,
    a container's cpuset), else the machine's."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this machine: set by torchrun (LOCAL_WORLD_SIZE) and DeepSpeed's
    launcher (LOCAL_SIZE); 1 for a process started alone."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def limit_torch_threads() -> None:
    """At most one PyTorch thread per available CPU, shared among the job's processes on this
    machine. Snakemake sets OMP_NUM_THREADS to a rule's threads, which may exceed the machine's
    CPUs (`--cores 8` on a laptop), and every launched rank inherits it; with more OpenMP threads
    than CPUs they spin against each other and a job runs several times slower."""
    import torch

    share = max(1, available_cpus() // local_processes())
    if torch.get_num_threads() > share:
        torch.set_num_threads(share)
