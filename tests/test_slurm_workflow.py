"""The embedded default, scaled down, through Snakemake's SLURM executor on a real one-node cluster
(tests/slurm_cluster.py) with the test variant of the SLURM profile: every rule a batch job.

Needs root and apt (the harness installs slurm-wlm and munge when missing); skipped otherwise.
"""

import time
from collections import Counter

import pytest

from tests.slurm_cluster import TEST_PROFILE
from tests.workflow_helpers import embedded_workflow, snakemake

pytestmark = pytest.mark.slow

GPU_RULES = {"train", "eval_vqa", "eval_robot"}
EXPECTED_JOBS = Counter(
    download=1, vla_config=1, mlp_weights=1, easy_vqa=1, aloha_demos=1, data_check=1, train=4, stage_mlp_weights=1,
    eval_vqa=4, eval_robot=3, report=1,
)  # fmt: skip


def test_the_embedded_default_runs_as_slurm_jobs(cluster, tmp_path):
    embedded_workflow(tmp_path)
    started = time.monotonic()
    result = snakemake(tmp_path, "--profile", str(TEST_PROFILE), "all", env=cluster.env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}\n{cluster.logs()}"

    # Every rule went through sbatch as a job of this run, and completed.
    jobs = [job for job in cluster.submitted_jobs() if job.rule is not None]
    assert Counter(job.rule for job in jobs) == EXPECTED_JOBS, jobs
    assert all(job.state == "COMPLETED" and job.exit_code == "0:0" for job in jobs), jobs
    assert len({job.name for job in jobs}) == 1
    # The profile's resources reached the scheduler: a GPU for training and evaluation only.
    assert {job.rule for job in jobs if job.gpus == 1} == GPU_RULES
    assert all(job.gpus == 0 for job in jobs if job.rule not in GPU_RULES)
    assert {job.mem_mb for job in jobs if job.rule == "train"} == {4000}

    results = tmp_path / "results"
    demos = tmp_path / "resources" / "data" / "aloha_sim_transfer_cube"
    assert sorted(path.name for path in demos.glob("*.hdf5")) == [f"episode_{i:04d}.hdf5" for i in range(3)]
    assert (tmp_path / "resources" / "LMUData" / "EasyVQA.tsv").is_file()
    for stage in ("vlm", "baseline", "stage1", "stage2"):
        assert (results / "models" / stage / "model.safetensors").is_file()
        assert (results / "eval" / stage / "vqa" / "vqa_summary.json").is_file()
    for stage in ("baseline", "stage1", "stage2"):
        for name in ("open_loop.json", "closed_loop_transfer_cube.json", "rollout_transfer_cube.gif"):
            assert (results / "eval" / stage / "robot" / name).is_file(), (stage, name)
    assert (results / "report" / "report.html").is_file()
    # Each job's own log (kept by the test profile) shows the rule ran inside it.
    slurm_logs = tmp_path / ".snakemake" / "slurm_logs"
    for job in jobs:
        log = next((slurm_logs / f"rule_{job.rule}").rglob(f"{job.job_id}.log"))
        assert f"rule {job.rule}:" in log.read_text(), log

    again = snakemake(tmp_path, "--profile", str(TEST_PROFILE), "all", env=cluster.env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert len([job for job in cluster.submitted_jobs() if job.rule is not None]) == len(jobs)
    print(f"embedded default: {len(jobs)} SLURM jobs in {elapsed:.0f} s")
