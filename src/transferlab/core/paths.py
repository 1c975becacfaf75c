"""Where things are: the repository root, paths given in params, the embedding cache.

The rule for relative paths in params.yaml: they are resolved against the *main* repository
root, the folder holding dvc.yaml. ``dvc exp run --queue`` runs each experiment in a temporary
copy under ``<root>/.dvc/tmp/exps/``, where ``../shared/...`` would point somewhere else; there,
the main root is the folder that holds that ``.dvc``. ``TRANSFERLAB_ROOT`` overrides the search.
"""

from __future__ import annotations

import os
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
