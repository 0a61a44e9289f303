"""A real one-node SLURM cluster on this machine, for tests that submit through ``sbatch``.

Usage::

    from tests.slurm_cluster import TEST_PROFILE, slurm_cluster

    with slurm_cluster(tmp_path / "slurm") as cluster:
        subprocess.run([".venv/bin/snakemake", "--profile", str(TEST_PROFILE), "--directory", workdir, ...],
                       env=cluster.env, check=True)
        jobs = cluster.submitted_jobs()          # every batch job slurmctld accepted, oldest first
        assert {job.rule for job in jobs} == {"a", "b"}
        assert all(job.state == "COMPLETED" for job in jobs)

What it does (Debian's ``slurm-wlm`` 22.05 and ``munge``; needs root, no systemd, no cgroups):

* installs ``slurm-wlm`` and ``munge`` with apt-get when ``slurmctld`` is missing
  (:class:`SlurmUnavailable` when that is impossible: not root, no apt-get, apt failed;
  tests turn it into ``pytest.skip``);
* creates ``/etc/munge/munge.key`` when missing and starts ``munged`` as the munge user, unless a
  munged already answers (then it is reused and left running);
* writes ``slurm.conf`` and ``gres.conf`` under ``root/etc`` (see :func:`slurm_conf_text`): node
  ``localhost`` with the machine's CPU count, a ``RealMemory`` below the machine's, ``gpus`` fake
  GPUs (GRES on character devices such as ``/dev/null``, scheduling only: nothing runs on them),
  partition ``debug`` (default), no accounting, free TCP ports so that it never collides with
  another cluster on the machine;
* starts ``slurmctld`` and ``slurmd`` in the foreground (``-D``) as child processes and waits until
  ``sinfo`` reports the node idle;
* on exit cancels the jobs still queued, stops exactly the daemons it started (munged only if it
  started it) and kills whatever they left behind (``slurmstepd``, job processes, clients still
  pointed at the cluster). slurmctld and slurmd also get SIGTERM when the process that started
  them dies (a test run killed hard); munged, running as another user, does not.

Client commands find the cluster through ``SLURM_CONF``: run them with ``env=cluster.env`` (or
``cluster.run(...)``); the daemons are started with ``-f <slurm.conf>``. ``cluster.env`` also puts
``root/bin`` first in ``PATH``: wrappers of ``srun``, ``sbatch``, ``squeue``... that set
``SLURM_CONF`` themselves, because Snakemake's jobstep plugin drops ``SLURM_CONF`` from the
environment of the ``srun`` that runs a rule inside the job (see :func:`write_client_wrappers`).

Evidence that jobs went through SLURM (there is no accounting, so ``sacct`` cannot answer):

* :meth:`SlurmCluster.submitted_jobs` parses ``scontrol show job --oneliner``. slurmctld keeps the
  record of every job, finished ones included, for ``MinJobAge`` seconds, which this cluster sets to
  a day, so during the cluster's life the list holds every job ever submitted to it, with its
  state, exit code, CPUs, memory, allocated GRES and the Snakemake rule: the SLURM executor names
  every job after its run UUID and puts ``rule_<name>[_wildcards_<w>]`` into the job's comment.
* As a second, persistent record, ``JobCompType=jobcomp/filetxt`` makes slurmctld append one line
  per finished job to ``root/log/jobcomp.log`` (:meth:`SlurmCluster.completed_jobs`); it has no
  comment, but survives ``MinJobAge`` and the cluster's shutdown.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.system_packages import PackagesUnavailable, apt_install

TEST_PROFILE = Path(__file__).resolve().parent / "profiles" / "slurm-test"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
PACKAGES = ("slurm-wlm", "munge")
PARTITION = "debug"
NODE = "localhost"
# Character devices that every Linux machine (and container) has; slurmd only checks that a GRES
# file exists, so they stand in for GPUs in scheduling tests.
FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# Environment variables of an enclosing SLURM job would leak into sbatch/srun of this cluster.
_SLURM_ENV_PREFIXES = ("SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here for a reason outside the project (not root, no apt)."""


class SlurmStartError(RuntimeError):
    """The daemons were started but the cluster did not come up; the message holds their logs."""


# --------------------------------------------------------------------------------------------
# installation


def ensure_installed(install: bool = True, timeout: float = 600) -> None:
    """Make sure ``slurmctld``, ``slurmd``, ``munged`` and the client commands exist.

    Installs the Debian packages ``slurm-wlm`` and ``munge`` when missing. Raises
    :class:`SlurmUnavailable` (with the reason) when they are missing and cannot be installed.
    """
    needed = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo", "scontrol")
    missing = [name for name in needed if not _which(name)]
    if not missing:
        return
    if not install:
        raise SlurmUnavailable(f"SLURM commands missing: {', '.join(missing)} (installation disabled)")
    try:
        apt_install(PACKAGES, timeout)
    except PackagesUnavailable as reason:
        raise SlurmUnavailable(f"SLURM commands missing ({', '.join(missing)}): {reason}") from None
    missing = [name for name in needed if not _which(name)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing)}")


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


# --------------------------------------------------------------------------------------------
# munge


def _munge_works() -> bool:
    munge, unmunge = _which("munge"), _which("unmunge")
    if not munge or not unmunge:
        return False
    try:
        cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10, check=False)
        if cred.returncode != 0:
            return False
        check = subprocess.run([unmunge], input=cred.stdout, capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return check.returncode == 0


def _ensure_munge_key() -> None:
    import pwd

    user = pwd.getpwnam("munge")
    MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(MUNGE_KEY.parent, user.pw_uid, user.pw_gid)
    os.chmod(MUNGE_KEY.parent, 0o700)
    if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size < 32:
        fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "wb") as key:
            key.write(os.urandom(1024))
    os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)


def _start_munged(log_dir: Path, timeout: float) -> subprocess.Popen | None:
    """Start munged as the munge user; ``None`` when one is already running (reused, not ours)."""
    if _munge_works():
        return None
    import pwd

    user = pwd.getpwnam("munge")
    _ensure_munge_key()
    for directory, mode in (
        (MUNGE_SOCKET_DIR, 0o755),
        (Path("/var/lib/munge"), 0o711),
        (Path("/var/log/munge"), 0o700),
    ):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, user.pw_uid, user.pw_gid)
        os.chmod(directory, mode)
    log = log_dir / "munged.log"
    munged = _which("munged")
    assert munged
    # --force: a socket left behind by a munged that died is removed (a live one answered above).
    cmd = [munged, "--foreground", "--force", f"--log-file={log}"]
    # munged insists that its log file belongs to it.
    log.touch()
    os.chown(log, user.pw_uid, user.pw_gid)
    with open(log_dir / "munged.out", "ab") as out:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            start_new_session=True,
            # No parent-death signal: the kernel here does not deliver it to a process of another
            # user. A munged left by a hard-killed run is harmless and the next run reuses it.
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SlurmStartError(
                f"munged exited with {process.returncode}:\n{_read(log)}\n{_read(log_dir / 'munged.out')}"
            )
        if _munge_works():
            return process
        time.sleep(0.1)
    _stop_process(process)
    raise SlurmStartError(f"munged did not answer within {timeout:.0f} s:\n{_read(log)}")


# --------------------------------------------------------------------------------------------
# configuration


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def machine_memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def default_real_memory_mb() -> int:
    """What the node offers: the machine's memory less 10 % (at least 512 MB) for the OS and daemons."""
    total = machine_memory_mb()
    return max(256, total - max(512, total // 10))


def slurm_conf_text(
    *,
    root: Path,
    spool: Path,
    cpus: int,
    real_memory_mb: int,
    gpus: int,
    ctld_port: int,
    slurmd_port: int,
    cluster_name: str = "vlaflow",
) -> str:
    """The slurm.conf of the one-node test cluster."""
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return f"""\
# One-node SLURM test cluster written by tests/slurm_cluster.py
ClusterName={cluster_name}
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# no systemd, no cgroups: track job processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# trust this file over slurmd's hardware detection (CPUs/memory as written below)
SlurmdParameters=config_overrides
# no slurmdbd: sacct cannot answer, squeue/scontrol keep finished jobs for MinJobAge seconds
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.log
MinJobAge=86400
ReturnToService=2
SchedulerType=sched/backfill
# schedule a submitted batch job at once (default: within 3 s; a trivial job takes ~1 s instead of ~2 s)
SchedulerParameters=batch_sched_delay=0
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
Waittime=0
StateSaveLocation={root}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
{"GresTypes=gpu" if gpus else "# no GRES"}
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb}{gres} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def gres_conf_text(gpus: int) -> str:
    if gpus > len(FAKE_GPU_DEVICES):
        raise ValueError(f"at most {len(FAKE_GPU_DEVICES)} fake GPUs")
    lines = ["# fake GPUs for scheduling tests: character devices that exist everywhere", "AutoDetect=off"]
    lines += [f"NodeName={NODE} Name=gpu File={device}" for device in FAKE_GPU_DEVICES[:gpus]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the cluster


@dataclass
class SlurmJob:
    """One batch job as slurmctld knows it (``scontrol show job``)."""

    job_id: int
    name: str
    state: str
    comment: str
    exit_code: str
    fields: dict[str, str] = field(repr=False)

    @property
    def rule(self) -> str | None:
        """The Snakemake rule, from the comment ``rule_<name>[_wildcards_<...>]`` the executor sets."""
        if not self.comment.startswith("rule_"):
            return None
        return self.comment[len("rule_") :].split("_wildcards_", 1)[0]

    @property
    def cpus(self) -> int:
        return int(self.fields.get("NumCPUs", "0"))

    @property
    def tres(self) -> str:
        """Trackable resources, e.g. ``cpu=2,mem=2000M,node=1,billing=2`` (no gres/gpu without slurmdbd)."""
        return self.fields.get("TRES", "")

    @property
    def gres(self) -> str:
        """GRES of the job: allocated (``JOB_GRES``) once it ran, else requested, e.g. ``gpu:1``."""
        for key in ("JOB_GRES", "TresPerJob", "TresPerNode"):
            value = self.fields.get(key, "")
            if value and value != "(null)":
                return value.replace("gres:", "").replace("gres/", "")
        return ""

    @property
    def gpus(self) -> int:
        """Number of GPUs (GRES ``gpu``) given to the job; without accounting TRES lacks gres/gpu."""
        for item in self.gres.split(","):
            parts = item.split(":")
            if parts[0] == "gpu":
                count = parts[-1].split("(")[0]
                return int(count) if count.isdigit() else 1
        return 0

    @property
    def mem_mb(self) -> int:
        for item in self.tres.split(","):
            key, _, value = item.partition("=")
            if key == "mem":
                return _mb(value)
        return 0


def _mb(value: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


def _parse_oneliner(line: str) -> dict[str, str]:
    """Split ``Key=Value Key=Value`` records; values may contain spaces (e.g. Command, Comment)."""
    fields: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        name, eq, value = token.partition("=")
        if eq and name and name.replace("/", "").replace(":", "").replace("_", "").isalnum() and name[0].isupper():
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return {name: value.strip() for name, value in fields.items()}


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    cpus: int
    real_memory_mb: int
    gpus: int
    ctld_port: int
    slurmd_port: int
    spool: Path
    env: dict[str, str] = field(repr=False)
    _processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    _sessions: set[int] = field(default_factory=set, repr=False)

    partition = PARTITION
    node = NODE

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def started(self) -> list[str]:
        """Names of the daemons this harness started (and will stop)."""
        return list(self._processes)

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._processes.items()}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a command (``sbatch``, ``squeue``, ``snakemake``...) against this cluster."""
        return subprocess.run(
            list(cmd), env=self.env, check=check, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def sinfo_state(self) -> str:
        done = self.run("sinfo", "--noheader", "--nodes", NODE, "--format=%T", check=False, timeout=15)
        return done.stdout.strip() if done.returncode == 0 else f"error: {done.stderr.strip()}"

    def submitted_jobs(self) -> list[SlurmJob]:
        """Every batch job slurmctld accepted while this cluster ran, oldest first (see module doc)."""
        done = self.run("scontrol", "show", "job", "--details", "--oneliner", timeout=30)
        jobs = []
        for line in done.stdout.splitlines():
            if not line.startswith("JobId="):
                continue
            fields = _parse_oneliner(line.strip())
            jobs.append(
                SlurmJob(
                    job_id=int(fields["JobId"]),
                    name=fields.get("JobName", ""),
                    state=fields.get("JobState", ""),
                    comment="" if fields.get("Comment") in (None, "(null)") else fields["Comment"],
                    exit_code=fields.get("ExitCode", ""),
                    fields=fields,
                )
            )
        return sorted(jobs, key=lambda job: job.job_id)

    def completed_jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the job-completion log (``jobcomp/filetxt``): JobId, Name, JobState, ..."""
        path = self.log_dir / "jobcomp.log"
        if not path.exists():
            return []
        return [_parse_oneliner(line.strip()) for line in path.read_text().splitlines() if line.strip()]

    def active_jobs(self) -> list[str]:
        done = self.run("squeue", "--noheader", "--format=%i", check=False, timeout=15)
        return done.stdout.split() if done.returncode == 0 else []

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Wait until the node is idle (no job running) and reachable."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.sinfo_state()
            if state == "idle":
                return
            time.sleep(0.2)
        raise SlurmStartError(f"node {NODE} not idle after {timeout:.0f} s (sinfo: {state!r})\n{self.logs()}")

    def logs(self, tail: int = 60) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            if path.is_file():
                parts.append(f"----- {path.name} -----\n{_tail(_read(path), tail)}")
        return "\n".join(parts)

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise SlurmStartError(f"{name} exited with {process.returncode}\n{self.logs()}")

    # ---- start / stop

    def _start(self, name: str, cmd: Sequence[str], **kwargs) -> None:
        with open(self.log_dir / f"{name}.out", "ab") as out:
            process = subprocess.Popen(
                list(cmd),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # only ctypes' prctl runs in the child (resolved here, before the fork)
                preexec_fn=_parent_death_signal(),  # noqa: PLW1509
                **kwargs,
            )
        self._processes[name] = process
        self._sessions.add(process.pid)

    def stop(self, timeout: float = 30) -> None:
        """Cancel queued jobs, stop the daemons this harness started and anything they left behind."""
        if "slurmctld" in self._processes and self._processes["slurmctld"].poll() is None:
            jobs = self.active_jobs()
            if jobs:
                self.run("scancel", "--full", *jobs, check=False, timeout=15)
                deadline = time.monotonic() + timeout
                while self.active_jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self._processes.get(name)
            if process is not None:
                _stop_process(process, timeout)
        # What the daemons left: slurmstepd and job processes (own sessions, SLURM_CONF=ours).
        deadline = time.monotonic() + 10
        while (leftovers := self.processes_left()) and time.monotonic() < deadline:
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        shutil.rmtree(self.spool, ignore_errors=True)
        self._processes.clear()

    def processes_left(self) -> list[int]:
        """Live pids of the daemons this harness started, of their sessions, and of processes
        whose environment points at this cluster's slurm.conf (slurmstepd, jobs); zombies excluded."""
        alive = [p.pid for p in self._processes.values() if p.poll() is None]
        return sorted(set(alive) | set(_processes_in_sessions(self._sessions)) | set(_processes_using_conf(self.conf)))


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not state[state.rfind(")") + 2 :].startswith("Z")


def _processes_in_sessions(sessions: set[int]) -> list[int]:
    if not sessions:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses
        rest = stat[stat.rfind(")") + 2 :].split()
        if rest[0] == "Z":
            continue
        if int(rest[3]) in sessions:
            pids.append(int(entry))
    return pids


def _stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _parent_death_signal():
    """A ``preexec_fn`` that makes the child get SIGTERM when the process that started it dies.

    A test run killed hard (SIGKILL, a CI timeout) skips ``stop()``; this way the daemons still go.
    ``None`` (no such function) where libc has no prctl.
    """
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _processes_using_conf(conf: Path) -> list[int]:
    """Live processes whose environment points at ``conf``: slurmstepd, job steps and job processes.

    slurmstepd puts itself into a session of its own, so the daemons' sessions miss it; it and
    every job process inherit ``SLURM_CONF`` from slurmd or the submitting environment, though.
    This process and its ancestors are spared (a caller may have exported ``cluster.env``).
    """
    needle = f"SLURM_CONF={conf}\0".encode()
    spared = set()
    pid = os.getpid()
    while pid > 1:
        spared.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if state[state.rfind(")") + 2 :].startswith("Z"):
            continue
        if needle in environ + b"\0":
            found.append(int(entry))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as error:
        return f"({error})"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


CLIENT_COMMANDS = ("srun", "sbatch", "salloc", "squeue", "scontrol", "scancel", "sinfo", "sacct", "sstat", "sattach")


def write_client_wrappers(bin_dir: Path, conf: Path) -> None:
    """``bin_dir/<command>`` for each SLURM client command: ``SLURM_CONF=<conf> exec <real command>``.

    Needed because snakemake-executor-plugin-slurm-jobstep (0.6.1) removes every ``SLURM_*``
    variable but the job's identity, ``SLURM_CONF`` included, from the environment of the
    ``srun`` it runs a rule with; on a real cluster that srun finds ``/etc/slurm/slurm.conf`` (or a
    configless slurmd's cache), here it would find nothing (``fatal: Could not establish a
    configuration source``) or, worse, another cluster's config. Jobs inherit ``PATH`` from the
    submitting environment (``sbatch --export=ALL``), so the wrappers reach them too, and a rule
    that calls ``srun`` itself (the ``mpi`` resource) gets this cluster as well.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in CLIENT_COMMANDS:
        real = _which(name)
        if real is None:
            continue
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(conf))} exec {shlex.quote(real)} "$@"\n')
        wrapper.chmod(0o755)


def cluster_env(conf: Path, base: Mapping[str, str] | None = None, bin_dir: Path | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) pointed at ``conf``, without an enclosing
    job's SLURM_* settings; ``bin_dir`` (the client wrappers) first in ``PATH``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_SLURM_ENV_PREFIXES)}
    env["SLURM_CONF"] = str(conf)
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":")
    path += [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path]
    if bin_dir is not None:
        path.insert(0, str(bin_dir))
    env["PATH"] = ":".join(path)
    return env


@contextlib.contextmanager
def slurm_cluster(
    root: str | os.PathLike,
    *,
    gpus: int = 2,
    cpus: int | None = None,
    real_memory_mb: int | None = None,
    install: bool = True,
    start_timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> Iterator[SlurmCluster]:
    """Start a one-node SLURM cluster with its files under ``root``; stop it on exit.

    ``gpus`` fake GPUs (GRES ``gpu``, scheduling only), ``cpus`` defaults to ``os.cpu_count()``,
    ``real_memory_mb`` to the machine's memory less 10 %. ``env`` is the base of ``cluster.env``
    (default: this process's environment). Raises :class:`SlurmUnavailable` when SLURM cannot be
    installed here, :class:`SlurmStartError` (with the daemons' logs) when it does not come up.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs slurmctld/slurmd/munged as root; not root")
    ensure_installed(install)
    root = Path(root).resolve()
    # a fresh cluster: no jobs, logs or state of an earlier one in the same root
    for sub in ("state", "log", "run"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for sub in ("etc", "state", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # slurmstepd puts UNIX sockets into the spool dir: keep its path short (108-byte limit).
    spool = Path(tempfile.mkdtemp(prefix="slurmd-", dir="/tmp"))
    ctld_port, slurmd_port = _free_ports(2)
    conf = root / "etc" / "slurm.conf"
    cluster = SlurmCluster(
        root=root,
        conf=conf,
        cpus=cpus or os.cpu_count() or 1,
        real_memory_mb=real_memory_mb or default_real_memory_mb(),
        gpus=gpus,
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        spool=spool,
        env=cluster_env(conf, env, root / "bin"),
    )
    write_client_wrappers(root / "bin", conf)
    conf.write_text(
        slurm_conf_text(
            root=root,
            spool=spool,
            cpus=cluster.cpus,
            real_memory_mb=cluster.real_memory_mb,
            gpus=gpus,
            ctld_port=ctld_port,
            slurmd_port=slurmd_port,
        )
    )
    # slurmd reads gres.conf next to slurm.conf; empty when there are no GPUs.
    (root / "etc" / "gres.conf").write_text(gres_conf_text(gpus) if gpus else "# no GRES\n")
    try:
        munged = _start_munged(cluster.log_dir, start_timeout)
        if munged is not None:
            cluster._processes["munged"] = munged
            cluster._sessions.add(munged.pid)
        cluster._start("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-f", str(conf)])
        _wait_for(
            lambda: cluster.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
            cluster,
            start_timeout,
            "slurmctld does not answer scontrol ping",
        )
        cluster._start("slurmd", [_which("slurmd") or "slurmd", "-D", "-f", str(conf), "-N", NODE])
        cluster.wait_until_idle(start_timeout)
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


def _wait_for(predicate, cluster: SlurmCluster, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster._check_alive()
        if predicate():
            return
        time.sleep(0.2)
    raise SlurmStartError(f"{what} after {timeout:.0f} s\n{cluster.logs()}")


if __name__ == "__main__":  # manual check: python -m tests.slurm_cluster [ROOT]
    import sys

    with slurm_cluster(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-")) as c:
        print(c)
        print(c.run("sinfo", "-N", "-l").stdout)
        print(c.run("scontrol", "show", "node", NODE).stdout)
