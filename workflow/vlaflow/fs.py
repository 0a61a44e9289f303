"""Write outputs so that a crash never leaves a half-written file or folder under the final name."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from vlaflow.errors import VlaflowError


def _refuse_existing(path: Path) -> None:
    if path.exists() or path.is_symlink():
        raise VlaflowError(f"{path}: already exists; remove it or choose another output path")


@contextmanager
def atomic_directory(out: Path):
    """Yield an empty temporary folder beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    _refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path):
    """Yield a temporary path beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    _refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
