"""Hugging Face Hub repo ids as inputs: `org/name` or `org/name@revision`, resolved to a snapshot folder of the
local Hugging Face cache through huggingface_hub's own API (`snapshot_download`), which knows the cache's
layout, its refs and its environment variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).

A path that exists is always a path: a repo id is only tried for an argument that names nothing on disk.
Downloading happens only when allowed, by `download=True` (the CLI's --download) or LORASURGEON_DOWNLOAD=1
in the environment, never implicitly; a download skips PyTorch pickles and other frameworks' weights, which
lorasurgeon never reads. The snapshot folder holds links into the repository's blobs/, which `layout` follows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lorasurgeon.errors import InputError

DOWNLOAD_ENV = "LORASURGEON_DOWNLOAD"
# What may be a Hub repo id (huggingface_hub's validate_repo_id has the last word): two names of letters,
# digits, "-", "_" and "." that start with a letter or digit, so that "../x" or ".hidden/y" stay paths.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
NOT_DOWNLOADED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx", "*.gguf"]


def resolve(path_or_repo_id: str | Path, *, download: bool, cache_dir: Path | None = None) -> Path:
    """The local path of `path_or_repo_id`: itself when it exists, else the cached snapshot of the Hub repo
    `org/name[@revision]` (revision: a branch, tag or commit; default main) in `cache_dir` (default: the
    Hugging Face cache). Downloads it first only when `download` is true or LORASURGEON_DOWNLOAD=1.

    Raises InputError naming the argument: no such path and no repo id; not in the cache (and no download
    allowed); or what huggingface_hub reports (unknown repo or revision, offline, ...).

        >>> resolve("samples/base", download=False)
        PosixPath('samples/base')
    """
    path = Path(path_or_repo_id)
    if os.path.lexists(path):
        return path
    spec = str(path_or_repo_id)
    repo_id, _, revision = spec.partition("@")
    if not REPO_ID.fullmatch(repo_id) or spec.endswith("@"):
        raise InputError(f"{spec}: no such file or directory")
    allowed = download or os.environ.get(DOWNLOAD_ENV) == "1"
    return Path(_snapshot(spec, repo_id, revision or None, cache_dir, allowed))


def display_name(folder: Path) -> str:
    """The name `folder` goes by in a default OUT name: a Hub cache snapshot's (`models--org--name/snapshots/<rev>`)
    is its repository's (`name`), not the commit hash; any other folder's is its own."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent.name.split("--")[-1]
    return real.name


def _snapshot(spec: str, repo_id: str, revision: str | None, cache_dir: Path | None, allowed: bool) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise InputError(f"{spec}: no such file or directory (install huggingface_hub to read Hub repo ids)") from None
    options: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "ignore_patterns": NOT_DOWNLOADED}
    try:
        return str(snapshot_download(repo_id, local_files_only=not allowed, **options))
    except LocalEntryNotFoundError as e:
        incomplete = getattr(e, "snapshot_path", None)  # IncompleteSnapshotError: the files the user chose
        if incomplete is not None:
            return str(incomplete)
        if not allowed:
            raise InputError(
                f"{spec}: no such file or directory, and not in the local Hugging Face cache; pass --download "
                f"(or set {DOWNLOAD_ENV}=1) to download it from the Hub"
            ) from None
        raise InputError(f"{spec}: cannot download from the Hugging Face Hub: {_first_line(e)}") from None
    except ValueError as e:  # huggingface_hub's HFValidationError: not a repo id after all
        raise InputError(f"{spec}: no such file or directory, nor a Hub repo id ({_first_line(e)})") from None
    except OSError as e:  # the Hub's HTTP errors (unknown repo or revision, gated, ...) are OSErrors
        raise InputError(f"{spec}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
