"""Debian packages that tests need beside the Python environment (SLURM, Chromium), installed with
apt-get on a machine that lacks them, as CI's fresh machines do."""

import os
import shlex
import shutil
import subprocess


class PackagesUnavailable(RuntimeError):
    """The packages are missing and cannot be installed here (the reason is the message)."""


def apt_install(packages: tuple[str, ...], timeout: float = 600) -> None:
    """`apt-get update` then `apt-get install` the packages; PackagesUnavailable when that cannot
    be done (not root, no apt-get, a step failed or timed out)."""
    if os.geteuid() != 0:
        raise PackagesUnavailable(f"{' '.join(packages)} missing and not root, cannot apt-get install")
    apt = shutil.which("apt-get")
    if apt is None:
        raise PackagesUnavailable(f"{' '.join(packages)} missing and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", *packages]):
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise PackagesUnavailable(f"{shlex.join(step)} timed out after {timeout:.0f} s") from None
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise PackagesUnavailable(f"{shlex.join(step)} failed ({done.returncode}):\n{output}")
