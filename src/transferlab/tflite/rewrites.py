"""Faster rewrites of a TFLite backbone file: bytes in, bytes out.

Three things can make a quantized TFLite file slow, depending on the CPU:

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
- **No 8-bit dot products.** The opposite holds on CPUs without VNNI (AVX2 alone): there
  XNNPACK's float32 kernels can beat its int8 ones (issue 15: MobileNet v1 as given 70 images/s,
  int8 57 on a 2-core AVX2 EPYC). :func:`float32_content` dequantizes every weight and activation
  into a float32 graph that takes the same uint8 image (a DEQUANTIZE op in front). It drops the
  8-bit rounding and the clamping of each activation to its calibrated range, so it moves the
  features more than the other two (lowest cosine to the reference kernels on flower photos:
  MobileNet v1 0.998, EfficientNet-Lite0 0.996, MobileNetEdgeTPU 0.967, whose ReLUs the file clamps
  at calibrated maxima of 14 to 100) and qualifies only where that stays above the noise floor.

No rewrite can be held to the 0.9999 cosine that a float conversion meets: XNNPACK rounds
8-bit requantization differently from LiteRT's reference kernels, so even a file that XNNPACK
takes as it is disagrees with the reference kernels (lowest cosine on flower photos: MobileNet
v1 0.9993, EfficientNet-Lite0 0.997, MobileNetEdgeTPU 0.994). Whether a rewrite is used is
decided by measurement on real photos, in :mod:`transferlab.features.engine_choice`; this module
only rewrites bytes and says which rewrites apply (:func:`candidates`), and imports nothing from
:mod:`transferlab.features`. Each rewrite has its own engine name (:func:`engine_name`), which is
part of the embedding cache key, so embeddings of different paths never mix.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

AS_GIVEN = ""  # the file unchanged
STATIC_SHAPES = "static-shapes"
INT8 = "int8"
FLOAT32 = "float32"
REWRITES = (STATIC_SHAPES, INT8, FLOAT32)
# Ops whose uint8 kernels become int8 kernels by shifting every zero point by 128 (weights aside).
_INT8_SHIFTABLE = {"ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D", "RESHAPE", "SQUEEZE", "RELU", "RELU6"}
_WEIGHTED = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3}  # op -> output-channel axis of its filter
_INT8_OP_VERSIONS = {
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "ADD": 2,
    "AVERAGE_POOL_2D": 2,
    "MAX_POOL_2D": 2,
    "RELU": 2,
    "RELU6": 2,
}


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
        raise ValueError(
            f"'{name}' is not a TFLite engine name; expected tflite or tflite-<rewrite> "
            f"with rewrite one of: {', '.join(REWRITES)}"
        )
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
    if rewrite == FLOAT32:
        return float32_content(content)
    raise ValueError(
        f"unknown TFLite rewrite '{rewrite}'; choose one of: {', '.join(REWRITES)} (or '' for the file as given)"
    )


# ---------------------------------------------------------------- static shapes


def unshaped_tensors(content: bytes) -> list[int]:
    """Tensors that ops read or write, stored without a shape although LiteRT computes one."""
    graph = _model_object(content).subgraphs[0]
    computed = _computed_shapes(content)
    touched = {index for operator in graph.operators for index in (*operator.inputs, *operator.outputs) if index >= 0}
    stored_empty = {
        index for index in touched if graph.tensors[index].shape is None or len(graph.tensors[index].shape) == 0
    }
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


# ---------------------------------------------------------------- quantized -> float32

# Ops whose float32 kernels compute what their quantized kernels approximate (QUANTIZE and
# DEQUANTIZE between two float tensors become no-ops and are removed).
_FLOAT_CAPABLE = {
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEQUANTIZE",
    "FULLY_CONNECTED",
    "HARD_SWISH",
    "LOGISTIC",
    "MAX_POOL_2D",
    "MEAN",
    "MUL",
    "PAD",
    "QUANTIZE",
    "RELU",
    "RELU6",
    "RESHAPE",
    "SQUEEZE",
    "SUB",
}


def float32_problem(content: bytes) -> str:
    """Why :func:`float32_content` does not apply to a file; empty when it does."""
    from ai_edge_litert import schema_py_generated as schema

    model = _model_object(content)
    graph = model.subgraphs[0]
    quantized = {schema.TensorType.UINT8, schema.TensorType.INT8}
    if not any(tensor.type in quantized for tensor in graph.tensors):
        return "not a quantized model"
    codes = _op_names(model)
    unsupported = sorted({codes[op.opcodeIndex] for op in graph.operators} - _FLOAT_CAPABLE)
    if unsupported:
        return f"ops that this rewrite does not handle: {', '.join(unsupported)}"
    return ""


@functools.lru_cache(maxsize=8)
def float32_content(content: bytes) -> bytes:
    """Rewrites a quantized model as a float32 model that takes the same uint8 (or int8) image.

    Every quantized constant becomes its real value, ``(q - zero point) x scale`` per channel
    (biases ``q x scale``); every quantized activation becomes float32 (no 8-bit rounding, no
    clamping to its calibrated range); a DEQUANTIZE op turns the image input into real values
    (its quantization maps 0..255 as before); QUANTIZE/DEQUANTIZE ops left between float tensors
    are removed. The output is float32 real values. On CPUs whose int8 dot products are slow
    (no VNNI), XNNPACK's float32 kernels can beat its int8 ones; whether the features stay close
    enough is measured (:mod:`transferlab.features.engine_choice`). Static shapes are written in
    as by :func:`static_shapes_content`.

    Raises:
        ValueError: the file is not such a model (see :func:`float32_problem`).
    """
    problem = float32_problem(content)
    if problem:
        raise ValueError(f"the float32 rewrite does not apply to this TFLite file: {problem}")

    model = _model_object(static_shapes_content(content))
    graph = model.subgraphs[0]
    image = graph.inputs[0]
    for index, tensor in enumerate(graph.tensors):
        if index != image:
            _to_float32(model, tensor)
    readers = [op for op in graph.operators if image in op.inputs]
    real_image = _dequantized_input(model, image)
    for op in readers:
        op.inputs = [real_image if index == image else index for index in op.inputs]
    _remove_float_casts(model)
    return _to_bytes(model)


def float32_dropped_tensors(content: bytes) -> set[str]:
    """Names of the tensors :func:`float32_content` no longer computes: the outputs of QUANTIZE/DEQUANTIZE ops."""
    model = _model_object(content)
    graph = model.subgraphs[0]
    codes = _op_names(model)
    casts = [op for op in graph.operators if codes[op.opcodeIndex] in ("QUANTIZE", "DEQUANTIZE")]
    return {graph.tensors[op.outputs[0]].name.decode(errors="replace") for op in casts}


def _to_float32(model: Any, tensor: Any) -> None:
    """Turns one quantized tensor (a constant or an activation) into float32 real values."""
    from ai_edge_litert import schema_py_generated as schema

    quantization = tensor.quantization
    scales = None if quantization is None or quantization.scale is None else np.asarray(quantization.scale)
    if tensor.type not in (schema.TensorType.UINT8, schema.TensorType.INT8, schema.TensorType.INT32):
        return
    if scales is None or len(scales) == 0:
        return  # int32 shapes and axes, unquantized: kept
    if _has_data(model, tensor):
        values = _tensor_data(model, tensor).astype(np.float64)
        shape = [1] * values.ndim
        if values.ndim:
            shape[int(quantization.quantizedDimension or 0)] = -1 if len(scales) > 1 else 1
        zero_points = np.asarray(quantization.zeroPoint if quantization.zeroPoint is not None else [0])
        real = (values - zero_points.reshape(shape)) * scales.reshape(shape)
        model.buffers.append(schema.BufferT())  # its own buffer: another tensor may share the old one
        tensor.buffer = len(model.buffers) - 1
        _set_tensor_data(model, tensor, real.astype(np.float32))
    tensor.type = schema.TensorType.FLOAT32
    tensor.quantization = None


def _dequantized_input(model: Any, image: int) -> int:
    """Adds ``DEQUANTIZE(image) -> float32`` in front of the graph; returns the new tensor's index."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    source = graph.tensors[image]
    real = schema.TensorT()
    real.name = (source.name or b"input") + b"/dequantized"
    real.type = schema.TensorType.FLOAT32
    real.shape = np.array(source.shape, dtype=np.int32)
    real.shapeSignature = None if source.shapeSignature is None else np.array(source.shapeSignature, dtype=np.int32)
    model.buffers.append(schema.BufferT())
    real.buffer = len(model.buffers) - 1
    graph.tensors.append(real)
    operator = schema.OperatorT()
    operator.opcodeIndex = _opcode_index(model, "DEQUANTIZE", version=2 if source.type == schema.TensorType.INT8 else 1)
    operator.inputs = [image]
    operator.outputs = [len(graph.tensors) - 1]
    graph.operators.insert(0, operator)
    return len(graph.tensors) - 1


def _remove_float_casts(model: Any) -> None:
    """Drops QUANTIZE/DEQUANTIZE ops that now read and write float32: readers take their input."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    codes = _op_names(model)
    for op in list(graph.operators):
        source, target = op.inputs[0], op.outputs[0]
        if codes[op.opcodeIndex] not in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if graph.tensors[source].type != schema.TensorType.FLOAT32:
            continue  # the image's own DEQUANTIZE
        graph.operators.remove(op)
        for other in graph.operators:
            other.inputs = [source if index == target else index for index in other.inputs]
        graph.outputs = [source if index == target else index for index in graph.outputs]


def _opcode_index(model: Any, name: str, *, version: int) -> int:
    from ai_edge_litert import schema_py_generated as schema

    code = int(getattr(schema.BuiltinOperator, name))
    for index, existing in enumerate(model.operatorCodes):
        if _code_name(existing) == name:
            existing.version = max(int(existing.version), version)
            return index
    operator_code = schema.OperatorCodeT()
    operator_code.builtinCode = code
    operator_code.deprecatedBuiltinCode = min(code, 127)  # the schema's placeholder for codes above 127
    operator_code.version = version
    model.operatorCodes.append(operator_code)
    return len(model.operatorCodes) - 1


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

    dtype = {schema.TensorType.UINT8: np.uint8, schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32}[
        tensor.type
    ]
    raw = np.asarray(model.buffers[tensor.buffer].data, dtype=np.uint8).tobytes()
    return np.frombuffer(raw, dtype=dtype).reshape([int(dim) for dim in tensor.shape])


def _set_tensor_data(model: Any, tensor: Any, values: np.ndarray) -> None:
    model.buffers[tensor.buffer].data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8)


def _computed_shapes(content: bytes) -> dict[int, tuple[int, ...]]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # The reference kernels compute the shapes; XNNPACK would take the graph before they exist.
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_content=content, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return {
        int(detail["index"]): tuple(int(dim) for dim in detail["shape"]) for detail in interpreter.get_tensor_details()
    }


# ---------------------------------------------------------------- which rewrites apply


def candidates(content: bytes) -> dict[str, str]:
    """``{rewrite: why it does not apply}`` for every rewrite; empty where it applies."""
    try:
        return {
            STATIC_SHAPES: "" if unshaped_tensors(content) else "every tensor already has a shape",
            INT8: int8_problem(content),
            FLOAT32: float32_problem(content),
        }
    except ValueError as error:  # e.g. several subgraphs: the file runs as given
        return {rewrite: str(error) for rewrite in REWRITES}
