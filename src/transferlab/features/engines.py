"""Running a frozen backbone on a batch of raw RGB pixels: Keras, or LiteRT (TFLite).

Every engine takes raw pixels (uint8 or float32, 0..255, shape (N, S, S, 3)); preprocessing
lives inside the model (the registry puts ``preprocess_input`` in front of each Keras backbone,
and a TFLite file carries its own input quantization). Every engine returns float32 embeddings
(N, D): quantized outputs are dequantized, spatial outputs average-pooled.

Which engine runs a backbone (Keras, its TFLite conversion, or a rewrite of a TFLite file) is
chosen by measurement in :mod:`transferlab.features.engine_choice`, the layer above this one.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core import atomic

# LiteRT threads: every core (engine choice measures with these too), unless the process is one of
# several sharing the cores: the Ray executor's workers set TRANSFERLAB_ENGINE_THREADS=1 each.
ENGINE_THREADS = int(os.environ.get("TRANSFERLAB_ENGINE_THREADS") or 0) or max(1, os.cpu_count() or 1)


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


class TFLiteEngine:
    """Runs a TFLite model with LiteRT (XNNPACK), optionally reading a named inner tensor.

    Args:
        path: the .tflite file.
        tensor: name of a tensor to read instead of the graph output (``tflite:PATH#TENSOR``).
        threads: LiteRT's CPU threads.
        rewrite: run the file rewritten in memory for XNNPACK (``static-shapes`` or ``int8``,
            see :mod:`transferlab.tflite.rewrites`), or as given (empty).
        content: the exact model bytes to run (already read, rewritten and checked by the
            caller, see :mod:`transferlab.features.engine_choice`); ``path`` then only names
            them in messages and ``rewrite`` must be empty.
        batch: run the images of each call in slices of at most this many (the batch that engine
            choice measured fastest on this CPU: depthwise networks can run faster at batch 1
            than at 32, whose activations overflow the cache); 0: each call's images at once.
    """

    name = "tflite"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tensor: str = "",
        threads: int = ENGINE_THREADS,
        rewrite: str = "",
        content: bytes | None = None,
        batch: int = 0,
    ):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        source = {"model_path": str(self.path)}
        if content is not None:
            if rewrite:
                raise ValueError(f"{self.path}: pass the rewritten bytes as content, not a rewrite to apply")
            source = {"model_content": content}
        elif rewrite:
            from transferlab.tflite import rewrites

            source = {"model_content": rewrites.rewritten_content(self.path.read_bytes(), rewrite)}
        self.interpreter = Interpreter(**source, num_threads=threads, experimental_preserve_all_tensors=bool(tensor))
        self._input = self.interpreter.get_input_details()[0]
        self._output_index = self._tensor_index(tensor) if tensor else self.interpreter.get_output_details()[0]["index"]
        details = {detail["index"]: detail for detail in self.interpreter.get_tensor_details()}
        self._output_scale, self._output_zero_point = details[self._output_index]["quantization"]
        self._batch = 0
        self.slice = max(0, int(batch))
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
        if self.slice and len(pixels) > self.slice:
            return np.concatenate(
                [self.run(pixels[start : start + self.slice]) for start in range(0, len(pixels), self.slice)]
            )
        self._prepare(len(pixels))
        self.interpreter.set_tensor(self._input["index"], self._quantize_input(pixels))
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self._output_index)
        if output.dtype != np.float32 and self._output_scale:
            output = (output.astype(np.float32) - self._output_zero_point) * self._output_scale
        return pool_and_flatten(output)


def converted_content(model: Any) -> bytes:
    """Converts a Keras model to a float32 TFLite model, returned as bytes.

    Freezes one traced inference call (``training=False``) into constants and converts that
    graph. For Keras 3 models ``TFLiteConverter.from_keras_model`` writes a SavedModel to a
    temporary folder and reads it back twice before converting: 45 s against 9.5 s for
    MobileNetV2 at 224 px on the loaded 2-core machine, the largest part of a backbone's first
    run (issue 15 item 7); both give the same model (cosine 1.0 to Keras). A model this way
    cannot take (several inputs, a failing trace) goes the ``from_keras_model`` way.

    Not byte-for-byte reproducible: tensor names carry Keras' per-process name counters, so two
    conversions of one model may differ in a few bytes (never in the weights).
    """
    import tensorflow as tf

    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([_frozen_call(model)], model)
        with contextlib.redirect_stdout(io.StringIO()):
            return converter.convert()
    except Exception:  # noqa: BLE001 - any failure of the short way: the converter's own way decides
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every captured variable
            return converter.convert()


def _frozen_call(model: Any) -> Any:
    """The model's inference call (batch axis free) as a concrete function with its variables as constants."""
    import tensorflow as tf
    from tensorflow.python.framework import convert_to_constants

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("one input and one output only")
    source = model.inputs[0]
    signature = [tf.TensorSpec((None, *source.shape[1:]), source.dtype)]
    call = tf.function(lambda pixels: model(pixels, training=False), input_signature=signature)
    return convert_to_constants.convert_variables_to_constants_v2(call.get_concrete_function())


def convert_to_tflite(model: Any, destination: Path) -> Path:
    """Converts a Keras model to a float32 TFLite file, written atomically."""
    content = converted_content(model)
    with atomic.atomic_path(destination) as temporary:
        temporary.write_bytes(content)
    return destination
