import torch

from vlaflow.cpus import available_cpus, limit_torch_threads


def test_torch_threads_are_capped_at_the_available_cpus():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(available_cpus() + 6)  # Snakemake's OMP_NUM_THREADS=8 on a 2-core laptop
        limit_torch_threads()
        assert torch.get_num_threads() == available_cpus()
        torch.set_num_threads(1)
        limit_torch_threads()
        assert torch.get_num_threads() == 1  # fewer than the CPUs: left as asked
    finally:
        torch.set_num_threads(before)


def test_launched_processes_share_the_cpus(monkeypatch):
    """torchrun and DeepSpeed's launcher start several ranks, each inheriting OMP_NUM_THREADS."""
    before = torch.get_num_threads()
    try:
        for variable in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
            monkeypatch.delenv("LOCAL_SIZE", raising=False)
            monkeypatch.setenv(variable, str(available_cpus() * 2))  # more ranks than CPUs: one thread each
            torch.set_num_threads(available_cpus() + 6)
            limit_torch_threads()
            assert torch.get_num_threads() == 1, variable
    finally:
        torch.set_num_threads(before)
