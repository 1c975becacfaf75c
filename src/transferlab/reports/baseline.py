"""A baseline to compare the workspace with: a git revision or a DVC experiment, and its committed files.

``transferlab gate`` and ``transferlab error-diff`` read a baseline's metrics and test predictions
with ``git show COMMIT:PATH``, not with ``dvc metrics show --json`` or ``dvc exp show --json``:

- the files they need are ``cache: false`` outputs in dvc.yaml, so every commit, and every DVC
  experiment (a commit under ``refs/exps/``), holds them in git, byte for byte;
- ``test_predictions.csv`` is not a metric: neither DVC command returns it, and the error diff
  needs it;
- ``git show`` answers in milliseconds, where a DVC command pays 1-2 s of start-up and collects
  every experiment of the baseline (``dvc exp show``), or every metrics file (``dvc metrics show``);
- it reads the file as committed: no JSON normalisation, nothing dropped (DVC drops lists).

An experiment name is resolved through its git ref (``refs/exps/<sha[:2]>/<sha[2:]>/<name>``), so
experiments of the current HEAD win over older ones of the same name.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EXPERIMENT_REFS = "refs/exps"


@dataclass(frozen=True)
class Baseline:
    """A resolved baseline: what the user named, the commit it is, and whether it is an experiment."""

    given: str
    commit: str  # full sha
    kind: str  # "revision" or "experiment"

    @property
    def label(self) -> str:
        """How reports name it: ``HEAD (1a2b3c4d)`` or ``experiment cmp-mobilenet (1a2b3c4d)``."""
        prefix = "experiment " if self.kind == "experiment" else ""
        return f"{prefix}{self.given} ({self.commit[:8]})"


def _git(*arguments: str, cwd: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *arguments], cwd=cwd, capture_output=True, text=True)


def resolve(name: str, *, cwd: Path | None = None) -> Baseline:
    """Resolves a git revision (``HEAD``, ``main``, a sha) or a DVC experiment name to a commit.

    Raises:
        ValueError: ``name`` is neither, or names experiments of several baselines (none of HEAD's).
    """
    if not name or name.startswith("-"):
        raise ValueError(f"'{name}' is not a revision; give a git revision (HEAD, main, a sha) or an experiment name")
    inside = _git("rev-parse", "--is-inside-work-tree", cwd=cwd)
    if inside.returncode != 0:
        raise ValueError("not inside a git repository; run this from the project's root (where dvc.yaml is)")
    found = _git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", cwd=cwd)
    if found.returncode == 0:
        return Baseline(given=name, commit=found.stdout.strip(), kind="revision")
    matches = _experiment_refs(name, cwd=cwd)
    if not matches:
        raise ValueError(
            f"'{name}' is neither a git revision nor a DVC experiment here; see `git log --oneline` and `dvc exp list`"
        )
    if len(matches) > 1:
        head = _git("rev-parse", "HEAD", cwd=cwd).stdout.strip()
        of_head = [ref for ref in matches if ref[0].startswith(f"{EXPERIMENT_REFS}/{head[:2]}/{head[2:]}/")]
        if len(of_head) != 1:
            listed = ", ".join(ref for ref, _ in matches)
            raise ValueError(f"experiment name '{name}' is ambiguous ({listed}); give the experiment's commit sha")
        matches = of_head
    return Baseline(given=name, commit=matches[0][1], kind="experiment")


def _experiment_refs(name: str, *, cwd: Path | None) -> list[tuple[str, str]]:
    listed = _git("for-each-ref", "--format=%(refname) %(objectname)", EXPERIMENT_REFS, cwd=cwd)
    pairs = [line.split(" ", 1) for line in listed.stdout.splitlines() if " " in line]
    return [(ref, commit) for ref, commit in pairs if ref.rsplit("/", 1)[-1] == name]


def read_text(baseline: Baseline, path: str, *, cwd: Path | None = None) -> str | None:
    """The file at ``path`` (relative to the project root) as committed in the baseline; None if absent."""
    shown = _git("show", f"{baseline.commit}:./{Path(path).as_posix()}", cwd=cwd)
    return shown.stdout if shown.returncode == 0 else None
