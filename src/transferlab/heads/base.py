"""What every head shares: the trained-head protocol, the per-block standardizer, head.json.

A head never sees raw features unscaled: each block (one backbone of a stack) is standardized
column by column with statistics from the training split, then scaled so that every block has
the same total variance. Without that, the widest block, or the one whose activations happen
to be largest, would dominate the head. For a single block the result is plain
standardization, so the usual meaning of C (logistic) and learning rates (dense) carries over.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from transferlab.features import files

HEAD_FORMAT = 1
DESCRIPTION_FILE = "head.json"
STANDARDIZER_FILE = "standardizer.npz"

# Called by trainers once per step (an epoch, or one C of a grid) with metric name -> value.
StepLogger = Callable[[Mapping[str, float]], None]


@dataclass(frozen=True)
class HeadDescription:
    """What head.json holds: the head's kind, its classes, the blocks it expects, its settings."""

    head: str
    class_names: tuple[str, ...]
    blocks: tuple[files.Block, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return sum(block.width for block in self.blocks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "head": self.head,
            "class_names": list(self.class_names),
            "feature_dim": self.feature_dim,
            "backbone": files.stack_name(self.blocks),
            "blocks": [block.describe() for block in self.blocks],
            "input": "raw features as written by extract_features; the head standardizes per block itself",
            "settings": self.settings,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], source: str) -> HeadDescription:
        try:
            if payload["format"] != HEAD_FORMAT:
                raise ValueError(f"{source}: head format {payload['format']!r} is not {HEAD_FORMAT}; re-run train_head")
            blocks = tuple(
                files.Block(
                    spec=str(b["spec"]),
                    weights=str(b["weights"]),
                    width=int(b["width"]),
                    offset=int(b["offset"]),
                    name=str(b.get("name", "")),
                )
                for b in payload["blocks"]
            )
            return cls(
                head=str(payload["head"]),
                class_names=tuple(str(name) for name in payload["class_names"]),
                blocks=blocks,
                settings=dict(payload.get("settings", {})),
                files=dict(payload.get("files", {})),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source} is incomplete ({error!r} missing or malformed); re-run train_head") from None

    def write(self, folder: Path) -> None:
        (folder / DESCRIPTION_FILE).write_text(
            json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def check_features(self, features: files.Features) -> None:
        """Raises ``ValueError`` unless ``features`` come from the backbones and classes this head knows."""
        if features.class_names != self.class_names:
            raise ValueError(
                f"{features.source}: classes {list(features.class_names)} differ from the head's "
                f"{list(self.class_names)}; re-run train_head on these features"
            )
        if features.blocks != self.blocks:
            raise ValueError(
                f"{features.source}: blocks {_blocks_text(features.blocks)} differ from the head's "
                f"{_blocks_text(self.blocks)}; re-run train_head on these features"
            )


def _blocks_text(blocks: Sequence[files.Block]) -> str:
    return ", ".join(f"{b.spec} ({b.weights}, {b.width} columns)" for b in blocks) or "none"


class TrainedHead(Protocol):
    """A trained head: what evaluate, export and predict use."""

    description: HeadDescription

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities, float64 (N, C), rows summing to 1, for raw features (N, D)."""

    def save(self, folder: Path) -> None:
        """Writes the head's files into ``folder`` (an empty, temporary directory)."""


def predict_split(head: TrainedHead, split: files.Features) -> np.ndarray:
    """Class probabilities (N, C) for every row of ``split``, whatever the head reads.

    A head that classifies pixels (``scratch``) has a ``predict_split`` of its own that opens
    each row's image and view (``paths``, ``recipes``, ``images_directory``); every other head
    gets the rows' features.
    """
    own = getattr(head, "predict_split", None)
    return own(split) if own is not None else head.predict_proba(split.features)


@dataclass(frozen=True)
class TrainOutcome:
    """A trainer's result: the head, and what it reports about its own training."""

    head: TrainedHead
    report: dict[str, Any]


class BlockStandardizer:
    """Per-block standardization, with scikit-learn's fit/transform names.

    Each column is centred and divided by its standard deviation (a constant column by 1, as
    ``StandardScaler`` does); each block is then scaled by ``sqrt(D / (B * width))`` so that
    every one of the B blocks carries the same total variance, ``D / B``.

    Plain NumPy: loading a head (evaluate, export, predict) imports no scikit-learn, which costs
    1.5-2 s per process on a 2-core machine (issue 15's head loop). As a scikit-learn pipeline
    step, use :func:`transferlab.heads.logistic.pipeline_standardizer`.

    Args:
        widths: the width of each block, in column order; they must sum to the feature width.
    """

    def __init__(self, widths: Sequence[int] = ()):
        self.widths = widths

    def fit(self, features: np.ndarray, labels: Any = None) -> BlockStandardizer:
        data = self._checked(features, fitted=False)
        deviation = data.std(axis=0)
        deviation[deviation == 0.0] = 1.0  # a dead unit carries no information; leave it at 0
        self.mean_ = data.mean(axis=0)
        self.scale_ = deviation * self.block_factors()
        return self

    def fit_transform(self, features: np.ndarray, labels: Any = None) -> np.ndarray:
        return self.fit(features, labels).transform(features)

    def transform(self, features: np.ndarray) -> np.ndarray:
        if not hasattr(self, "scale_"):
            raise ValueError("BlockStandardizer is not fitted; call fit() first")
        return (self._checked(features, fitted=True) - self.mean_) / self.scale_

    def block_factors(self) -> np.ndarray:
        """Per-column multiplier of the standard deviation that equalizes the blocks' variance."""
        widths = np.asarray(self.widths, dtype=np.int64)
        total = float(widths.sum())
        return np.repeat(np.sqrt(widths * len(widths) / total), widths)

    @classmethod
    def from_arrays(cls, widths: Sequence[int], mean: np.ndarray, scale: np.ndarray) -> BlockStandardizer:
        """A fitted standardizer from saved statistics."""
        standardizer = cls(widths=tuple(int(width) for width in widths))
        standardizer.mean_ = np.asarray(mean, dtype=np.float64)
        standardizer.scale_ = np.asarray(scale, dtype=np.float64)
        return standardizer

    def save(self, path: Path) -> None:
        save_arrays(path, widths=np.asarray(self.widths, dtype=np.int64), mean=self.mean_, scale=self.scale_)

    @classmethod
    def load(cls, path: Path) -> BlockStandardizer:
        with np.load(path, allow_pickle=False) as arrays:
            return cls.from_arrays(arrays["widths"], arrays["mean"], arrays["scale"])

    def _checked(self, features: np.ndarray, fitted: bool) -> np.ndarray:
        data = np.asarray(features, dtype=np.float64)
        width = int(sum(self.widths))
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"block widths must be positive, got {list(self.widths)}")
        if data.ndim != 2 or data.shape[1] != width:
            raise ValueError(f"expected features of shape (N, {width}) (blocks {list(self.widths)}), got {data.shape}")
        if not fitted and data.shape[0] < 1:
            raise ValueError("cannot standardize: no training rows")
        return data


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Writes arrays as an .npz that ``np.load(allow_pickle=False)`` reads, byte-identical for equal arrays.

    ``np.savez`` stamps each member with the current time, so an unchanged head would get a new
    hash and DVC would re-run evaluate for nothing; here every member carries a fixed date.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asarray(array), allow_pickle=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def description_for(
    head: str, features: files.Features, settings: Mapping[str, Any], file_names: Mapping[str, str]
) -> HeadDescription:
    """The description of a head of kind ``head`` trained on ``features``, saved as ``file_names`` (role -> file)."""
    return HeadDescription(
        head=head,
        class_names=features.class_names,
        blocks=features.blocks,
        settings=dict(settings),
        files=dict(file_names),
    )


def read_description(folder: Path) -> HeadDescription:
    """Reads and checks ``folder/head.json``."""
    path = folder / DESCRIPTION_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found; {folder} is not a saved head (run the train_head stage first)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run train_head") from None
    return HeadDescription.from_json(payload, str(path))


def accuracy_and_loss(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (argmax) and mean cross-entropy (scikit-learn's log_loss) of ``probabilities`` (N, C) for ``labels``."""
    correct, loss = _correct_and_loss_sums(probabilities, np.asarray(labels))
    return {"accuracy": correct / len(labels), "loss": loss / len(labels)}


def split_accuracy_and_loss(head: TrainedHead, split: files.Features) -> dict[str, float]:
    """:func:`accuracy_and_loss` of ``head`` on every row of ``split``, holding one chunk of rows' probabilities.

    A head that reads features predicts :func:`transferlab.features.files.row_chunks` of them
    one at a time (scikit-learn's log_loss copies its input several times: 0.4 KB per row, 300
    MB for 800k rows of 10 classes); a head with a ``predict_split`` of its own predicts the split whole.
    """
    own = getattr(head, "predict_split", None)
    if own is not None:
        return accuracy_and_loss(own(split), split.labels)
    labels = np.asarray(split.labels)
    correct = loss = 0.0
    for rows, chunk in files.row_chunks(split.features):
        chunk_correct, chunk_loss = _correct_and_loss_sums(head.predict_proba(chunk), labels[rows])
        correct, loss = correct + chunk_correct, loss + chunk_loss
    return {"accuracy": correct / len(labels), "loss": loss / len(labels)}


def _correct_and_loss_sums(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(rows whose argmax is their label, the sum of their log losses), by scikit-learn's metrics."""
    from sklearn import metrics

    classes = np.arange(probabilities.shape[1])
    return (
        float(metrics.accuracy_score(labels, probabilities.argmax(axis=1), normalize=False)),
        float(metrics.log_loss(labels, probabilities, labels=classes, normalize=False)),
    )


def check_trainable(train: files.Features, val: files.Features) -> None:
    """Raises ``ValueError`` unless every class has training rows and val matches train."""
    if len(train) == 0:
        raise ValueError(f"{train.source} has no rows; the head needs training images")
    missing = [name for index, name in enumerate(train.class_names) if not np.any(train.labels == index)]
    if missing:
        raise ValueError(
            f"{train.source}: class(es) {', '.join(missing)} have no training images; add images or lower "
            "split.val_fraction / split.test_fraction"
        )
    if val.class_names != train.class_names or val.blocks != train.blocks:
        raise ValueError(f"{val.source} and {train.source} come from different extractions; re-run extract_features")


def required_file(folder: Path, name: str) -> Path:
    """``folder / name``, or ``ValueError`` saying the saved head is incomplete."""
    path = Path(folder) / name
    if not path.is_file():
        raise ValueError(f"{path} not found; the saved head in {folder} is incomplete (re-run train_head)")
    return path
