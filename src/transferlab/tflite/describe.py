"""What a TFLite image model takes and gives: input, output width, parameters and operations.

A backbone spec ``tflite:PATH[#TENSOR]`` (see :func:`transferlab.backbones.registry.parse_spec`)
names any TFLite image model; :func:`describe_tflite` opens it with LiteRT (no XNNPACK: shapes,
not speed) and checks that it takes one square RGB image batch, so that a wrong file fails with
a message naming it before any image is decoded. The description feeds ``transferlab backbones
--file``, the stack's widths, the export and the leaderboard's parameter counts.

It lives below :mod:`transferlab.backbones` (whose stacks describe their ``tflite:`` members)
and imports only :mod:`transferlab.data.images` (for the file's sha256, its weights identity),
so that the backbones list stays fast: LiteRT is imported when a file is described, never
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

from transferlab.data import images

_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}  # input 2 is the bias


@dataclasses.dataclass(frozen=True)
class TFLiteInfo:
    """What a TFLite image model takes and gives (see :func:`describe_tflite`).

    Attributes:
        path: the file, resolved.
        sha256: hex sha256 of its bytes (its weights identity).
        image_size: input side in pixels (inputs are square).
        input_name, input_shape, input_dtype: the image input (``(1, H, W, 3)``, e.g. ``uint8``).
        input_quantization: ``(scale, zero_point)``; ``(0.0, 0)`` when not quantized.
        tensor: the tapped tensor name, or empty for the graph output.
        output_name, output_shape, output_dtype, output_quantization: the tensor read.
        feature_dim: width after average pooling all but the batch and channel axes.
        parameters: scalars in the constant weight tensors (filters, biases, constants).
        gflops: 2 x multiply-accumulates of conv, depthwise and fully-connected ops per image.
    """

    path: str
    sha256: str
    image_size: int
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    input_quantization: tuple[float, int]
    tensor: str
    output_name: str
    output_shape: tuple[int, ...]
    output_dtype: str
    output_quantization: tuple[float, int]
    feature_dim: int
    parameters: int
    gflops: float


def describe_tflite(path: str | os.PathLike, tensor: str | None = None) -> TFLiteInfo:
    """Describes a TFLite image model used as a backbone (``tflite:PATH[#TENSOR]``).

    Args:
        path: the ``.tflite`` file.
        tensor: read this tensor (by its full name) instead of the graph output.

    Raises:
        ValueError, naming the file: missing file, not a TFLite model, input not one RGB image
        ``(batch, H, W, 3)``, several outputs and no tensor chosen, or no tensor of that name
        (the message lists candidate names).
    """
    path = Path(path)
    interpreter = _open_interpreter(path)
    image = _image_input(path, interpreter)
    try:
        interpreter.allocate_tensors()  # inner tensor shapes are only final after allocation
    except RuntimeError as error:
        raise ValueError(f"{path}: LiteRT cannot prepare this model: {error}") from error
    details = {int(detail["index"]): detail for detail in interpreter.get_tensor_details()}
    output = _chosen_output(path, interpreter, details, tensor)
    operations = interpreter._get_ops_details()  # no public API lists the graph's ops
    shape = tuple(int(dim) for dim in output["shape"])
    if len(shape) < 2:
        raise ValueError(f"{path}: tensor '{output['name']}' has shape {shape}, not (batch, ..., channels) features")
    return TFLiteInfo(
        path=str(path.resolve()),
        sha256=images.sha256_file(path),
        image_size=int(image["shape"][1]),
        input_name=image["name"],
        input_shape=tuple(int(dim) for dim in image["shape"]),
        input_dtype=image["dtype"].__name__,
        input_quantization=_quantization(image),
        tensor=tensor or "",
        output_name=output["name"],
        output_shape=shape,
        output_dtype=output["dtype"].__name__,
        output_quantization=_quantization(output),
        feature_dim=shape[-1],
        parameters=_tflite_parameters(operations, details, interpreter),
        gflops=round(2 * _tflite_multiply_accumulates(operations, details) / 1e9, 3),
    )


def _open_interpreter(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(
            f"TFLite file not found: {path}; check the path in the tflite: spec "
            "(relative paths count from the main repository root)"
        )
    with open(path, "rb") as handle:
        header = handle.read(8)
    if header[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a TFLite model (no TFL3 flatbuffer identifier); give a .tflite file")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES  # describing needs shapes, not XNNPACK's speed
    try:
        return Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: LiteRT cannot load this model: {error}") from error


def _image_input(path: Path, interpreter: Any) -> dict:
    inputs = interpreter.get_input_details()
    shapes = ", ".join(f"{detail['name']} {tuple(int(d) for d in detail['shape'])}" for detail in inputs)
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or int(inputs[0]["shape"][3]) != 3:
        raise ValueError(
            f"{path}: the model must take one RGB image batch (batch, height, width, 3); its inputs are: {shapes}"
        )
    _, height, width, _ = (int(dim) for dim in inputs[0]["shape"])
    if height != width:
        raise ValueError(f"{path}: the input must be square; it is {height}x{width}")
    return inputs[0]


def _chosen_output(path: Path, interpreter: Any, details: dict[int, dict], tensor: str | None) -> dict:
    if tensor:
        for detail in details.values():
            if detail["name"] == tensor:
                return detail
        heading, candidates = _candidate_tensors(interpreter, details, tensor)
        raise ValueError(
            f"{path}: no tensor named '{tensor}'; give a full name. {heading}:\n  " + "\n  ".join(candidates)
        )
    outputs = interpreter.get_output_details()
    if len(outputs) != 1:
        listed = "\n  ".join(detail["name"] for detail in outputs)
        raise ValueError(
            f"{path}: the model has {len(outputs)} outputs; choose one with tflite:PATH#TENSOR:\n  {listed}"
        )
    return details[int(outputs[0]["index"])]


def _candidate_tensors(interpreter: Any, details: dict[int, dict], wanted: str) -> tuple[str, list[str]]:
    produced = _produced_tensors(interpreter)
    names = [details[index]["name"] for index in sorted(produced) if index in details]
    wanted_lower = wanted.lower()
    containing = [
        name
        for name in names
        if wanted_lower in name.lower() or any(part.lower() == wanted_lower for part in name.split(";"))
    ]
    close = difflib.get_close_matches(wanted, names, n=10, cutoff=0.5)
    candidates = list(dict.fromkeys(containing + close))
    shapes = {detail["name"]: tuple(int(dim) for dim in detail["shape"]) for detail in details.values()}
    heading = "Close matches" if candidates else "No close match; the last computed tensors"
    chosen = candidates[:20] if candidates else names[-20:]
    return heading, [f"{name} {shapes[name]}" for name in chosen]


def _produced_tensors(interpreter: Any) -> set[int]:
    produced = {int(detail["index"]) for detail in interpreter.get_input_details()}
    for operation in interpreter._get_ops_details():
        produced.update(int(index) for index in operation["outputs"] if index >= 0)
    return produced


def _quantization(detail: dict) -> tuple[float, int]:
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def _tflite_parameters(operations: list[dict], details: dict[int, dict], interpreter: Any) -> int:
    produced = _produced_tensors(interpreter)
    counted: set[int] = set()
    total = 0
    for operation in operations:
        for position, index in enumerate(int(i) for i in operation["inputs"]):
            if index < 0 or index in produced or index in counted:
                continue
            detail = details[index]
            is_bias = operation["op_name"] in _WEIGHT_OPS and position == 2
            if detail["dtype"].__name__ in ("int32", "int64") and not is_bias:
                continue  # shapes, axes and sizes, not weights
            counted.add(index)
            total += math.prod(int(dim) for dim in detail["shape"])
    return total


def _tflite_multiply_accumulates(operations: list[dict], details: dict[int, dict]) -> int:
    total = 0
    for operation in operations:
        name = operation["op_name"]
        if name not in _WEIGHT_OPS:
            continue
        output = [int(dim) for dim in details[int(operation["outputs"][0])]["shape"]]
        kernel = [int(dim) for dim in details[int(operation["inputs"][1])]["shape"]]
        batch = max(output[0], 1)
        if name == "CONV_2D":  # filter (out, kh, kw, in)
            total += math.prod(output) // batch * math.prod(kernel[1:])
        elif name == "DEPTHWISE_CONV_2D":  # filter (1, kh, kw, out)
            total += math.prod(output) // batch * kernel[1] * kernel[2]
        else:  # FULLY_CONNECTED, weights (units, in)
            total += math.prod(output) // batch * kernel[1]
    return total
