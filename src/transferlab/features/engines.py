"""Running a frozen backbone on a batch of raw RGB pixels: Keras, or LiteRT (TFLite).

Every engine takes raw pixels (uint8 or float32, 0..255, shape (N, S, S, 3)); preprocessing
lives inside the model (the registry puts ``preprocess_input`` in front of each Keras backbone,
and a TFLite file carries its own input quantization). Every engine returns float32 embeddings
(N, D): quantized outputs are dequantized, spatial outputs average-pooled.

Measured on the 2-core machine (ARCHITECTURE.md, "Performance"): LiteRT runs the frozen Keras
backbones 1.5x to 6.6x faster than ``model.predict``, so ``auto`` converts a Keras backbone to a
float32 TFLite model once, checks it against Keras on real photos (cosine >= 0.9999) and uses it
where it agrees; where conversion fails or disagrees it falls back to Keras with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from transferlab.core import atomic

LOGGER = logging.getLogger(__name__)
MINIMUM_COSINE = 0.9999  # the agreement an engine must reach with Keras to be used
ENGINE_THREADS = max(1, os.cpu_count() or 1)


def cosine_similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays (1.0 for two all-zero rows)."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    dot = np.sum(first * second, axis=1)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    both_zero = norms == 0
    return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))


def pool_and_flatten(output: np.ndarray) -> np.ndarray:
    """Average-pools a spatial output (N, H, W, C) and flattens anything else to (N, D)."""
    output = np.asarray(output, dtype=np.float32)
    if output.ndim == 4:
        return output.mean(axis=(1, 2))
    return output.reshape(output.shape[0], -1)


class KerasEngine:
    """Runs a Keras model batch by batch through one traced ``tf.function`` (no ``predict``).

    ``model.predict`` costs 0.4-0.5 s per call on this machine; a traced call does not.
    """

    name = "keras"

    def __init__(self, model: Any):
        import tensorflow as tf

        self.model = model
        size = model.input_shape[1:]
        self._call = tf.function(
            lambda pixels: model(pixels, training=False),
            input_signature=[tf.TensorSpec((None, *size), tf.float32)],
            reduce_retracing=True,
        )
        self.image_size = int(size[0])

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Embeds raw pixels (N, S, S, 3) into float32 (N, D)."""
        return pool_and_flatten(self._call(np.asarray(pixels, dtype=np.float32)).numpy())


@dataclass(frozen=True)
class TFLiteSignature:
    """What a TFLite file expects and gives, read from the file itself."""

    image_size: int
    input_dtype: type
    input_scale: float
    input_zero_point: int


class TFLiteEngine:
    """Runs a TFLite model with LiteRT (XNNPACK), optionally reading a named inner tensor.

    Args:
        path: the .tflite file.
        tensor: name of a tensor to read instead of the graph output (``tflite:PATH#TENSOR``).
        threads: LiteRT's CPU threads.
        rewrite: run the file rewritten in memory for XNNPACK (``static-shapes`` or ``int8``,
            see :mod:`transferlab.tflite.rewrites`), or as given (empty).
    """

    name = "tflite"

    def __init__(self, path: str | os.PathLike, *, tensor: str = "", threads: int = ENGINE_THREADS, rewrite: str = ""):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        source = {"model_path": str(self.path)}
        if rewrite:
            from transferlab.tflite import rewrites

            source = {"model_content": rewrites.rewritten_content(self.path.read_bytes(), rewrite)}
        self.interpreter = Interpreter(**source, num_threads=threads, experimental_preserve_all_tensors=bool(tensor))
        self._input = self.interpreter.get_input_details()[0]
        self._output_index = self._tensor_index(tensor) if tensor else self.interpreter.get_output_details()[0]["index"]
        details = {detail["index"]: detail for detail in self.interpreter.get_tensor_details()}
        self._output_scale, self._output_zero_point = details[self._output_index]["quantization"]
        self._batch = 0
        self.image_size = int(self._input["shape"][1])

    def _tensor_index(self, tensor: str) -> int:
        for detail in self.interpreter.get_tensor_details():
            if detail["name"] == tensor:
                return int(detail["index"])
        raise ValueError(f"{self.path}: no tensor named '{tensor}' (`transferlab backbones --file` lists them)")

    def _prepare(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self._input["index"], [batch, *self._input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._batch = batch

    def _quantize_input(self, pixels: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if dtype == np.uint8:
            return np.asarray(pixels, dtype=np.uint8)  # image models take raw 0..255 as uint8
        if dtype == np.int8:
            return (np.asarray(pixels, dtype=np.int16) - 128).astype(np.int8)
        return np.asarray(pixels, dtype=np.float32)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Embeds raw pixels (N, S, S, 3) into float32 (N, D)."""
        self._prepare(len(pixels))
        self.interpreter.set_tensor(self._input["index"], self._quantize_input(pixels))
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self._output_index)
        if output.dtype != np.float32 and self._output_scale:
            output = (output.astype(np.float32) - self._output_zero_point) * self._output_scale
        return pool_and_flatten(output)


def convert_to_tflite(model: Any, destination: Path) -> Path:
    """Converts a Keras model to a float32 TFLite file, written atomically."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every captured variable
        content = converter.convert()
    with atomic.atomic_path(destination) as temporary:
        temporary.write_bytes(content)
    return destination


def verify_against_keras(engine: Any, keras_engine: KerasEngine, pixels: np.ndarray) -> float:
    """Returns the lowest cosine between ``engine`` and Keras on ``pixels`` (real photos)."""
    return float(cosine_similarity(engine.run(pixels), keras_engine.run(pixels)).min())


@dataclass
class ConvertedEngine:
    """The outcome of choosing an engine for a Keras backbone: its name and how it is built."""

    name: str
    build: Callable[[], Any]
    verdict: dict


def choose_keras_engine(
    *,
    requested: str,
    build_model: Callable[[], Any],
    conversion_directory: Path,
    identity: str,
    sample_pixels: Callable[[], np.ndarray],
) -> ConvertedEngine:
    """Picks ``keras`` or ``tflite`` for a Keras backbone; the verdict is remembered on disk.

    Args:
        requested: the ``extract_features.engine`` param: auto, keras or tflite.
        build_model: builds the Keras model (called only when needed).
        conversion_directory: where converted models and verdicts are kept (in the cache dir).
        identity: a key naming backbone + weights + input size; the converted file's name.
        sample_pixels: gives a batch of real photos to check the converted model against Keras.
    """
    if requested == "keras":
        return ConvertedEngine("keras", lambda: KerasEngine(build_model()), {"engine": "keras", "reason": "requested"})
    key = hashlib.sha256(identity.encode()).hexdigest()
    tflite_path = conversion_directory / f"{key}.tflite"
    verdict_path = conversion_directory / f"{key}.json"
    verdict = json.loads(verdict_path.read_text()) if verdict_path.exists() else None
    if verdict is None or (verdict["agrees"] and not tflite_path.exists()):
        verdict = _convert_and_verify(build_model, tflite_path, sample_pixels)
        verdict["identity"] = identity
        atomic.write_json(verdict_path, verdict)
    if verdict["agrees"]:
        return ConvertedEngine("tflite", lambda: TFLiteEngine(tflite_path), verdict)
    if requested == "tflite":
        raise ValueError(
            f"the TFLite conversion of {identity} does not agree with Keras ({verdict['reason']}); "
            "set extract_features.engine: keras (or auto, which falls back by itself)"
        )
    LOGGER.warning("TFLite engine not used for %s (%s); falling back to Keras", identity, verdict["reason"])
    return ConvertedEngine("keras", lambda: KerasEngine(build_model()), verdict)


def _convert_and_verify(build_model: Callable[[], Any], tflite_path: Path, sample_pixels: Callable[[], np.ndarray]) -> dict:
    model = build_model()
    try:
        convert_to_tflite(model, tflite_path)
    except Exception as error:  # the converter raises many types; any failure means "use Keras"
        return {"agrees": False, "reason": f"conversion failed: {type(error).__name__}: {error}"[:500], "cosine": None}
    cosine = verify_against_keras(TFLiteEngine(tflite_path), KerasEngine(model), sample_pixels())
    agrees = cosine >= MINIMUM_COSINE
    reason = f"lowest cosine {cosine:.6f} on real photos (needs >= {MINIMUM_COSINE})"
    return {"agrees": agrees, "reason": reason, "cosine": cosine}
