"""Smoke test of the SLURM harness: a tiny workflow through Snakemake's SLURM executor.

Needs root and apt (the harness installs slurm-wlm and munge when missing); skipped otherwise.
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import TEST_PROFILE as PROFILE
from tests.slurm_cluster import alive, slurm_cluster

SNAKEMAKE = Path(sys.executable).with_name("snakemake")

pytestmark = pytest.mark.slow

SNAKEFILE = textwrap.dedent(
    """\
    rule all:
        input:
            "out/report.txt",


    rule on_gpu:
        output:
            "out/gpu.txt",
        resources:
            gpu=1,
        shell:
            "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_JOB_ID=$SLURM_JOB_ID > {output}"


    rule two_threads:
        output:
            "out/threads.txt",
        threads: 2
        shell:
            "echo threads={threads} SLURM_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK SLURM_JOB_ID=$SLURM_JOB_ID > {output}"


    rule report:
        input:
            "out/gpu.txt",
            "out/threads.txt",
        output:
            "out/report.txt",
        shell:
            "cat {input} > {output}"
    """
)


def test_tiny_workflow_runs_through_sbatch(cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    started = time.monotonic()
    done = subprocess.run(
        [
            str(SNAKEMAKE),
            "--profile",
            str(PROFILE),
            "--directory",
            str(tmp_path),
            "--snakefile",
            str(tmp_path / "Snakefile"),
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, (
        f"snakemake failed after {elapsed:.0f} s:\n{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    )

    for name in ("gpu.txt", "threads.txt", "report.txt"):
        assert (tmp_path / "out" / name).is_file(), name

    # Every rule ran as its own SLURM batch job (the executor names the job after its run UUID
    # and puts rule_<name> into the comment), all of them completed.
    jobs = {job.rule: job for job in cluster.submitted_jobs() if job.rule is not None}
    assert set(jobs) == {"on_gpu", "two_threads", "report"}, cluster.submitted_jobs()
    assert all(job.state == "COMPLETED" and job.exit_code == "0:0" for job in jobs.values()), jobs
    assert len({job.name for job in jobs.values()}) == 1  # one Snakemake run

    # Resources reached sbatch: the fake GPU, the threads, the profile's memory and partition.
    assert jobs["on_gpu"].gpus == 1
    assert jobs["two_threads"].gpus == 0
    assert jobs["two_threads"].cpus == 2
    assert all(job.mem_mb == 1000 for job in jobs.values())
    assert all(job.fields["Partition"] == "debug" for job in jobs.values())

    # ... and the jobs themselves saw it: the rule's output was written inside the SLURM job.
    gpu_line = (tmp_path / "out" / "gpu.txt").read_text().split()
    assert gpu_line == ["CUDA_VISIBLE_DEVICES=0", f"SLURM_JOB_ID={jobs['on_gpu'].job_id}"]
    threads_line = (tmp_path / "out" / "threads.txt").read_text().split()
    assert threads_line == ["threads=2", "SLURM_CPUS_PER_TASK=2", f"SLURM_JOB_ID={jobs['two_threads'].job_id}"]

    # The executor's own log files, kept by the test profile.
    logs = sorted(
        p.relative_to(tmp_path / ".snakemake" / "slurm_logs").as_posix()
        for p in (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log")
    )
    assert logs == sorted(f"rule_{rule}/{job.job_id}.log" for rule, job in jobs.items())

    # The job-completion log has them too (it outlives squeue's memory and the cluster).
    completed = {int(record["JobId"]) for record in cluster.completed_jobs() if record.get("JobState") == "COMPLETED"}
    assert {job.job_id for job in jobs.values()} <= completed
    print(f"3 SLURM jobs in {elapsed:.1f} s")


def test_exit_with_a_running_job_leaves_nothing_behind(cluster, tmp_path):
    """Leaving the context with a job still running (its own small cluster beside the module's):
    the job is cancelled, the daemons stop, no slurmstepd or job process survives."""
    with slurm_cluster(tmp_path / "slurm", gpus=0) as small:
        job_id = small.run(
            "sbatch", "--parsable", "--mem=100", f"--output={tmp_path}/%j.log", "--wrap", "sleep 300 & srun sleep 300"
        ).stdout.strip()
        deadline = time.monotonic() + 30
        while small.run("squeue", "--noheader", "--format=%T", "--jobs", job_id).stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, small.logs()
            time.sleep(0.2)
        time.sleep(1)  # let srun start its step
        pids = small.pids
        assert {"slurmctld", "slurmd"} <= set(pids)
        assert len(small.processes_left()) > len(pids) + 2, small.logs()  # slurmstepd, the job's processes
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert small.processes_left() == []
    # the module's cluster is untouched
    assert cluster.sinfo_state() == "idle"
