"""Publishing adapters to, and fetching them from, a hub: the Hugging Face hub or a local hub folder.

A repo id is `org/name`. With `hub_dir` given, the hub is a plain folder in the same layout,
`<hub_dir>/<org>/<name>/<files>` (a shared drive, or what the tests use); without it, the repo lives on
the Hugging Face hub. Either way a repo holds exactly the files of the adapter folder (hidden files left
out, see `adapters.package.pack`), so `content_hash` of a fetched copy equals that of the published one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from swarmllm.adapters.package import AdapterError, AdapterNotFoundError, adapter_kind, pack, unpack

logger = logging.getLogger(__name__)

__all__ = ["fetch_from_hub", "is_repo_id", "publish_to_hub"]

# Exactly `org/name`, as in `models.source`; '.' and '..' parts are refused separately.
_REPO_ID = re.compile(r"[\w\-.]{1,96}/[\w\-.]{1,96}")


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a hub repo id, `org/name`."""
    return bool(_REPO_ID.fullmatch(text)) and not any(part in (".", "..") for part in text.split("/"))


def publish_to_hub(
    folder: str | os.PathLike[str], repo_id: str, hub_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
) -> str:
    """Publish the adapter in `folder` as repo `repo_id`; return the sha256 of its content.

    In a hub folder the repo is replaced as a whole (written aside, then renamed in). On the Hugging Face
    hub the repo is created if needed (`token`, else the saved login) and the files are uploaded in one
    commit; files of an earlier version that the new one lacks are not deleted there.
    """
    _check_repo_id(repo_id)
    kind = adapter_kind(folder)
    data = pack(folder)
    if hub_dir is not None:
        _publish_to_folder(data, Path(hub_dir) / repo_id)
    else:
        _publish_to_hf(data, repo_id, token)
    sha = hashlib.sha256(data).hexdigest()
    logger.info("published %s adapter %s to %s (sha256 %s)", kind, folder, hub_dir or "the Hugging Face hub", sha)
    return sha


def fetch_from_hub(
    repo_id: str, hub_dir: str | os.PathLike[str] | None = None, revision: str | None = None
) -> Path:
    """A local folder holding the adapter of repo `repo_id` (AdapterNotFoundError if there is none).

    From a hub folder this is the repo's own folder; from the Hugging Face hub, a snapshot in the hub's
    cache. `revision` (a branch, tag or commit) exists only on the Hugging Face hub.
    """
    _check_repo_id(repo_id)
    if hub_dir is not None:
        if revision is not None:
            raise AdapterError("revisions exist only on the Hugging Face hub, not in a hub folder")
        path = Path(hub_dir) / repo_id
        if not path.is_dir():
            raise AdapterNotFoundError(f"no adapter repo {repo_id} in the hub folder {hub_dir}")
    else:
        path = _fetch_from_hf(repo_id, revision)
    adapter_kind(path)  # a repo that is not an adapter is an error here, not later in a server
    return path


def _check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise AdapterError(f"{repo_id!r} is not a hub repo id of the form org/name")


def _publish_to_folder(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp, old = target.parent / f".{target.name}.{token}.tmp", target.parent / f".{target.name}.{token}.old"
    try:
        unpack(data, tmp)
        # A folder cannot be replaced atomically when it exists, so readers may briefly find no repo,
        # but never a mix of two versions.
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _publish_to_hf(data: bytes, repo_id: str, token: str | None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="swarmllm-adapter-") as tmp:
        folder = unpack(data, Path(tmp) / "adapter")  # exactly the packed files, nothing hidden
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="swarmllm adapter")


def _fetch_from_hf(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision))
    # OSError covers no network and offline mode (LocalEntryNotFoundError); HTTP errors cover missing,
    # gated and private repos and unknown revisions.
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise AdapterNotFoundError(f"cannot fetch adapter repo {repo_id} from the Hugging Face hub: {e}") from e
