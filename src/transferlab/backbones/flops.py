"""Parameter and FLOP counts of a Keras model.

The convention (the one ARCHITECTURE.md quotes: MobileNetV2 0.60, VGG16 30.7, ResNet50 7.7,
MobileNet v1 1.14 GFLOPs per image at 224 px):

- FLOPs = 2 x multiply-accumulates (one multiply plus one add per MAC), per image.
- Only the layers that hold nearly all the arithmetic are counted: ``Conv2D`` (grouped too),
  ``DepthwiseConv2D``, ``SeparableConv2D`` (its depthwise and pointwise parts) and ``Dense``.
  Bias additions, batch normalization, activations, pooling, element-wise additions and the
  preprocessing ops are left out (together a few percent on these networks).
- A layer's MACs come from its output shape: for a ``Conv2D``,
  ``out_h * out_w * filters * (k_h * k_w * in_channels / groups)``.

Parameters are counted as Keras does: every weight of every layer, trainable or not (batch
normalization's moving statistics included). For a convolution that is the course's
``(F_H x F_W x C + 1) x N_F``.

TensorFlow is imported lazily, inside the functions.
"""

from __future__ import annotations

import math
from typing import Any


def count_parameters(model: Any) -> int:
    """Counts every weight of a Keras model once (shared weights once), trainable or not.

    Args:
        model: a built Keras model or layer.

    Returns:
        The number of scalars in its weights; equals ``model.count_params()`` for a model
        without shared weights.
    """
    seen: set[int] = set()
    total = 0
    for weight in model.weights:
        if id(weight) not in seen:
            seen.add(id(weight))
            total += math.prod(int(dim) for dim in weight.shape)
    return total


def count_flops(model: Any, image_size: int | None = None) -> int:
    """FLOPs per image (2 x multiply-accumulates) of a Keras image model; see the module doc.

    Args:
        model: a Keras Functional model taking one image batch ``(batch, height, width, channels)``.
        image_size: square input side to count for. ``None`` uses the model's own static input
            size. A model built for any size (``None`` height and width) is cloned onto an input
            of this size first; a model built for another static size is refused, because
            layers such as EfficientNet's padding were computed for the size it was built at.

    Returns:
        FLOPs for one image, an integer.

    Raises:
        ValueError: no size known, a static size other than ``image_size``, or not one image input.
    """
    model = _model_at_size(model, image_size)
    return 2 * _multiply_accumulates(model)


def _model_at_size(model: Any, image_size: int | None) -> Any:
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ValueError(
            "count_flops needs a Keras Functional model with one image input (batch, height, width, channels)"
        )
    _, height, width, channels = inputs[0].shape
    if height is None or width is None:
        if image_size is None:
            raise ValueError(f"model '{model.name}' has no static input size; pass image_size")
        import keras

        new_input = keras.Input(shape=(image_size, image_size, channels), dtype=inputs[0].dtype)
        return keras.models.clone_model(model, input_tensors=new_input)
    if image_size is not None and (height, width) != (image_size, image_size):
        raise ValueError(
            f"model '{model.name}' was built for {height}x{width} inputs, not {image_size}x{image_size}; "
            f"build it at image_size={image_size} to count its FLOPs there"
        )
    return model


def _multiply_accumulates(model: Any) -> int:
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += _multiply_accumulates(layer)
        else:
            total += _layer_multiply_accumulates(layer, keras.layers)
    return total


def _layer_multiply_accumulates(layer: Any, layers: Any) -> int:
    # Checked from the most specific class: in Keras 3 none of these subclasses another.
    if isinstance(layer, layers.DepthwiseConv2D):
        return _output_positions(layer) * _channels(layer.output) * math.prod(layer.kernel_size)
    if isinstance(layer, layers.SeparableConv2D):
        depthwise_channels = _channels(layer.input) * layer.depth_multiplier
        positions = _output_positions(layer)
        return positions * depthwise_channels * (math.prod(layer.kernel_size) + layer.filters)
    if isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.Conv2DTranspose):
        per_output = math.prod(layer.kernel_size) * _channels(layer.input) // layer.groups
        return _output_positions(layer) * layer.filters * per_output
    if isinstance(layer, layers.Dense):
        rows = math.prod(int(dim) for dim in layer.output.shape[1:-1])
        return rows * _channels(layer.input) * layer.units
    return 0


def _output_positions(layer: Any) -> int:
    _, height, width, _ = layer.output.shape
    if height is None or width is None:
        raise ValueError(f"layer '{layer.name}' has no static output size; pass image_size to count_flops")
    return int(height) * int(width)


def _channels(tensor: Any) -> int:
    return int(tensor.shape[-1])
