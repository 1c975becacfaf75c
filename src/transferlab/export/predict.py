"""Running an exported classifier (``models/export``) on image files.

The export stage writes one folder; this module is the one way to run it, shared by
``transferlab predict`` and the export stage's own check against evaluate (so what the stage
checked is what predict runs). The folder holds ``manifest.json``, ``labels.txt``, a copy of
the head (``head/``) and, by layout:

- ``classifier`` (every backbone is a Keras registry entry, or the head is itself a model of the
  pixels: ``scratch``, ``finetune``): ``model.keras``, one Keras model from a raw uint8 RGB
  image of any size to class probabilities, resizing and preprocessing inside; and, with
  ``export.tflite``, ``model.tflite``, the same network at fixed input size(s), one uint8 input
  per backbone input size, fed after the pipeline's own resize.
- ``stack`` (a ``tflite:`` backbone, head on embeddings): one ``.tflite`` file per backbone under
  ``backbones/`` (TFLite backbones copied, Keras ones converted), run with LiteRT, and the head's
  ``predict_proba`` on the concatenated embeddings.

Formats: ``keras`` (``model.keras``) and ``tflite`` (``model.tflite``, or the stack's TFLite
backbones). ``auto`` prefers ``tflite``: it resizes exactly as the pipeline does (Pillow), runs
on LiteRT, and needs no TensorFlow import (8-10 s of start-up on this machine).

Every image is decoded as training decodes it (:func:`transferlab.data.images.open_rgb`, with the
decompression-bomb limit the manifest records: :func:`max_image_pixels_of`) and, outside
``model.keras``, resized as training resizes it (:func:`transferlab.data.augment.render_view` with
the original recipe: Pillow bilinear on the whole image, no crop).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from transferlab.core import params
from transferlab.data import augment, images

EXPORT_FORMAT = "transferlab-export"
EXPORT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
HEAD_FOLDER = "head"
BACKBONES_FOLDER = "backbones"
LAYOUTS = ("classifier", "stack")
FORMATS = ("auto", "keras", "tflite")
DEFAULT_MODEL_FOLDER = Path("models") / "export"
RUN_EXPORT = "run `dvc repro export` to write it (or give --model DIR)"


# ---------------------------------------------------------------- the exported folder


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``folder/manifest.json``.

    Raises:
        ValueError: the folder or its manifest is missing, or the manifest is not a
            transferlab export of this version; the message says to run ``dvc repro export``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no exported model at {folder}: {RUN_EXPORT}")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no {MANIFEST_FILE}, so it is not an exported model: {RUN_EXPORT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run `dvc repro export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a transferlab export manifest; {RUN_EXPORT}")
    if manifest.get("version") != EXPORT_VERSION:
        raise ValueError(
            f"{path} has export version {manifest.get('version')!r}; this transferlab reads version "
            f"{EXPORT_VERSION}: re-run `dvc repro export`"
        )
    for key in ("layout", "class_names", "members", "files"):
        if key not in manifest:
            raise ValueError(f"{path} lacks '{key}'; re-run `dvc repro export`")
    if manifest["layout"] not in LAYOUTS:
        raise ValueError(f"{path}: unknown layout {manifest['layout']!r} (expected one of {', '.join(LAYOUTS)})")
    return manifest


def max_image_pixels_of(manifest: dict[str, Any]) -> int:
    """The decompression-bomb limit the model was trained with (params ``download.max_image_pixels``).

    An export written before manifests recorded it gets the params default.

    Raises:
        ValueError: the manifest records something other than a positive integer.
    """
    if "max_image_pixels" not in manifest:
        return params.DownloadParams().max_image_pixels
    recorded = manifest["max_image_pixels"]
    if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1:
        raise ValueError(
            f"manifest max_image_pixels must be a positive integer, got {recorded!r}; re-run `dvc repro export`"
        )
    return recorded


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Checks every file the manifest lists: present, same size and sha256 (an incomplete copy fails)."""
    for name, expected in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            raise ValueError(
                f"{path} is missing from the exported model; copy the whole folder, or re-run `dvc repro export`"
            )
        if path.stat().st_size != expected["bytes"] or images.sha256_file(path) != expected["sha256"]:
            raise ValueError(
                f"{path} differs from the file the export wrote (size or sha256); re-run `dvc repro export`"
            )


def available_formats(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The formats the folder can run, preferred first (``tflite`` before ``keras``)."""
    if manifest["layout"] == "stack":
        return ("tflite",)
    return tuple(name for name, key in (("tflite", "tflite_model"), ("keras", "keras_model")) if manifest.get(key))


def choose_format(manifest: dict[str, Any], requested: str = "auto") -> str:
    """Resolves ``auto`` to the preferred available format; checks an explicit one is there."""
    if requested not in FORMATS:
        raise ValueError(f"Unsupported format '{requested}'; choose one of: {', '.join(FORMATS)}")
    offered = available_formats(manifest)
    if not offered:
        raise ValueError("the exported model lists no model file; re-run `dvc repro export`")
    if requested == "auto":
        return offered[0]
    if requested not in offered:
        hint = " (set export.tflite: true and re-run `dvc repro export`)" if requested == "tflite" else ""
        raise ValueError(f"this export has no {requested} model{hint}; available: {', '.join(offered)}")
    return requested


@dataclass
class ExportedModel:
    """A loaded export: ``predict(images) -> (N, C)`` probabilities, in ``class_names`` order.

    Attributes:
        folder: the export folder.
        manifest: its manifest.json.
        format: ``keras`` or ``tflite``.
        class_names: the classes, in index order (labels.txt).
    """

    folder: Path
    manifest: dict[str, Any]
    format: str
    class_names: tuple[str, ...]
    runner: Any = field(repr=False)

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        """Class probabilities (N, C), float64, for decoded RGB images (any sizes)."""
        if not pictures:
            return np.zeros((0, len(self.class_names)))
        probabilities = np.asarray(self.runner.predict(pictures), dtype=np.float64)
        if probabilities.shape != (len(pictures), len(self.class_names)):
            raise ValueError(f"{self.folder}: the model gave shape {probabilities.shape}; re-run `dvc repro export`")
        return probabilities

    @property
    def max_image_pixels(self) -> int:
        """The decompression-bomb limit the model was trained with (see :func:`max_image_pixels_of`)."""
        return max_image_pixels_of(self.manifest)


def load(
    folder: str | os.PathLike = DEFAULT_MODEL_FOLDER, *, format: str = "auto", verify: bool = True
) -> ExportedModel:
    """Loads an exported model folder for prediction.

    Args:
        folder: the export stage's output (default ``models/export``).
        format: ``auto`` (TFLite when present, else Keras), ``keras`` or ``tflite``.
        verify: check every file against the sha256 in the manifest first.

    Raises:
        ValueError: missing or invalid folder (says to run ``dvc repro export``), a format the
            folder does not hold, or files that differ from what the export wrote.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    chosen = choose_format(manifest, format)
    if verify:
        verify_files(folder, manifest)
    class_names = read_labels(folder / manifest.get("labels", LABELS_FILE))
    if list(class_names) != list(manifest["class_names"]):
        raise ValueError(f"{folder / LABELS_FILE} disagrees with {MANIFEST_FILE}; re-run `dvc repro export`")
    if manifest["layout"] == "stack":
        runner = StackRunner(folder, manifest)
    elif chosen == "tflite":
        runner = TFLiteClassifierRunner(folder / manifest["tflite_model"], manifest["inputs"])
    else:
        runner = KerasClassifierRunner(folder / manifest["keras_model"])
    return ExportedModel(folder=folder, manifest=manifest, format=chosen, class_names=class_names, runner=runner)


def read_labels(path: Path) -> tuple[str, ...]:
    """The class names of labels.txt, one per line, in index order."""
    if not path.is_file():
        raise ValueError(f"{path} not found; {RUN_EXPORT}")
    names = tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    if not names:
        raise ValueError(f"{path} lists no classes; re-run `dvc repro export`")
    return names


def resize_all(pictures: Sequence[Image.Image], sizes: Iterable[int]) -> dict[int, np.ndarray]:
    """The pipeline's resize of every image to each size: ``{size: uint8 (N, size, size, 3)}``."""
    return {
        size: np.stack([augment.render_view(picture, augment.ORIGINAL, size) for picture in pictures]) for size in sizes
    }


class KerasClassifierRunner:
    """``model.keras``: raw uint8 images of any size, one call per image (sizes differ)."""

    def __init__(self, path: Path):
        import keras
        import tensorflow as tf

        try:
            self.model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many types for a damaged archive
            raise ValueError(
                f"cannot load {path} ({type(error).__name__}: {error}); re-run `dvc repro export`"
            ) from error
        # One trace for every image size: (None, None, None, 3) uint8.
        self._call = tf.function(
            lambda pixels: self.model(pixels, training=False),
            input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8)],
        )

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        return np.concatenate([self._call(np.asarray(picture, dtype=np.uint8)[None]).numpy() for picture in pictures])


class TFLiteClassifierRunner:
    """``model.tflite``: one uint8 input per backbone input size, fed the pipeline's resize."""

    def __init__(self, path: Path, inputs: Sequence[dict[str, Any]], threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        from transferlab.features import engines

        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads or engines.ENGINE_THREADS)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"LiteRT cannot load {path} ({error}); re-run `dvc repro export`") from error
        details = self.interpreter.get_input_details()
        self._indices = {int(detail["shape"][1]): int(detail["index"]) for detail in details}
        expected = sorted(int(item["image_size"]) for item in inputs)
        if sorted(self._indices) != expected or len(details) != len(expected):
            raise ValueError(
                f"{path} takes image sizes {sorted(self._indices)}, the manifest says {expected}; "
                "re-run `dvc repro export`"
            )
        self._output = int(self.interpreter.get_output_details()[0]["index"])
        self._batch = 0

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        pixels = resize_all(pictures, self._indices)
        if len(pictures) != self._batch:
            for size, index in self._indices.items():
                self.interpreter.resize_tensor_input(index, [len(pictures), size, size, 3])
            self.interpreter.allocate_tensors()
            self._batch = len(pictures)
        for size, index in self._indices.items():
            self.interpreter.set_tensor(index, pixels[size])
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self._output), dtype=np.float64)


class StackRunner:
    """A stack export: each backbone's .tflite on LiteRT, then the head on the joined embeddings."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        from transferlab import heads
        from transferlab.features import engines

        self.members = manifest["members"]
        self.engines = [
            engines.TFLiteEngine(folder / member["file"], tensor=member.get("tensor", "")) for member in self.members
        ]
        self.head = heads.load_head(folder / manifest.get("head", {}).get("folder", HEAD_FOLDER))
        widths = [int(member["width"]) for member in self.members]
        if sum(widths) != self.head.description.feature_dim:
            raise ValueError(
                f"{folder}: backbone widths {widths} do not add up to the head's {self.head.description.feature_dim} "
                "features; re-run `dvc repro export`"
            )

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        pixels = resize_all(pictures, {int(member["image_size"]) for member in self.members})
        blocks = [engine.run(pixels[int(member["image_size"])]) for engine, member in zip(self.engines, self.members)]
        return self.head.predict_proba(np.concatenate(blocks, axis=1))


# ---------------------------------------------------------------- image files


@dataclass(frozen=True)
class Result:
    """One file's outcome: its top classes (name, probability), or why it failed."""

    path: str
    top: tuple[tuple[str, float], ...] = ()
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [{"class": name, "confidence": round(p, 6)} for name, p in self.top]}


def collect_files(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Result]]:
    """Expands files and folders (recursively, sorted; hidden files and folders skipped).

    Returns:
        The files to classify, and a failed :class:`Result` for each path that does not exist.
    """
    files: list[Path] = []
    missing: list[Result] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))))
        elif path.is_file():
            files.append(path)
        else:
            missing.append(Result(path=str(path), error="no such file or folder"))
    return files, missing


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def open_image(path: Path, *, max_image_pixels: int) -> tuple[Image.Image | None, str]:
    """Decodes ``path`` as training does; returns ``(image, "")`` or ``(None, why it failed)``."""
    try:
        return images.open_rgb(path, max_image_pixels=max_image_pixels), ""
    except UnidentifiedImageError:
        return None, "not an image (Pillow cannot identify this file format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return None, f"too large: {error}"
    except Exception as error:  # noqa: BLE001 - any decoder failure means a damaged file
        message = str(error).strip()
        return None, f"corrupt or unreadable image ({type(error).__name__}{': ' + message if message else ''})"


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> tuple[tuple[str, float], ...]:
    """The ``k`` most probable classes of one row, most probable first (ties by class index)."""
    order = np.argsort(-probabilities, kind="stable")[: max(1, k)]
    return tuple((class_names[i], float(probabilities[i])) for i in order)


def classify_files(
    model: ExportedModel,
    files: Sequence[Path],
    *,
    top: int = 1,
    batch_size: int = 32,
    max_image_pixels: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Result]:
    """Classifies image files in batches; a file that cannot be decoded gets an error result.

    Args:
        model: a loaded export (:func:`load`).
        files: image files, in the order the results come back.
        top: how many classes each result lists.
        batch_size: images decoded and run together.
        max_image_pixels: larger images are refused as decompression bombs; ``None``: the limit the
            model was trained with (:attr:`ExportedModel.max_image_pixels`).
        progress: called with the number of files done after each batch.
    """
    limit = model.max_image_pixels if max_image_pixels is None else max_image_pixels
    results: list[Result] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        opened = [open_image(path, max_image_pixels=limit) for path in chunk]
        good = [picture for picture, _ in opened if picture is not None]
        probabilities = iter(model.predict(good) if good else ())
        for path, (picture, error) in zip(chunk, opened):
            if picture is None:
                results.append(Result(path=str(path), error=error))
            else:
                results.append(Result(path=str(path), top=top_classes(next(probabilities), model.class_names, top)))
        if progress is not None:
            progress(len(chunk))
    return results


def median_latency_ms(model: ExportedModel, picture: Image.Image, *, runs: int = 20) -> float:
    """Median milliseconds from one decoded image in memory to its probabilities (resize included).

    One untimed warm-up call comes first (tracing, tensor allocation).
    """
    model.predict([picture])
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        model.predict([picture])
        timings.append(time.perf_counter() - started)
    return round(1000.0 * float(np.median(timings)), 3)
