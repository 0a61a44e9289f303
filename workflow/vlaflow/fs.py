"""Write outputs so that a crash never leaves a half-written file or folder under the final name."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from vlaflow.errors import VlaflowError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_destination(out: Path) -> None:
    """Fail with one line naming `out` unless it can be written: its nearest existing ancestor
    must be a folder where a file can be made. Creates nothing; called before the work, not after."""
    out = Path(out).absolute()
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=f".{out.name}.probe-"):
            pass
    except OSError as error:
        raise VlaflowError(f"{out}: cannot be written there ({error.strerror or error})") from None


@contextmanager
def _staged(out: Path, folder: bool, replace: bool = False):
    out = Path(out)
    if not replace and (out.exists() or out.is_symlink()):
        raise VlaflowError(f"{out}: already exists; remove it or choose another output path")
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        _remove(tmp)


def atomic_directory(out: Path):
    """Yield an empty temporary folder beside `out`; rename it to `out` only if the block succeeds."""
    return _staged(out, folder=True)


def atomic_file(out: Path):
    """Yield a temporary path beside `out`; rename it to `out` only if the block succeeds."""
    return _staged(out, folder=False)


def replaced_file(out: Path):
    """As `atomic_file`, but an existing `out` is replaced: its readers see the old file or the
    new one, never a part."""
    return _staged(out, folder=False, replace=True)


def link_or_copy(source: str, destination: str) -> None:
    """Hard-link a file (no second copy of large weights on the same file system), else copy it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
