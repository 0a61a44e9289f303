"""The CPUs this process may use, and PyTorch's threads kept within them."""

import os


def available_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS has one (a SLURM job's allocation,
    a container's cpuset), else the machine's."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_torch_threads() -> None:
    """At most one PyTorch thread per available CPU. Snakemake sets OMP_NUM_THREADS to a rule's
    threads, which may exceed the machine's CPUs (`--cores 8` on a laptop); with more OpenMP
    threads than CPUs they spin against each other and a job runs several times slower."""
    import torch

    if torch.get_num_threads() > available_cpus():
        torch.set_num_threads(available_cpus())
