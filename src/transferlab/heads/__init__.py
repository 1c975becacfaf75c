"""The head registry: name -> the module that trains and loads that kind of head.

Each head module exposes two functions:

- ``train(*, train, val, seed, class_weight, log_step, **options) -> base.TrainOutcome``, where
  ``options`` are exactly the fields of that head's params section (``train_head.<name>``);
- ``load(folder, description) -> base.TrainedHead``, reading what its ``TrainedHead.save`` wrote;
- optionally ``DETERMINISTIC``: True (or a callable ``options -> bool``) when every seed gives the
  same model, so that ``train_head.seeds`` trains it once (:mod:`transferlab.heads.seeds`).

Modules are imported only when their head is used, so that naming the heads (the params
schema does) costs nothing and the logistic head never imports TensorFlow. A new head (the
``finetune`` head, for instance) is one module plus one :func:`register_head` call here. A head
that reads pixels (``scratch``: a CNN trained from scratch, the course's baseline) gets the same
``Features`` rows, with ``images_directory`` telling it where their images are.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from transferlab.core import params

_HEADS: dict[str, str] = {}
_PIXEL_HEADS: set[str] = set()
INPUTS = ("features", "pixels")


def register_head(name: str, module: str, *, reads: str = "features") -> None:
    """Registers head ``name``, trained and loaded by the module named ``module``.

    Args:
        name: the head's name in params (``train_head.head``).
        module: the module's import name.
        reads: ``features`` (the backbone's embeddings) or ``pixels`` (each row's image, opened
            from ``Features.images_directory``; such a head has ``predict_split``).
    """
    if name not in params.HEAD_NAMES:
        raise ValueError(f"head '{name}' is not in transferlab.core.params.HEAD_NAMES; add it there first")
    if name in _HEADS and _HEADS[name] != module:
        raise ValueError(f"head '{name}' is already registered by {_HEADS[name]}")
    if reads not in INPUTS:
        raise ValueError(f"Unsupported input '{reads}' for head '{name}'; choose one of: {', '.join(INPUTS)}")
    _HEADS[name] = module
    if reads == "pixels":
        _PIXEL_HEADS.add(name)


register_head("logistic", "transferlab.heads.logistic")
register_head("dense", "transferlab.heads.dense")
register_head("scratch", "transferlab.heads.scratch", reads="pixels")
register_head("finetune", "transferlab.heads.finetune")
register_head("fusion", "transferlab.heads.fusion")


def names() -> list[str]:
    """The registered head names, sorted."""
    return sorted(_HEADS)


def reads_pixels(name: str) -> bool:
    """True when head ``name`` is trained on the rows' pixels rather than their features."""
    return name in _PIXEL_HEADS


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
