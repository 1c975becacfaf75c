"""Several seeds of one head (``train_head.seeds``): which seeds, which one is kept, where each is saved.

A single seed's accuracy says little about a 0.5-point difference between two backbones: the
spread across seeds does. With ``train_head.seeds = N`` a stochastic head (dense, finetune,
scratch) is trained N times and evaluate reports the mean and standard deviation across them,
and the metrics of their ensemble (averaged probabilities).

- **Seeds.** Seed 0 is ``base.seed`` itself, so ``seeds: 1`` trains exactly today's model and
  seed 0 of any N is that same model. Seed k >= 1 is the first 32-bit word of
  ``numpy.random.SeedSequence([base.seed, k])``: a hash, so the seeds of ``base.seed`` 42 and 43
  do not overlap the way ``base.seed + k`` would (42+1 is 43+0).
- **Deterministic heads** are trained once: a head module declares ``DETERMINISTIC = True`` (the
  logistic probe: lbfgs is deterministic, N fits give N identical models), or a callable
  ``DETERMINISTIC(options) -> bool`` when it depends on the head's settings.
- **The kept model** is the seed with the highest validation accuracy (ties: the lower
  validation loss, then the lower k). It is the one exported, so a prediction costs what a single
  model costs; choosing it looked only at validation, never at test. The ensemble's metrics sit
  beside it in metrics/evaluate.json, so the user sees what averaging the seeds would add.
- **Layout** (``models/head``): the kept seed's files at the top level, exactly as with one seed
  (evaluate, export and predict read it unchanged); every other seed k under ``seeds/<k>/``;
  ``seeds.json`` (:data:`RECORD_FILE`) says which k is at the top and each k's seed. With
  ``seeds: 1`` neither is written, so the folder is byte for byte what it was before seeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

FOLDER = "seeds"
RECORD_FILE = "seeds.json"
KEPT_BECAUSE = "highest validation accuracy (ties: lower validation loss, then lower k); test never looked at"
DETERMINISTIC_BECAUSE = "the {head} head is deterministic: one training gives every seed's model"


def derive(base_seed: int, count: int) -> list[int]:
    """The ``count`` seeds of a run: ``base_seed`` first, then a SeedSequence hash of ``(base_seed, k)`` each.

    Raises:
        ValueError: ``count`` is below 1.
    """
    if count < 1:
        raise ValueError(f"train_head.seeds must be at least 1, got {count}")
    seeds = [int(base_seed)]
    for k in range(1, count):
        # Nearly always the first word; a later one only if the first repeats an earlier seed (p ~ k / 2**32).
        words = np.random.SeedSequence([int(base_seed), k]).generate_state(count + 1)
        seeds.append(next(int(word) for word in words if int(word) not in seeds))
    return seeds


def deterministic(module: ModuleType, options: Mapping[str, Any]) -> bool:
    """Whether the head module ``module`` gives the same model for every seed (its ``DETERMINISTIC``)."""
    rule = getattr(module, "DETERMINISTIC", False)
    return bool(rule(options) if callable(rule) else rule)


@dataclass(frozen=True)
class SeedRun:
    """One seed's training, as compared when choosing the kept one."""

    k: int
    seed: int
    val_accuracy: float | None
    val_loss: float | None


def best(runs: Sequence[SeedRun]) -> int:
    """Index in ``runs`` of the one to keep: highest val accuracy, then lowest val loss, then lowest k.

    Runs without validation figures (an empty validation split) rank last; with none at all, k = 0.
    """
    if not runs:
        raise ValueError("no seed was trained")

    def rank(run: SeedRun) -> tuple[float, float, int]:
        accuracy = -1.0 if run.val_accuracy is None else run.val_accuracy
        loss = np.inf if run.val_loss is None else run.val_loss
        return (-accuracy, loss, run.k)

    return min(range(len(runs)), key=lambda index: rank(runs[index]))


@dataclass(frozen=True)
class Record:
    """What ``models/head/seeds.json`` holds.

    Attributes:
        requested: ``train_head.seeds``.
        seeds: the seed of each trained k (length = how many were trained: 1 for a deterministic head).
        kept: the k whose model is at the top level of models/head.
        kept_because: why that one.
    """

    requested: int
    seeds: tuple[int, ...]
    kept: int
    kept_because: str

    @property
    def trained(self) -> int:
        return len(self.seeds)

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "trained": self.trained,
            "seeds": list(self.seeds),
            "kept": self.kept,
            "kept_because": self.kept_because,
            "layout": f"k = {self.kept} at the top level, every other k in {FOLDER}/<k>/",
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], source: str) -> Record:
        try:
            record = cls(
                requested=int(payload["requested"]),
                seeds=tuple(int(seed) for seed in payload["seeds"]),
                kept=int(payload["kept"]),
                kept_because=str(payload.get("kept_because", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source} is incomplete ({error!r}); re-run train_head") from None
        if not 0 <= record.kept < record.trained:
            raise ValueError(f"{source}: kept seed k={record.kept} is not one of the {record.trained} trained; re-run")
        return record


def save(folder: Path, record: Record, others: Mapping[int, Any]) -> None:
    """Writes seeds.json and every other seed's head into ``folder/seeds/<k>/`` (``folder``: a temporary)."""
    expected = set(range(record.trained)) - {record.kept}
    if set(others) != expected:
        raise ValueError(f"seeds to save {sorted(others)} are not the trained ones but the kept: {sorted(expected)}")
    for k, head in sorted(others.items()):
        target = folder / FOLDER / str(k)
        target.mkdir(parents=True)
        head.save(target)
    (folder / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_record(folder: str | Path) -> Record | None:
    """models/head's seeds.json, or None when the head was trained with one seed (no file)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run train_head") from None
    return Record.from_json(payload, str(path))


def other_heads(folder: str | Path, record: Record, load: Callable[[Path], Any]) -> Iterator[tuple[int, Any]]:
    """``(k, head)`` for every trained k but the kept one, in order, each loaded only when reached.

    Args:
        folder: models/head (the kept head is its top level, loaded by the caller already).
        record: its :func:`read_record`.
        load: loads one head folder (``transferlab.heads.load_head``).
    """
    folder = Path(folder)
    for k in range(record.trained):
        if k == record.kept:
            continue
        path = folder / FOLDER / str(k)
        if not path.is_dir():
            raise ValueError(f"{path} not found; models/head lacks seed k={k} of {record.trained} (re-run train_head)")
        yield k, load(path)


def not_exported(head_folder: str | Path) -> Callable[[str, list[str]], list[str]]:
    """A ``shutil.copytree`` ``ignore``: leaves out the other seeds and seeds.json (only the kept model is exported)."""
    top = Path(head_folder).resolve()

    def ignore(directory: str, names: list[str]) -> list[str]:
        if Path(directory).resolve() != top:
            return []
        return [name for name in names if name in (FOLDER, RECORD_FILE)]

    return ignore
