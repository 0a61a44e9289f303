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
