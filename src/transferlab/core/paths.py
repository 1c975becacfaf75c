"""Where things are: the repository root, paths given in params, the embedding cache.

The rule for relative paths in params.yaml: they are resolved against the *main* repository
root, the folder holding dvc.yaml. ``dvc exp run --queue`` runs each experiment in a temporary
copy under ``<root>/.dvc/tmp/exps/``, where ``../shared/...`` would point somewhere else; there,
the main root is the folder that holds that ``.dvc``. ``TRANSFERLAB_ROOT`` overrides the search.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import platformdirs

QUEUED_EXPERIMENTS_MARKER = (".dvc", "tmp", "exps")


def repository_root(start: str | os.PathLike | None = None) -> Path:
    """Returns the main repository root (see the module docstring for the rule)."""
    override = os.environ.get("TRANSFERLAB_ROOT")
    if override:
        return Path(override).resolve()
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    marker_length = len(QUEUED_EXPERIMENTS_MARKER)
    for index in range(len(parts) - marker_length + 1):
        if parts[index : index + marker_length] == QUEUED_EXPERIMENTS_MARKER:
            return Path(*parts[:index])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".dvc").is_dir():
            return candidate
    return here


def resolve_param_path(value: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Resolves a path from params: absolute and ``~`` paths as they are, others against the root."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_absolute():
        return path
    return (Path(root) if root is not None else repository_root()) / path


def default_cache_directory() -> Path:
    """The embedding cache's home: ``$TRANSFERLAB_CACHE_DIR`` or the user's cache directory."""
    override = os.environ.get("TRANSFERLAB_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("transferlab"))


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``folder`` (made if missing), or None when they can.

    Asks the file system itself, by creating (and removing) a small file: permission bits say
    nothing for root, and a read-only mount, ``/proc`` or a file in the folder's place only
    show themselves when something is written.

    Args:
        folder: the folder to check, e.g. the embedding cache's.

    Returns:
        None, or a short reason such as ``"it is a file, not a folder"`` or
        ``"cannot create files there: [Errno 30] Read-only file system"``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it is a file, not a folder"
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            return "a part of its path is a file, not a folder"
        return f"cannot create it: {_describe(error)}"
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as error:
        return f"cannot create files there: {_describe(error)}"
    try:
        os.write(handle, b"probe")
    except OSError as error:
        return f"cannot write files there: {_describe(error)}"
    finally:
        os.close(handle)
        try:
            os.unlink(probe)
        except OSError:
            pass  # a folder that lets us create but not delete is still usable for a cache
    return None


def _describe(error: OSError) -> str:
    return f"[Errno {error.errno}] {error.strerror}" if error.strerror else str(error)
