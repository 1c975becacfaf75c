"""TFLite files as backbones: faster rewrites of a file, and choosing one by measurement.

Two things make a quantized TFLite file slow on this kind of CPU (2 cores, AVX2, no VNNI):

- **Missing shapes.** LiteRT hands the graph to XNNPACK when the interpreter is built, before
  it computes tensor shapes, and XNNPACK takes a convolution or pooling only if its tensors
  have a static 4-D shape in the file. The shared MobileNetEdgeTPU extractor (written by an old
  converter) stores no shape for any of its 74 activations, so XNNPACK takes only its 15 ADDs, each
  as its own partition, and the 58 convolutions run on LiteRT's reference kernels: 3 images/s
  at batch 1, 15 at batch 8. :func:`static_shapes_content` writes in the shapes LiteRT computes
  (batch 1, batch axis left resizable) and changes nothing else: bit-identical outputs on the
  reference kernels, one XNNPACK partition, about 2x faster.
- **uint8 kernels.** XNNPACK's kernels for uint8 models with per-tensor weights (QU8, the
  TF1 quantization of MobileNet v1 and MobileNetEdgeTPU) run at about half the speed of its
  int8 kernels with per-channel weights (QS8/QC8, the TF2 format of EfficientNet-Lite0).
  :func:`int8_content` rewrites such a file into that format: activations shift by 128 with
  their zero points (exact), each weight channel becomes symmetric int8 (exact for every channel
  whose weights lie within 127 steps of the zero point: 99.6% of channels in both shared files;
  the others are rounded to a coarser step), and biases follow the weight scales. About 2x
  faster again.

Neither rewrite can be held to the 0.9999 cosine that a float conversion meets: XNNPACK rounds
8-bit requantization differently from LiteRT's reference kernels, so even a file that XNNPACK
takes as it is disagrees with the reference kernels (lowest cosine on flower photos: MobileNet
v1 0.9993, EfficientNet-Lite0 0.997, MobileNetEdgeTPU 0.994). What can be asked is that a
rewrite moves the features less than one grey level of input noise does (the *noise floor*:
the lowest cosine between the reference kernels' features of the photos and of the photos with
each pixel moved by -1, 0 or +1, seeded). :func:`choose_tflite_engine` measures every applicable
rewrite on real photos, keeps those that pass, uses the fastest, and remembers the verdict per
file (by sha256) in the embedding cache's conversion folder. Each rewrite has its own engine
name, which is part of the embedding cache key, so embeddings of different paths never mix.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from transferlab.core import atomic
from transferlab.features import engines

AS_GIVEN = ""  # the file unchanged
STATIC_SHAPES = "static-shapes"
INT8 = "int8"
REWRITES = (STATIC_SHAPES, INT8)
VERDICT_VERSION = 1
SPEED_SECONDS = 1.0  # per candidate; the differences it looks for are 2x, not 10%
SPEED_BATCH = 8
NOISE_SEED = 0
# Ops whose uint8 kernels become int8 kernels by shifting every zero point by 128 (weights aside).
_INT8_SHIFTABLE = {"ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D", "RESHAPE", "SQUEEZE", "RELU", "RELU6"}
_WEIGHTED = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3}  # op -> output-channel axis of its filter
_INT8_OP_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "ADD": 2, "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "RELU": 2, "RELU6": 2}


def engine_name(rewrite: str) -> str:
    """The engine name (part of the embedding cache key) of a file run as given or rewritten."""
    return "tflite" if rewrite == AS_GIVEN else f"tflite-{rewrite}"


def rewrite_of_engine(name: str) -> str:
    """The rewrite behind an engine name (``tflite-int8`` -> ``int8``; ``tflite`` -> ``""``).

    The features files record each block's engine (``block_engines``); an export that copies a
    TFLite backbone writes ``rewritten_content(file, rewrite_of_engine(engine))`` so that it
    computes what the pipeline computed.
    """
    rewrite = name.removeprefix("tflite").removeprefix("-")
    if not name.startswith("tflite") or rewrite not in (AS_GIVEN, *REWRITES):
        raise ValueError(f"'{name}' is not a TFLite engine name; expected tflite or tflite-<rewrite> with rewrite one of: {', '.join(REWRITES)}")
    return rewrite


def rewritten_content(content: bytes, rewrite: str) -> bytes:
    """The file's bytes after a rewrite (``""``: unchanged).

    Raises:
        ValueError: an unknown rewrite, or one that does not apply to this file.
    """
    if rewrite == AS_GIVEN:
        return content
    if rewrite == STATIC_SHAPES:
        return static_shapes_content(content)
    if rewrite == INT8:
        return int8_content(content)
    raise ValueError(f"unknown TFLite rewrite '{rewrite}'; choose one of: {', '.join(REWRITES)} (or '' for the file as given)")


# ---------------------------------------------------------------- static shapes


def unshaped_tensors(content: bytes) -> list[int]:
    """Tensors that ops read or write, stored without a shape although LiteRT computes one."""
    graph = _model_object(content).subgraphs[0]
    computed = _computed_shapes(content)
    touched = {index for operator in graph.operators for index in (*operator.inputs, *operator.outputs) if index >= 0}
    stored_empty = {index for index in touched if graph.tensors[index].shape is None or len(graph.tensors[index].shape) == 0}
    return sorted(index for index in stored_empty if len(computed.get(index, ())) > 0)


@functools.lru_cache(maxsize=8)
def static_shapes_content(content: bytes) -> bytes:
    """The file with each op tensor's computed shape (batch 1) written in; nothing else changes.

    A file whose tensors all have shapes comes back unchanged.
    """
    missing = unshaped_tensors(content)
    if not missing:
        return content
    model = _model_object(content)
    graph = model.subgraphs[0]
    computed = _computed_shapes(content)
    for index in missing:
        shape = np.array(computed[index], dtype=np.int32)
        graph.tensors[index].shape = shape
        graph.tensors[index].shapeSignature = np.array([-1, *shape[1:]], dtype=np.int32)  # batch stays resizable
    return _to_bytes(model)


# ---------------------------------------------------------------- uint8 -> int8


def int8_problem(content: bytes) -> str:
    """Why :func:`int8_content` does not apply to a file; empty when it does."""
    from ai_edge_litert import schema_py_generated as schema

    model = _model_object(content)
    graph = model.subgraphs[0]
    types = {graph.tensors[index].type for op in graph.operators for index in (*op.inputs, *op.outputs) if index >= 0}
    if schema.TensorType.INT8 in types:
        return "already an int8 model"
    if types != {schema.TensorType.UINT8, schema.TensorType.INT32}:
        return "not a uint8 quantized model (only uint8 tensors and int32 biases)"
    codes = _op_names(model)
    unsupported = sorted({codes[op.opcodeIndex] for op in graph.operators} - _INT8_SHIFTABLE - set(_WEIGHTED))
    if unsupported:
        return f"ops that this rewrite does not handle: {', '.join(unsupported)}"
    for op in graph.operators:
        if codes[op.opcodeIndex] in _WEIGHTED and len(graph.tensors[op.inputs[1]].quantization.scale) != 1:
            return "weights are not quantized per tensor"
    return ""


@functools.lru_cache(maxsize=8)
def int8_content(content: bytes) -> bytes:
    """Rewrites a uint8 model (per-tensor weights) as an int8 model with per-channel weights.

    Activations and other uint8 tensors: ``q - 128`` with zero point ``z - 128`` (the same real
    values). Filters: per output channel, ``q - z`` as symmetric int8 at the same scale where it
    fits in [-127, 127], else rounded at the smallest scale that fits. Biases: requantized to
    input scale x channel scale (unchanged where the channel is exact). Static shapes are
    written in as by :func:`static_shapes_content`.

    Raises:
        ValueError: the file is not such a model (see :func:`int8_problem`).
    """
    problem = int8_problem(content)
    if problem:
        raise ValueError(f"the int8 rewrite does not apply to this TFLite file: {problem}")
    from ai_edge_litert import schema_py_generated as schema

    model = _model_object(static_shapes_content(content))
    graph = model.subgraphs[0]
    codes = _op_names(model)
    weights: set[int] = set()
    for op in graph.operators:
        if codes[op.opcodeIndex] in _WEIGHTED:
            _per_channel_int8(model, op, axis=_WEIGHTED[codes[op.opcodeIndex]])
            weights.update(op.inputs[1:3])
    for index, tensor in enumerate(graph.tensors):
        if index not in weights and tensor.type == schema.TensorType.UINT8:
            _shift_to_int8(model, tensor)
    for code in model.operatorCodes:
        name = _code_name(code)
        code.version = max(int(code.version), _INT8_OP_VERSIONS.get(name, 1))
    return _to_bytes(model)


def _per_channel_int8(model: Any, op: Any, *, axis: int) -> None:
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    source, kernel, bias = (graph.tensors[index] for index in op.inputs[:3])
    steps = _tensor_data(model, kernel).astype(np.int64) - int(kernel.quantization.zeroPoint[0])
    by_channel = np.moveaxis(steps, axis, 0)
    peak = np.abs(by_channel.reshape(by_channel.shape[0], -1)).max(axis=1)
    factor = np.maximum(peak / 127.0, 1.0)  # 1 where the channel fits: exact
    rounded = np.clip(np.round(by_channel / factor.reshape(-1, *[1] * (by_channel.ndim - 1))), -127, 127)
    scales = float(kernel.quantization.scale[0]) * factor
    _set_tensor_data(model, kernel, np.moveaxis(rounded, 0, axis).astype(np.int8))
    kernel.type = schema.TensorType.INT8
    _set_quantization(kernel, scales, axis)
    bias_real = _tensor_data(model, bias).astype(np.float64) * float(bias.quantization.scale[0])
    bias_scales = float(source.quantization.scale[0]) * scales
    _set_tensor_data(model, bias, np.round(bias_real / bias_scales).astype(np.int32))
    _set_quantization(bias, bias_scales, 0)


def _set_quantization(tensor: Any, scales: np.ndarray, axis: int) -> None:
    tensor.quantization.scale = [float(value) for value in scales.astype(np.float32)]
    tensor.quantization.zeroPoint = [0] * len(scales)
    tensor.quantization.quantizedDimension = axis


def _shift_to_int8(model: Any, tensor: Any) -> None:
    from ai_edge_litert import schema_py_generated as schema

    if _has_data(model, tensor):
        _set_tensor_data(model, tensor, (_tensor_data(model, tensor).astype(np.int16) - 128).astype(np.int8))
    tensor.type = schema.TensorType.INT8
    if tensor.quantization is not None and tensor.quantization.zeroPoint is not None:
        tensor.quantization.zeroPoint = [int(value) - 128 for value in tensor.quantization.zeroPoint]


# ---------------------------------------------------------------- flatbuffer helpers


def _model_object(content: bytes) -> Any:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    if len(model.subgraphs) != 1:
        raise ValueError(f"expected a TFLite model with one subgraph, got {len(model.subgraphs)}")
    return model


def _to_bytes(model: Any) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _code_name(code: Any) -> str:
    from ai_edge_litert import schema_py_generated as schema

    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    # Files from old converters keep the code in the deprecated field (schema: take the larger).
    return names.get(max(int(code.builtinCode), int(code.deprecatedBuiltinCode)), "CUSTOM")


def _op_names(model: Any) -> list[str]:
    return [_code_name(code) for code in model.operatorCodes]


def _has_data(model: Any, tensor: Any) -> bool:
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0


def _tensor_data(model: Any, tensor: Any) -> np.ndarray:
    from ai_edge_litert import schema_py_generated as schema

    dtype = {schema.TensorType.UINT8: np.uint8, schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32}[tensor.type]
    raw = np.asarray(model.buffers[tensor.buffer].data, dtype=np.uint8).tobytes()
    return np.frombuffer(raw, dtype=dtype).reshape([int(dim) for dim in tensor.shape])


def _set_tensor_data(model: Any, tensor: Any, values: np.ndarray) -> None:
    model.buffers[tensor.buffer].data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8)


def _computed_shapes(content: bytes) -> dict[int, tuple[int, ...]]:
    interpreter = _interpreter(content, 0, delegate=False)
    return {int(detail["index"]): tuple(int(dim) for dim in detail["shape"]) for detail in interpreter.get_tensor_details()}


# ---------------------------------------------------------------- choosing by measurement


def candidates(content: bytes) -> dict[str, str]:
    """``{rewrite: why it does not apply}`` for every rewrite; empty where it applies."""
    try:
        return {STATIC_SHAPES: "" if unshaped_tensors(content) else "every tensor already has a shape", INT8: int8_problem(content)}
    except ValueError as error:  # e.g. several subgraphs: the file runs as given
        return {rewrite: str(error) for rewrite in REWRITES}


def choose_tflite_engine(
    *,
    requested: str,
    path: Path,
    tensor: str,
    sha256: str,
    conversion_directory: Path,
    sample_pixels: Callable[[], np.ndarray],
) -> engines.ConvertedEngine:
    """Picks how to run a ``tflite:`` backbone: the file as given, or its fastest agreeing rewrite.

    Args:
        requested: ``extract_features.engine``. ``auto`` chooses by measurement (below);
            ``tflite`` runs the file exactly as given; ``keras`` does not apply (as given, noted).
        path: the TFLite file.
        tensor: the tapped tensor (``tflite:PATH#TENSOR``), or empty for the output.
        sha256: the file's sha256; the verdict is remembered as ``<sha256>-tflite.json``.
        conversion_directory: where verdicts are kept (the embedding cache's ``converted/``).
        sample_pixels: real photos at the file's input size (uint8, (N, S, S, 3)).
    """
    if requested != "auto":
        note = "engine: keras does not apply to a TFLite file; it runs as given" if requested == "keras" else "requested: the file as given"
        return _engine(path, tensor, AS_GIVEN, {"reason": note})
    verdict_path = conversion_directory / f"{sha256}-tflite.json"
    verdict = _read_verdict(verdict_path)
    if verdict is None:
        verdict = measure(Path(path).read_bytes(), sample_pixels())
        verdict["sha256"] = sha256
        atomic.write_json(verdict_path, verdict)
    return _engine(path, tensor, verdict["rewrite"], verdict)


def _engine(path: Path, tensor: str, rewrite: str, verdict: dict) -> engines.ConvertedEngine:
    build = lambda: engines.TFLiteEngine(path, tensor=tensor, rewrite=rewrite)
    return engines.ConvertedEngine(engine_name(rewrite), build, verdict)


def _read_verdict(path: Path) -> dict | None:
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("version") == VERDICT_VERSION else None


def measure(content: bytes, pixels: np.ndarray) -> dict:
    """Measures the file and each applicable rewrite on real photos; returns the verdict.

    A rewrite qualifies when it is bit-identical to the file on LiteRT's reference kernels, or
    when its features on XNNPACK are at least as close to the reference kernels' as the noise
    floor (see the module docstring); the fastest of the file and the qualifying rewrites wins.

    Returns:
        ``rewrite`` (the choice, ``""`` for the file as given), ``reason``, and per path:
        ``images_per_second``, ``lowest_cosine`` (to the reference kernels), ``exact``,
        ``qualifies``; ``noise_floor``; ``not_applicable`` (rewrite: why).
    """
    problems = candidates(content)
    applicable = [rewrite for rewrite, problem in problems.items() if not problem]
    verdict: dict[str, Any] = {"version": VERDICT_VERSION, "rewrite": AS_GIVEN, "not_applicable": {k: v for k, v in problems.items() if v}}
    if not applicable:
        verdict["reason"] = "TFLite file runs as given (no rewrite applies: " + "; ".join(f"{k}: {v}" for k, v in problems.items()) + ")"
        return verdict
    reference = _outputs(content, pixels, delegate=False)
    noisy = np.clip(pixels.astype(np.int16) + np.random.default_rng(NOISE_SEED).integers(-1, 2, pixels.shape), 0, 255)
    floor = _lowest_cosine(_outputs(content, noisy.astype(np.uint8), delegate=False), reference)
    paths = {AS_GIVEN: _path_report(content, pixels, reference, floor, exact=True)}
    for rewrite in applicable:
        try:
            rewritten = rewritten_content(content, rewrite)
            exact = bool(np.array_equal(_outputs(rewritten, pixels, delegate=False), reference))
            paths[rewrite] = _path_report(rewritten, pixels, reference, floor, exact=exact)
        except (RuntimeError, ValueError) as error:  # LiteRT refuses the rewritten file: keep the others
            verdict["not_applicable"][rewrite] = f"failed: {error}"[:300]
    chosen = max((name for name, report in paths.items() if report["qualifies"]), key=lambda name: paths[name]["images_per_second"])
    verdict.update(rewrite=chosen, noise_floor=round(floor, 6), paths={name or "as_given": report for name, report in paths.items()})
    verdict["reason"] = _reason(chosen, paths, floor)
    return verdict


def _path_report(content: bytes, pixels: np.ndarray, reference: np.ndarray, floor: float, *, exact: bool) -> dict:
    cosine = _lowest_cosine(_outputs(content, pixels, delegate=True), reference)
    return {
        "images_per_second": round(_images_per_second(content, pixels), 1),
        "lowest_cosine": round(cosine, 6),
        "exact": exact,
        "qualifies": exact or cosine >= floor,
    }


def _reason(chosen: str, paths: dict, floor: float) -> str:
    described = ", ".join(
        f"{name or 'as given'} {report['images_per_second']} img/s cos {report['lowest_cosine']}" + ("" if report["qualifies"] else " (rejected)")
        for name, report in paths.items()
    )
    return f"chose {chosen or 'the file as given'} ({described}; noise floor {floor:.6f})"


def _interpreter(content: bytes, batch: int, *, delegate: bool) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_content=content, num_threads=engines.ENGINE_THREADS, experimental_op_resolver_type=resolver)
    if batch:
        detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def _outputs(content: bytes, pixels: np.ndarray, *, delegate: bool) -> np.ndarray:
    interpreter = _interpreter(content, len(pixels), delegate=delegate)
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], _as_input(pixels, detail["dtype"]))
    interpreter.invoke()
    output = interpreter.get_output_details()[0]
    values = interpreter.get_tensor(output["index"]).reshape(len(pixels), -1).astype(np.float64)
    scale, zero_point = output["quantization"]
    return (values - zero_point) * scale if scale else values


def _as_input(pixels: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype == np.int8:  # an int8 image input is the uint8 one shifted by 128 (as engines.TFLiteEngine feeds it)
        return (np.asarray(pixels, dtype=np.int16) - 128).astype(np.int8)
    return np.asarray(pixels).astype(dtype)


def _lowest_cosine(first: np.ndarray, second: np.ndarray) -> float:
    return float(engines.cosine_similarity(first, second).min())


def _images_per_second(content: bytes, pixels: np.ndarray) -> float:
    batch = pixels[:SPEED_BATCH]
    interpreter = _interpreter(content, len(batch), delegate=True)
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], _as_input(batch, detail["dtype"]))
    interpreter.invoke()  # the first call packs XNNPACK's weights
    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < SPEED_SECONDS or len(rates) < 2:
        begin = time.perf_counter()
        interpreter.invoke()
        rates.append(len(batch) / (time.perf_counter() - begin))
    return float(np.median(rates))
