"""The head registry: name -> the module that trains and loads that kind of head.

Each head module exposes two functions:

- ``train(*, train, val, seed, class_weight, log_step, **options) -> base.TrainOutcome``, where
  ``options`` are exactly the fields of that head's params section (``train_head.<name>``);
- ``load(folder, description) -> base.TrainedHead``, reading what its ``TrainedHead.save`` wrote.

Modules are imported only when their head is used, so that naming the heads (the params
schema does) costs nothing and the logistic head never imports TensorFlow. A new head (the
``finetune`` head, for instance) is one module plus one :func:`register_head` call here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

_HEADS: dict[str, str] = {}


def register_head(name: str, module: str) -> None:
    """Registers head ``name``, trained and loaded by the module named ``module``."""
    if name in _HEADS and _HEADS[name] != module:
        raise ValueError(f"head '{name}' is already registered by {_HEADS[name]}")
    _HEADS[name] = module


register_head("logistic", "transferlab.heads.logistic")
register_head("dense", "transferlab.heads.dense")


def names() -> list[str]:
    """The registered head names, sorted."""
    return sorted(_HEADS)


def head_module(name: str) -> ModuleType:
    """The module of head ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in _HEADS:
        raise ValueError(f"Unsupported head '{name}'; choose one of: {', '.join(names())}")
    return importlib.import_module(_HEADS[name])


def train(name: str, **arguments: Any) -> Any:
    """Trains a head of kind ``name``; see the module docstring for the arguments."""
    return head_module(name).train(**arguments)


def load_head(folder: str | Path) -> Any:
    """Loads a head saved by the train_head stage (a folder holding head.json).

    Returns:
        A :class:`transferlab.heads.base.TrainedHead`: ``predict_proba(raw features) -> (N, C)``
        and ``description`` (classes, blocks, settings).
    """
    from transferlab.heads import base

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"head folder {folder} not found; run the train_head stage first (dvc repro train_head)")
    description = base.read_description(folder)
    return head_module(description.head).load(folder, description)
