"""train_head: read the features files, train the chosen head, save it, report on it.

The head is trained on the training split (augmented views included) and judged on the
validation split; the test split is left to the evaluate stage. Per-step curves (epochs for
the dense head, the C grid for the logistic head) go to dvclive, for ``dvc plots show``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from transferlab import heads
from transferlab.backbones import taps
from transferlab.core import atomic
from transferlab.heads import base

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = (
    "features", "labels", "class_names", "paths", "sha256", "recipes",
    "block_specs", "block_weights", "block_widths", "block_offsets",
)


def load_features(path: str | os.PathLike, *, images_directory: str | os.PathLike | None = None) -> base.Features:
    """Reads and checks one features file written by extract_features (see docs/DESIGN.md).

    Args:
        path: the ``.npz`` file.
        images_directory: the folder its ``paths`` are relative to (data/raw/images), recorded
            in the result for heads that read pixels; ``None`` when only features are needed.

    Raises:
        ValueError: naming the file, when it is missing, unreadable or breaks the contract.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"features file {path} not found; run the extract_features stage first (dvc repro extract_features)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable features file ({error}); re-run extract_features") from None
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks key(s) {', '.join(missing)}; re-run extract_features")
    blocks = _blocks(arrays, path)
    features, labels, class_names = _matrix(arrays, path, blocks)
    rows = features.shape[0]
    per_row = {key: tuple(str(item) for item in arrays[key].reshape(-1)) for key in ("paths", "sha256", "recipes")}
    for key, values in per_row.items():
        if len(values) != rows:
            raise ValueError(f"{path}: '{key}' has {len(values)} entries for {rows} feature rows; re-run extract_features")
    return base.Features(
        features=features, labels=labels, class_names=class_names, blocks=blocks,
        paths=per_row["paths"], sha256=per_row["sha256"], recipes=per_row["recipes"],
        engine=_engine(arrays), source=str(path),
        images_directory=None if images_directory is None else Path(images_directory),
        taps=load_taps(path, rows),
    )


def load_taps(path: str | os.PathLike, rows: int) -> base.Taps | None:
    """The tap activations beside a features file (``taps/<split>.npy``), memory-mapped; None if absent.

    Args:
        path: the features file, e.g. ``data/features/val.npz``.
        rows: its number of rows; the taps must have as many.

    Raises:
        ValueError: naming the file, when it is unreadable or does not match the features.
    """
    path = Path(path)
    folder = path.parent / taps.FOLDER
    file = folder / f"{path.stem}.npy"
    if not file.is_file():
        return None
    try:
        description = json.loads((folder / taps.DESCRIPTION_FILE).read_text(encoding="utf-8"))
        activations = np.load(file, mmap_mode="r", allow_pickle=False)
        layer, block = str(description["layer"]), str(description["member"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{file} or its {taps.DESCRIPTION_FILE} is unreadable ({error!r}); re-run extract_features") from None
    if activations.ndim != 4 or activations.shape[0] != rows:
        raise ValueError(
            f"{file}: tap activations {activations.shape} do not give one (H, W, C) map per row of {path} "
            f"({rows} rows); re-run extract_features"
        )
    return base.Taps(activations=activations, layer=layer, block=block,
                     backbone_file=folder / str(description.get("backbone_file", taps.BACKBONE_FILE)),
                     description=description)


def _blocks(arrays: Mapping[str, np.ndarray], path: Path) -> tuple[base.Block, ...]:
    specs, weights = arrays["block_specs"].reshape(-1), arrays["block_weights"].reshape(-1)
    widths, offsets = arrays["block_widths"].reshape(-1), arrays["block_offsets"].reshape(-1)
    if not (len(specs) == len(weights) == len(widths) == len(offsets) >= 1):
        raise ValueError(f"{path}: block_specs, block_weights, block_widths and block_offsets must have one entry per block")
    expected_offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    if np.any(widths < 1) or not np.array_equal(offsets, expected_offsets):
        raise ValueError(f"{path}: block widths {widths.tolist()} and offsets {offsets.tolist()} do not tile the columns")
    names = arrays["block_names"].reshape(-1) if "block_names" in arrays else [""] * len(specs)
    if len(names) != len(specs):
        raise ValueError(f"{path}: block_names must have one entry per block")
    return tuple(
        base.Block(spec=str(spec), weights=str(weight), width=int(width), offset=int(offset), name=str(name))
        for spec, weight, width, offset, name in zip(specs, weights, widths, offsets, names)
    )


def _matrix(
    arrays: Mapping[str, np.ndarray], path: Path, blocks: Sequence[base.Block]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    features, labels = arrays["features"], arrays["labels"]
    class_names = tuple(str(name) for name in arrays["class_names"].reshape(-1))
    width = sum(block.width for block in blocks)
    if features.ndim != 2 or features.shape[1] != width or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"{path}: 'features' must be float (N, {width}) to match its blocks, got {features.dtype} {features.shape}"
        )
    if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be integers, one per feature row, got {labels.dtype} {labels.shape}")
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"{path}: 'class_names' must be non-empty and unique, got {list(class_names)}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{path}: labels must lie in 0..{len(class_names) - 1} (one per class name)")
    bad_rows = int(np.count_nonzero(~np.isfinite(features).all(axis=1)))
    if bad_rows:
        raise ValueError(f"{path}: {bad_rows} feature row(s) hold NaN or infinity; re-run extract_features")
    return features, labels.astype(np.int64), class_names


def _engine(arrays: Mapping[str, np.ndarray]) -> Any:
    # Optional: extract_features may record the engine(s) it ran in the features file.
    for key in ("block_engines", "engine"):
        if key in arrays:
            values = [str(item) for item in arrays[key].reshape(-1)]
            return values[0] if len(values) == 1 else values
    return None


def load_splits(
    folder: str | os.PathLike, names: Sequence[str] = SPLITS, *, images_directory: str | os.PathLike | None = None
) -> dict[str, base.Features]:
    """Reads ``<folder>/<name>.npz`` for each split name; all must share classes and blocks.

    ``images_directory`` is passed on to :func:`load_features`.
    """
    splits = {name: load_features(Path(folder) / f"{name}.npz", images_directory=images_directory) for name in names}
    first = splits[names[0]]
    for split in splits.values():
        if split.class_names != first.class_names or split.blocks != first.blocks:
            raise ValueError(
                f"{split.source} and {first.source} differ in classes or backbones; they come from different "
                "extractions: re-run extract_features"
            )
    return splits


@dataclass(frozen=True)
class TrainingResult:
    """A trained head and the train_head metrics (metrics/train_head.json)."""

    head: base.TrainedHead
    metrics: dict[str, Any]


def train_head(
    *,
    head: str,
    train: base.Features,
    val: base.Features,
    seed: int,
    class_weight: str,
    options: Mapping[str, Any],
    log_step: base.StepLogger | None = None,
) -> TrainingResult:
    """Trains a head of kind ``head`` (see :mod:`transferlab.heads`) and measures it.

    Args:
        head: a registered head name, e.g. ``logistic`` or ``dense``.
        train: training features.
        val: validation features (C selection, early stopping, the reported val figures).
        seed: the run's seed (params ``base.seed``).
        class_weight: ``none`` or ``balanced``.
        options: the head's own settings, i.e. the fields of ``train_head.<head>`` in params.yaml.
        log_step: receives the per-step curves (see :func:`live_curves`).

    Returns:
        The head, and metrics: head, seconds (training time), train and val accuracy, loss and
        examples, plus what the head reports (``c`` for logistic; ``best_epoch`` and ``epochs_run``
        for dense and scratch).
    """
    started = time.perf_counter()
    outcome = heads.train(head, train=train, val=val, seed=seed, class_weight=class_weight, log_step=log_step, **options)
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {"head": head, "seconds": round(seconds, 3), "classes": len(train.class_names),
                               "feature_dim": int(train.features.shape[1])}
    for name, split in (("train", train), ("val", val)):
        metrics[name] = {"examples": len(split)}
        if len(split):
            metrics[name].update(base.accuracy_and_loss(base.predict_split(outcome.head, split), split.labels))
    metrics.update(outcome.report)
    return TrainingResult(head=outcome.head, metrics=metrics)


def save_head(head: base.TrainedHead, folder: str | os.PathLike) -> None:
    """Saves ``head`` into ``folder``, atomically: the folder is complete or left as it was."""
    with atomic.atomic_directory(folder) as temporary:
        head.save(temporary)


@contextlib.contextmanager
def live_curves(folder: str | os.PathLike) -> Iterator[base.StepLogger]:
    """Yields a ``log_step`` that appends each step's metrics to dvclive histories in ``folder``.

    ``folder`` ends up holding ``train/loss.tsv``, ``val/accuracy.tsv`` and so on (columns
    ``step`` and the metric, dvclive's format, what ``dvc plots`` reads) and nothing else; it is
    swapped in atomically when the block completes.
    """
    # dvclive's own history writer, without ``dvclive.Live``: Live inspects the enclosing git and
    # DVC repositories (it fails in a repository without commits, and runs ``dvc init`` in a git
    # repository that has no .dvc), which a pipeline stage must not do.
    from dvclive.plots import Metric

    with atomic.atomic_directory(folder) as temporary:
        histories: dict[str, Metric] = {}
        steps = itertools.count()

        def log_step(values: Mapping[str, float]) -> None:
            step = next(steps)
            for name, value in values.items():
                history = histories.setdefault(name, Metric(name, str(temporary)))
                history.step = step
                history.dump(float(value))

        yield log_step
        written = temporary / Metric.subfolder
        if written.is_dir():
            for item in sorted(written.iterdir()):
                os.replace(item, temporary / item.name)
            written.rmdir()
