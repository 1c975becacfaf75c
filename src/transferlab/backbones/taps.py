"""Cutting a Keras backbone at a layer: the frozen bottom (pixels -> tap) and the trainable top.

The ``finetune`` head trains the backbone's layers from ``train_head.finetune.from_layer`` to the
pooled output, plus a new classifier, on *tap activations*: the tensor that feeds
``from_layer``, computed once per image by the frozen bottom and kept in the embedding cache.

A layer is a *cut point* when its single input tensor is the only tensor that crosses from the
bottom (that tensor and everything it is computed from) to the top (everything else). Inside a
residual block two tensors cross (the branch and the shortcut), so the graph cannot be cut there.
The top is rebuilt as a new functional model whose input is the tap, with fresh copies of the
layers and the backbone's weights copied in; its batch-normalization layers are frozen
(``trainable = False``, which in Keras 3 also makes them run in inference mode; see the README:
the shared MobileNetV2 has its batch norm folded into identity plus bias).

Keras is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

AUTO = "auto"
# In the extract_taps stage's folder (data/taps/): taps.json (the index), and per member
# <member>/<split>.npy, <member>/taps.json and <member>/backbone.keras (transferlab.features.files).
DESCRIPTION_FILE = "taps.json"
BACKBONE_FILE = "backbone.keras"


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where a functional model is cut: the tap tensor, and the top's nodes in graph order.

    Attributes:
        layer: the first layer of the top (``from_layer``).
        tensor: the tap, the single tensor crossing the cut (a KerasTensor of the model).
        top_nodes: the graph nodes above the cut, in the model's topological order.
    """

    layer: str
    tensor: Any
    top_nodes: tuple[Any, ...]


def resolve_from_layer(backbone: str, from_layer: str) -> str:
    """``from_layer`` as given, or for ``auto`` the registry's ``finetune_from`` of the backbone.

    Args:
        backbone: a registry name, e.g. ``mobilenet_v2``.
        from_layer: a layer name, or ``auto``.

    Raises:
        ValueError: ``auto`` for a backbone without a registered default.
    """
    from transferlab.backbones import registry

    if from_layer.strip() != AUTO:
        return from_layer.strip()
    entry = registry.get(backbone)
    if not entry.finetune_from:
        raise ValueError(
            f"{entry.name} has no default fine-tuning layer; set train_head.finetune.from_layer to a layer name"
        )
    return entry.finetune_from


def _model_nodes(model: Any) -> list[Any]:
    """The nodes of a functional model's graph, in the model's topological order, one per operation."""
    position = {id(operation): index for index, operation in enumerate(model.operations)}
    found: dict[int, Any] = {}
    pending = list(model.outputs)
    while pending:
        operation, node_index, _ = pending.pop()._keras_history
        node = operation._inbound_nodes[node_index]
        if id(operation) in found:
            if found[id(operation)] is not node:
                raise ValueError(f"layer '{operation.name}' is used twice in {model.name}; shared layers cannot be cut")
            continue
        found[id(operation)] = node
        pending.extend(node.input_tensors)
    return sorted(found.values(), key=lambda node: position[id(node.operation)])


def _producer(tensor: Any) -> int:
    return id(tensor._keras_history.operation)


def _ancestors(tensor: Any) -> set[int]:
    """Ids of the operations that ``tensor`` is computed from, its own producer included."""
    seen: set[int] = set()
    pending = [tensor]
    while pending:
        current = pending.pop()
        operation, node_index, _ = current._keras_history
        if id(operation) in seen:
            continue
        seen.add(id(operation))
        pending.extend(operation._inbound_nodes[node_index].input_tensors)
    return seen


def _cut_at(nodes: list[Any], node: Any) -> Cut | None:
    """The cut in front of ``node``, or None when more than its one input would cross it."""
    import keras

    if not isinstance(node.operation, keras.layers.Layer) or isinstance(node.operation, keras.layers.InputLayer):
        return None
    if len(node.input_tensors) != 1:
        return None
    tap = node.input_tensors[0]
    bottom = _ancestors(tap)
    top = [candidate for candidate in nodes if id(candidate.operation) not in bottom]
    crossing = {id(tensor) for candidate in top for tensor in candidate.input_tensors if _producer(tensor) in bottom}
    if crossing != {id(tap)}:
        return None
    return Cut(layer=node.operation.name, tensor=tap, top_nodes=tuple(top))


def cut_points(model: Any) -> list[str]:
    """The layers a functional ``model`` can be cut in front of, in graph order."""
    nodes = _model_nodes(model)
    return [node.operation.name for node in nodes if _cut_at(nodes, node) is not None]


def find_cut(model: Any, layer: str) -> Cut:
    """The cut in front of ``layer``.

    Raises:
        ValueError: no such layer, or not a clean cut point; the message lists the cut points.
    """
    nodes = _model_nodes(model)
    by_name = {node.operation.name: node for node in nodes}
    cut = _cut_at(nodes, by_name[layer]) if layer in by_name else None
    if cut is not None:
        return cut
    valid = [node.operation.name for node in nodes if _cut_at(nodes, node) is not None]
    if layer not in by_name:
        close = difflib.get_close_matches(layer, list(by_name), n=3)
        reason = f"{model.name} has no layer '{layer}'" + (f" (did you mean {', '.join(close)}?)" if close else "")
    else:
        reason = (
            f"the graph of {model.name} cannot be cut in front of '{layer}': more than one tensor crosses "
            "there (inside a residual block or between parallel branches)"
        )
    raise ValueError(f"{reason}; set train_head.finetune.from_layer to one of the cut points: {', '.join(valid)}")


def tap_shape(model: Any, layer: str) -> tuple[int, ...]:
    """The shape of one image's tap activations in front of ``layer``, e.g. (14, 14, 96)."""
    return tuple(int(dim) for dim in find_cut(model, layer).tensor.shape[1:])


def bottom_model(model: Any, layer: str, *, flatten: bool = False) -> Any:
    """The frozen bottom: ``model``'s input (raw pixels) to the tap feeding ``layer``.

    Args:
        model: a backbone from :func:`transferlab.backbones.registry.build` (or a loaded copy).
        layer: the first layer of the top.
        flatten: flatten the tap to (N, H*W*C), as the embedding engines expect one row per image.
    """
    import keras

    cut = find_cut(model, layer)
    output = keras.layers.Flatten(name="flat_tap")(cut.tensor) if flatten else cut.tensor
    return keras.Model(model.inputs[0], output, name=f"{model.name}_to_{layer}")


def top_model(model: Any, layer: str) -> Any:
    """The top as a new model, tap in, ``model``'s output out, with copies of its weights.

    Every layer from ``layer`` on is a fresh copy (same config, same weights), so training it
    leaves ``model`` as it was. Batch-normalization layers are frozen: ``trainable = False``,
    which in Keras 3 runs them in inference mode (their saved statistics) even while training.
    """
    import keras

    cut = find_cut(model, layer)
    tap = keras.Input(shape=tuple(cut.tensor.shape[1:]), dtype=cut.tensor.dtype, name="tap")
    values = {id(cut.tensor): tap}
    for node in cut.top_nodes:
        arguments, keywords = node.arguments.fill_in(values)
        operation = _copy(node.operation)
        outputs = operation(*arguments, **keywords)
        for old, new in zip(node.output_tensors, keras.tree.flatten(outputs)):
            values[id(old)] = new
        if isinstance(operation, keras.layers.Layer):
            operation.set_weights(node.operation.get_weights())
            if isinstance(operation, keras.layers.BatchNormalization):
                operation.trainable = False
    return keras.Model(tap, values[id(model.outputs[0])], name=f"{model.name}_from_{layer}")


def _copy(operation: Any) -> Any:
    import keras

    if isinstance(operation, keras.layers.Layer):
        return operation.__class__.from_config(operation.get_config())
    return operation  # a stateless graph op (keras.ops): reusing it shares no weights
