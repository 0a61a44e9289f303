"""The download step: a backbone folder from a builtin tiny model, the Hugging Face hub, or disk.

`builtin:tiny-qwen2-vl` is the tiny model as transformers 5 saves it; `builtin:tiny-qwen2-vl-release`
is the same model in the file layout of the official Qwen2-VL-2B-Instruct release (see `tiny`).
"""

import json
import logging
import shutil
from pathlib import Path

from vlaflow.backbone.folder import verify_model_folder
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory, link_or_copy

logger = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny-qwen2-vl"
BUILTIN_TINY_RELEASE = "builtin:tiny-qwen2-vl-release"
BUILTINS = (BUILTIN_TINY, BUILTIN_TINY_RELEASE)
HUB_PREFIX = "hf:"
SOURCE_RECORD = "vlaflow_source.json"  # where a hub download records the commit it got
SOURCE_FORMS = f"'{BUILTIN_TINY}', '{BUILTIN_TINY_RELEASE}', 'hf:<org>/<name>@<revision>', or an existing local folder"


def parse_hub_source(source: str) -> tuple[str, str]:
    repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    if not repo_id or "/" not in repo_id or not revision:
        raise VlaflowError(
            f"hub source {source!r}: expected 'hf:<org>/<name>@<revision>' (pin a revision: a commit, tag or branch)"
        )
    return repo_id, revision


def download_from_hub(source: str, repo_id: str, revision: str, folder: Path) -> str:
    """Download the repository at the commit `revision` names into `folder`, and record the commit
    in `folder/vlaflow_source.json`. A branch or tag can move: the files are those of the commit
    it named now, and the log says which commit to pin. Returns the commit."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        commit = HfApi().repo_info(repo_id, revision=revision).sha
        snapshot_download(repo_id=repo_id, revision=commit, local_dir=folder)
    except OfflineModeIsEnabled:
        raise VlaflowError(f"hub source {source!r}: HF_HUB_OFFLINE is set; unset it to download") from None
    except (HfHubHTTPError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VlaflowError(f"hub source {source!r}: {reason}") from None
    if commit != revision:
        logger.warning(
            "hub source %r: %r is a branch or tag; it names commit %s today. Pin it for a reproducible run: "
            "model.backbone: %s%s@%s",
            source,
            revision,
            commit,
            HUB_PREFIX,
            repo_id,
            commit,
        )
    record = {"source": source, "repo_id": repo_id, "revision": revision, "commit": commit}
    (Path(folder) / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return commit


def download(source: str, out: Path, seed: int = 0) -> Path:
    """Write the backbone named by `source` to `out` (atomically) and verify it is complete."""
    out = Path(out)
    if source.startswith(HUB_PREFIX):
        repo_id, revision = parse_hub_source(source)
    elif source not in BUILTINS:
        if not Path(source).is_dir():
            raise VlaflowError(f"source {source!r}: not one of {SOURCE_FORMS}")
        verify_model_folder(Path(source))
    with atomic_directory(out) as tmp:
        if source == BUILTIN_TINY:
            from vlaflow.backbone.tiny import build_tiny_qwen2_vl

            build_tiny_qwen2_vl(tmp, seed=seed)
        elif source == BUILTIN_TINY_RELEASE:
            from vlaflow.backbone.tiny import build_tiny_qwen2_vl_release

            build_tiny_qwen2_vl_release(tmp, seed=seed)
        elif source.startswith(HUB_PREFIX):
            download_from_hub(source, repo_id, revision, tmp)
        else:
            shutil.copytree(source, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
        verify_model_folder(tmp)
    return out
