"""Running an exported classifier (``models/export``) on image files.

The export stage writes one folder; this module is the one way to run it, shared by
``transferlab predict`` and the export stage's own check against evaluate (so what the stage
checked is what predict runs). The folder holds ``manifest.json``, ``labels.txt``, a copy of
the head (``head/``) and, by layout:

- ``classifier`` (every backbone is a Keras registry entry, or the head is itself a model of the
  pixels: ``scratch``, ``finetune``): ``model.keras`` and, with ``export.tflite``, ``model.tflite``:
  one network in two formats, from uint8 pixels already resized to each backbone input size (one
  input ``pixels_S`` per size S) to class probabilities, preprocessing inside. Neither resizes:
  the pipeline's resize is done before either format (:func:`resize_all`), so training, evaluate
  and every format see the same pixels, upscaled or downscaled, of any aspect ratio.
- ``stack`` (a ``tflite:`` backbone, head on embeddings): one ``.tflite`` file per backbone under
  ``backbones/`` (TFLite backbones copied, Keras ones converted), run with LiteRT, and the head's
  ``predict_proba`` on the concatenated embeddings.

Formats: ``keras`` (``model.keras``) and ``tflite`` (``model.tflite``, or the stack's TFLite
backbones). ``auto`` prefers ``tflite``: it resizes exactly as the pipeline does (Pillow), runs
on LiteRT, and needs no TensorFlow import (8-10 s of start-up on this machine).

Every image is decoded as training decodes it (:func:`transferlab.data.images.open_rgb`, with the
decompression-bomb limit the manifest records: :func:`max_image_pixels_of`) and resized as training
resizes it (:func:`transferlab.data.augment.render_view` with the original recipe: Pillow bilinear
on the whole image, no crop), for every format. An in-graph resize (Keras ``Resizing`` with
antialiasing) was within 1 grey level of Pillow but not equal to it, and on 100x100 photos
upscaled to 224 px that flipped 3 of 200 predictions; sharing the one implementation makes the
formats' inputs identical by construction.

The manifest is checked before anything is loaded (:func:`read_manifest`): every value has the
type it should (a wrong one is a ``ValueError`` that names the key), every file the export runs
is listed with its size and sha256, and no file entry may point outside the export folder.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from transferlab.core import params
from transferlab.data import augment, images

EXPORT_FORMAT = "transferlab-export"
EXPORT_VERSION = 2  # 2: model.keras takes resized pixels, like model.tflite (1 resized inside)
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
HEAD_FOLDER = "head"
BACKBONES_FOLDER = "backbones"
LAYOUTS = ("classifier", "stack", "fused")
FORMATS = ("auto", "keras", "tflite")
FORMAT_KEYS = {"tflite": "tflite_model", "keras": "keras_model"}  # the manifest key naming each format's file
DEFAULT_MODEL_FOLDER = Path("models") / "export"
RUN_EXPORT = "run `dvc repro export` to write it (or give --model DIR)"


# ---------------------------------------------------------------- the exported folder


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``folder/manifest.json`` (see :func:`check_manifest`).

    Raises:
        ValueError: the folder or its manifest is missing, the manifest is not a transferlab
            export of this version, or a value in it is malformed (the message names the key);
            the message says to run ``dvc repro export``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no exported model at {folder}: {RUN_EXPORT}")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no {MANIFEST_FILE}, so it is not an exported model: {RUN_EXPORT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is not valid JSON ({_short(error)}); re-run `dvc repro export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a transferlab export manifest; {RUN_EXPORT}")
    if manifest.get("version") != EXPORT_VERSION:
        raise ValueError(
            f"{path} has export version {_short(manifest.get('version'))}; this transferlab reads version "
            f"{EXPORT_VERSION}: re-run `dvc repro export`"
        )
    check_manifest(manifest, where=path)
    return manifest


def check_manifest(manifest: dict[str, Any], *, where: str | os.PathLike = MANIFEST_FILE) -> None:
    """Checks the manifest's values before any of them is used; raises ``ValueError`` naming the key.

    Every value has the type it should; every file the export runs (``labels``, ``keras_model``,
    ``tflite_model``, each stack member's ``file``) is listed in ``files`` with its size and sha256,
    so that :func:`verify_files` checks it; no file entry is absolute or climbs out with ``..``
    (:func:`inside` also catches links that lead out).

    Args:
        manifest: the parsed manifest.json.
        where: its path, for the messages.
    """
    key = _KeyCheck(where)
    key.require(manifest, "layout", lambda value: value in LAYOUTS, f"one of {', '.join(LAYOUTS)}")
    key.require(manifest, "class_names", _is_names, "a non-empty list of distinct class names")
    key.require(
        manifest, "files", lambda value: isinstance(value, dict), "a mapping from file name to bytes and sha256"
    )
    for name, entry in manifest["files"].items():
        key.relative(name, f"files[{name!r}]")
        key.mapping(entry, f"files[{name!r}]")
        key.require(entry, "bytes", _is_count, "a whole number of bytes", f"files[{name!r}].")
        key.require(entry, "sha256", _is_sha256, "a sha256 (64 hex digits)", f"files[{name!r}].")
    for name in ("keras_model", "tflite_model"):
        key.optional(manifest, name, lambda value: isinstance(value, str), "a file name or empty")
    key.optional(manifest, "labels", lambda value: isinstance(value, str) and value != "", "a file name")
    key.optional(manifest, "max_image_pixels", _is_positive, "a positive integer")
    key.optional(manifest, "resize", lambda value: isinstance(value, dict), "a mapping")
    key.optional(manifest, "dropped", _is_reasons, "a mapping from format to why it was dropped")
    key.mapping(manifest.get("head", {}), "head")
    key.relative(manifest.get("head", {}).get("folder", HEAD_FOLDER), "head.folder")
    key.require(manifest, "members", lambda value: isinstance(value, list), "a list")
    if manifest["layout"] == "stack":
        key.require(manifest, "members", bool, "a non-empty list for a stack")
        for index, member in enumerate(manifest["members"]):
            _check_stack_member(key, member, f"members[{index}].")
    elif manifest["layout"] == "fused":
        _check_fused(key, manifest)
    else:
        _check_inputs(key, manifest)
    for name, path in referenced_files(manifest).items():
        key.relative(path, name)
        if path not in manifest["files"]:
            raise ValueError(
                f"{where}: '{name}' names {path}, which 'files' does not list (every file the export runs must be "
                "listed with its size and sha256); re-run `dvc repro export`"
            )


def _check_stack_member(key: _KeyCheck, member: Any, prefix: str) -> None:
    key.mapping(member, prefix[:-1])
    key.require(member, "file", _is_text, "a file name", prefix)
    key.require(member, "image_size", _is_positive, "a positive integer", prefix)
    key.require(member, "width", _is_positive, "a positive integer", prefix)
    key.optional(member, "tensor", lambda value: isinstance(value, str), "a tensor name or empty", prefix)


def _check_fused(key: _KeyCheck, manifest: dict[str, Any]) -> None:
    """A fused export: members (a file for those a logistic head reads), member heads, their weights."""
    key.require(manifest, "members", bool, "a non-empty list for a fused model")
    for index, member in enumerate(manifest["members"]):
        key.mapping(member, f"members[{index}]")
        if "file" in member:
            _check_stack_member(key, member, f"members[{index}].")
        key.require(member, "width", _is_positive, "a positive integer", f"members[{index}].")
    key.require(manifest, "fusion", lambda value: isinstance(value, dict), "a mapping")
    key.require(
        manifest["fusion"], "heads", lambda value: isinstance(value, list) and value, "a non-empty list", "fusion."
    )
    count = len(manifest["members"])
    for index, entry in enumerate(manifest["fusion"]["heads"]):
        prefix = f"fusion.heads[{index}]."
        key.mapping(entry, prefix[:-1])
        key.require(entry, "key", _is_text, "a name", prefix)
        key.require(entry, "head", lambda value: value in ("logistic", "finetune"), "logistic or finetune", prefix)
        key.require(entry, "weight", _is_weight, "a number in [0, 1]", prefix)
        key.relative(entry.get("folder", ""), f"{prefix}folder")
        key.require(
            entry, "blocks", _member_indices(count), f"a non-empty list of member indices below {count}", prefix
        )
        if entry["head"] == "finetune":
            key.require(entry, "file", _is_text, "a file name", prefix)
            key.require(entry, "image_size", _is_positive, "a positive integer", prefix)
        else:
            for block in entry["blocks"]:
                if "file" not in manifest["members"][block]:
                    key.fail(f"'{prefix}blocks' reads members[{block}], which has no backbone file")


def _member_indices(count: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and bool(value) and all(_is_count(i) and i < count for i in value)


def _is_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _check_inputs(key: _KeyCheck, manifest: dict[str, Any]) -> None:
    if not (manifest.get("keras_model") or manifest.get("tflite_model")):
        return
    key.require(manifest, "inputs", lambda value: isinstance(value, list) and value, "a non-empty list")
    for index, item in enumerate(manifest["inputs"]):
        key.mapping(item, f"inputs[{index}]")
        key.require(item, "image_size", _is_positive, "a positive integer", f"inputs[{index}].")


def referenced_files(manifest: dict[str, Any]) -> dict[str, str]:
    """The files an export runs, by manifest key: labels, the model file(s), each stack member's file."""
    named = {"labels": manifest.get("labels", LABELS_FILE)}
    if manifest["layout"] == "stack":
        named.update({f"members[{index}].file": member["file"] for index, member in enumerate(manifest["members"])})
    elif manifest["layout"] == "fused":
        named.update(
            {f"members[{i}].file": member["file"] for i, member in enumerate(manifest["members"]) if "file" in member}
        )
        heads = manifest["fusion"]["heads"]
        named.update({f"fusion.heads[{i}].file": entry["file"] for i, entry in enumerate(heads) if "file" in entry})
    else:
        named.update({key: manifest[key] for key in ("keras_model", "tflite_model") if manifest.get(key)})
    return named


class _KeyCheck:
    """Raises one-line ``ValueError`` messages that name the manifest key at fault."""

    def __init__(self, where: str | os.PathLike):
        self.where = where

    def require(self, mapping: Any, key: str, test: Callable[[Any], bool], wanted: str, prefix: str = "") -> None:
        if not isinstance(mapping, dict) or key not in mapping:
            self.fail(f"lacks '{prefix}{key}'")
        if not test(mapping[key]):
            self.fail(f"'{prefix}{key}' must be {wanted}, not {_short(mapping[key])}")

    def optional(self, mapping: Any, key: str, test: Callable[[Any], bool], wanted: str, prefix: str = "") -> None:
        if isinstance(mapping, dict) and key in mapping:
            self.require(mapping, key, test, wanted, prefix)

    def mapping(self, value: Any, key: str) -> None:
        if not isinstance(value, dict):
            self.fail(f"'{key}' must be a mapping, not {_short(value)}")

    def relative(self, name: Any, key: str) -> None:
        """``name`` must be a relative path that stays inside the export folder."""
        if not _is_text(name):
            self.fail(f"'{key}' must be a file name, not {_short(name)}")
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or "\x00" in name:
            self.fail(f"'{key}' ({_short(name)}) points outside the export folder; every file must be inside it")

    def fail(self, problem: str) -> None:
        raise ValueError(f"{self.where}: {problem}; re-run `dvc repro export`")


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_is_text, value)) and len(set(value)) == len(value)


def _is_reasons(value: Any) -> bool:
    return isinstance(value, dict) and all(name in FORMAT_KEYS and isinstance(why, str) for name, why in value.items())


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_positive(value: Any) -> bool:
    return _is_count(value) and value > 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value cut to ``limit`` characters (a manifest value may be huge)."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inside(folder: Path, name: str, key: str = "files") -> Path:
    """``folder / name``, refused when it leads outside ``folder`` (``..``, an absolute path, a link out).

    Raises:
        ValueError: naming ``key``, the manifest entry that gave ``name``.
    """
    path = folder / name
    root = folder.resolve()
    if (
        PurePosixPath(name).is_absolute()
        or ".." in PurePosixPath(name).parts
        or not path.resolve().is_relative_to(root)
    ):
        raise ValueError(
            f"{folder / MANIFEST_FILE}: '{key}' ({_short(name)}) points outside the export folder; "
            "re-run `dvc repro export`"
        )
    return path


def max_image_pixels_of(manifest: dict[str, Any]) -> int:
    """The decompression-bomb limit the model was trained with (params ``download.max_image_pixels``).

    An export written before manifests recorded it gets the params default.

    Raises:
        ValueError: the manifest records something other than a positive integer.
    """
    if "max_image_pixels" not in manifest:
        return params.DownloadParams().max_image_pixels
    recorded = manifest["max_image_pixels"]
    if not _is_positive(recorded):
        raise ValueError(
            f"manifest max_image_pixels must be a positive integer, got {_short(recorded)}; re-run `dvc repro export`"
        )
    return recorded


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Checks every file the manifest lists: inside the folder, a regular file, same size and sha256.

    An incomplete copy, a changed file or a file swapped for a FIFO or a link out of the folder fails.
    """
    for name, expected in sorted(manifest["files"].items()):
        path = inside(folder, name, f"files[{name!r}]")
        if not path.exists():
            raise ValueError(
                f"{path} is missing from the exported model; copy the whole folder, or re-run `dvc repro export`"
            )
        if not path.is_file():
            raise ValueError(f"{path} is not a regular file ({file_kind(path)}); re-run `dvc repro export`")
        if path.stat().st_size != expected["bytes"] or images.sha256_file(path) != expected["sha256"]:
            raise ValueError(
                f"{path} differs from the file the export wrote (size or sha256); re-run `dvc repro export`"
            )


def available_formats(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The formats the folder can run, preferred first (``tflite`` before ``keras``)."""
    if manifest["layout"] in ("stack", "fused"):
        return ("tflite",)
    return tuple(name for name, key in FORMAT_KEYS.items() if manifest.get(key))


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
        if requested in manifest.get("dropped", {}):
            hint = f" (the export stage dropped it: {manifest['dropped'][requested]})"
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
        ValueError: missing or invalid folder or manifest (says to run ``dvc repro export``), a
            format the folder does not hold, files that differ from what the export wrote, or a
            file it would run that the manifest does not list or that lies outside the folder.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    chosen = choose_format(manifest, format)
    if verify:
        verify_files(folder, manifest)
    paths = {key: inside(folder, name, key) for key, name in referenced_files(manifest).items()}
    class_names = read_labels(paths["labels"])
    if list(class_names) != list(manifest["class_names"]):
        raise ValueError(f"{paths['labels']} disagrees with {MANIFEST_FILE}; re-run `dvc repro export`")
    if manifest["layout"] == "stack":
        runner = StackRunner(folder, manifest)
    elif manifest["layout"] == "fused":
        runner = FusedRunner(folder, manifest)
    elif chosen == "tflite":
        runner = TFLiteClassifierRunner(paths["tflite_model"], manifest["inputs"])
    else:
        runner = KerasClassifierRunner(paths["keras_model"], manifest["inputs"])
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
    """``model.keras``: one uint8 input per backbone input size, fed the pipeline's resize (as model.tflite)."""

    def __init__(self, path: Path, inputs: Sequence[dict[str, Any]]):
        import keras
        import tensorflow as tf

        try:
            self.model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many types for a damaged archive
            raise ValueError(
                f"cannot load {path} ({type(error).__name__}: {_short(error, 200)}); re-run `dvc repro export`"
            ) from error
        shapes = [tuple(tensor.shape) for tensor in self.model.inputs]
        self._sizes = [shape[1] for shape in shapes]
        expected = sorted(int(item["image_size"]) for item in inputs)
        if any(shape[1:] != (size, size, 3) for shape, size in zip(shapes, self._sizes)) or (
            sorted(self._sizes) != expected
        ):
            raise ValueError(
                f"{path} takes inputs of shapes {shapes}, the manifest says image sizes {expected}; "
                "re-run `dvc repro export`"
            )
        # One trace for every batch size.
        self._call = tf.function(
            lambda *pixels: self.model(list(pixels) if len(pixels) > 1 else pixels[0], training=False),
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8) for size in self._sizes],
        )

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        pixels = resize_all(pictures, self._sizes)
        return self._call(*(pixels[size] for size in self._sizes)).numpy()


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

        head_folder = _listed_head_folder(folder, manifest)  # refused before any file in it is read
        self.members = manifest["members"]
        self.engines = []
        for index, member in enumerate(self.members):
            path = inside(folder, member["file"], f"members[{index}].file")
            try:
                self.engines.append(engines.TFLiteEngine(path, tensor=member.get("tensor", "")))
            except (RuntimeError, ValueError) as error:
                raise ValueError(
                    f"LiteRT cannot load {path} ({_short(error, 200)}); re-run `dvc repro export`"
                ) from None
        self.head = heads.load_head(head_folder)
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


class FusedRunner:
    """A fused export: frozen members' .tflite backbones and their logistic heads, fine-tuned members'
    .tflite classifiers, and the fusion head's combiner (:func:`transferlab.heads.fusion.combine`)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        from transferlab import heads
        from transferlab.features import engines

        head_folder = _listed_head_folder(folder, manifest)  # refused before any file in it is read
        self.members = manifest["members"]
        self.engines: dict[int, Any] = {}
        for index, member in enumerate(self.members):
            if "file" in member:
                path = inside(folder, member["file"], f"members[{index}].file")
                self.engines[index] = _tflite_engine(engines, path, member.get("tensor", ""))
        self.heads: list[tuple[dict[str, Any], Any]] = []
        for index, entry in enumerate(manifest["fusion"]["heads"]):
            if entry["head"] == "finetune":
                path = inside(folder, entry["file"], f"fusion.heads[{index}].file")
                runner = TFLiteClassifierRunner(path, [{"image_size": entry["image_size"]}])
            else:
                member_folder = inside(folder, entry["folder"], f"fusion.heads[{index}].folder")
                if not member_folder.is_relative_to(head_folder):
                    raise ValueError(f"{folder / MANIFEST_FILE}: 'fusion.heads[{index}].folder' is not inside the head")
                runner = heads.load_head(member_folder)
            self.heads.append((entry, runner))
        self.weights = [float(entry["weight"]) for entry, _ in self.heads]

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        from transferlab.heads import fusion

        sizes = {int(self.members[index]["image_size"]) for index in self.engines}
        pixels = resize_all(pictures, sizes)
        embeddings = {
            index: engine.run(pixels[int(self.members[index]["image_size"])]) for index, engine in self.engines.items()
        }
        parts = []
        for entry, runner in self.heads:
            if entry["head"] == "finetune":
                parts.append(runner.predict(pictures))
            else:
                parts.append(runner.predict_proba(np.concatenate([embeddings[i] for i in entry["blocks"]], axis=1)))
        return fusion.combine(parts, self.weights)


def _tflite_engine(engines: Any, path: Path, tensor: str) -> Any:
    try:
        return engines.TFLiteEngine(path, tensor=tensor)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"LiteRT cannot load {path} ({_short(error, 200)}); re-run `dvc repro export`") from None


def _listed_head_folder(folder: Path, manifest: dict[str, Any]) -> Path:
    """The stack's head folder, refused unless the manifest lists (and so verifies) every file in it."""
    head_folder = inside(folder, manifest.get("head", {}).get("folder", HEAD_FOLDER), "head.folder")
    present = sorted(path for path in head_folder.rglob("*") if not path.is_dir()) if head_folder.is_dir() else []
    unlisted = [path.relative_to(folder).as_posix() for path in present]
    unlisted = [name for name in unlisted if name not in manifest["files"]]
    if not present or unlisted:
        problem = f"holds {', '.join(unlisted[:3])}, which 'files' does not list" if present else "is missing or empty"
        raise ValueError(f"{folder / MANIFEST_FILE}: the head folder {problem}; re-run `dvc repro export`")
    return head_folder


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

    Only regular files are opened: a FIFO would block the reader forever, and a device or socket
    is no image. Those, given or met in a folder, are reported as not regular files.

    Returns:
        The files to classify, and a failed :class:`Result` for each path that does not exist or
        is not a regular file.
    """
    files: list[Path] = []
    failed: list[Result] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if not p.is_dir() and not _hidden(p.relative_to(path)))
            files.extend(p for p in found if p.is_file())
            failed.extend(_not_regular(p) for p in found if p.exists() and not p.is_file())
        elif path.is_file():
            files.append(path)
        elif path.exists():
            failed.append(_not_regular(path))
        else:
            failed.append(Result(path=str(path), error="no such file or folder"))
    return files, failed


def _not_regular(path: Path) -> Result:
    return Result(path=str(path), error=f"not a regular file ({file_kind(path)}); give image files or folders")


def file_kind(path: Path) -> str:
    """What a path that exists but is no regular file is, in words (a FIFO, a socket, ...)."""
    mode = path.stat().st_mode
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "neither a file nor a folder"


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
