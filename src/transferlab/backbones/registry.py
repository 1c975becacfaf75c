"""The backbone registry: every pretrained ImageNet CNN transferlab uses as a frozen feature extractor.

One frozen :class:`Backbone` record per ``keras.applications`` model carries its own input
contract (constructor, ``preprocess_input`` module, default and minimum input size, feature
width, width multipliers) and its cost (parameters, GFLOPs), so preprocessing never lives in
params.yaml: it travels with the backbone, *inside* the model :func:`build` returns.

Besides registry names, a backbone *spec* may be ``tflite:PATH`` or ``tflite:PATH#TENSOR``: any
TFLite image model, described by :func:`describe_tflite` (input, output width, parameters,
operations). Relative paths count from the main repository root (see :mod:`transferlab.core.paths`),
so they mean the same in ``dvc exp run --queue`` copies of the repository.

Numbers in the registry (``parameters``, ``gflops``) come from ``benchmarks/registry_numbers.py``
(Keras 3.15.1); the contract test in ``tests/unit/test_backbone_contract.py`` re-checks them.
Conventions: ``parameters`` = ``count_params()`` of the model without its top
(``include_top=False``) at alpha 1.0, batch-norm statistics included; ``gflops`` = 2 x
multiply-accumulates of the convolution and dense layers for one image at the default size (see
:mod:`transferlab.backbones.flops`; MobileNetV2 0.60, ResNet50 7.7, VGG16 30.7).

Importing this module never imports TensorFlow (``transferlab backbones`` must stay fast):
:func:`build` imports Keras when it runs, :func:`describe_tflite` imports LiteRT.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
from pathlib import Path
from typing import Any

from transferlab.core import paths
from transferlab.data import images

TFLITE_PREFIX = "tflite:"
WEIGHTS_CHOICES = ("imagenet", "none")
PREPROCESS_MODES = ("tf", "caffe", "in-model")  # x/127.5-1 ; RGB->BGR minus mean ; the model rescales


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One registered ``keras.applications`` backbone and its input contract.

    Attributes:
        name: registry name (snake_case), e.g. ``mobilenet_v2``.
        family: architecture family, e.g. ``mobilenet_v2``, ``resnet``, ``efficientnet``.
        constructor: ``keras.applications`` attribute, e.g. ``"MobileNetV2"``.
        preprocess_module: ``keras.applications`` module whose ``preprocess_input`` the model
            applies to raw 0..255 RGB pixels, e.g. ``"mobilenet_v2"``.
        preprocess_mode: what that function does: ``tf`` (x/127.5 - 1), ``caffe`` (RGB to BGR
            minus the ImageNet mean) or ``in-model`` (identity: the network rescales itself).
        default_size: the input side the ImageNet weights were trained at.
        min_size: the smallest input side Keras accepts.
        feature_dim: pooled embedding width at alpha 1.0.
        parameters: weights without the top at alpha 1.0 (``count_params()``).
        gflops: GFLOPs (2 x multiply-accumulates) per image at ``default_size`` and alpha 1.0.
        weights_file: Keras' official no-top weights file at alpha 1.0 and the default size.
        alphas: allowed width multipliers; empty when the family has none.
        finetune_from: first layer to unfreeze when fine-tuning (a late block), or None.
    """

    name: str
    family: str
    constructor: str
    preprocess_module: str
    preprocess_mode: str
    default_size: int
    min_size: int
    feature_dim: int
    parameters: int
    gflops: float
    weights_file: str
    alphas: tuple[float, ...] = ()
    finetune_from: str | None = None

    def official_weights_file(self, alpha: float | None = None, image_size: int | None = None) -> str:
        """The no-top file ``weights="imagenet"`` loads for this alpha and input size.

        MobileNet v1/v2 ship one file per (alpha, size) and fall back to the 224 file at other
        sizes (as Keras does); MobileNetV3 has one file per alpha; other families one file.
        """
        rule = _WEIGHTS_FILE_RULES.get(self.family)
        if rule is None:
            return self.weights_file
        return rule(self, check_alpha(self, alpha), check_image_size(self, image_size))


def _mobilenet_v1_file(entry: Backbone, alpha: float, image_size: int) -> str:
    alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
    rows = image_size if image_size in (128, 160, 192, 224) else 224
    return f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"


def _mobilenet_v2_file(entry: Backbone, alpha: float, image_size: int) -> str:
    rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def _mobilenet_v3_file(entry: Backbone, alpha: float, image_size: int) -> str:
    model_type = "small" if entry.constructor.endswith("Small") else "large"
    return f"weights_mobilenet_v3_{model_type}_224_{float(alpha)}_float_no_top_v2.h5"


_WEIGHTS_FILE_RULES = {
    "mobilenet": _mobilenet_v1_file,
    "mobilenet_v2": _mobilenet_v2_file,
    "mobilenet_v3": _mobilenet_v3_file,
}

MOBILENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)
MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_V3_ALPHAS = (0.75, 1.0)  # the widths Keras has ImageNet weights for


def _keras_file(stem: str) -> str:
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _entry(name, family, constructor, module, mode, size, min_size, width, parameters, gflops, weights_file, **extra):
    return Backbone(name, family, constructor, module, mode, size, min_size, width, parameters, gflops, weights_file, **extra)


# fmt: off
# name, family, constructor, preprocess module, mode, default size, min size, feature width,
# parameters (no top, alpha 1.0), GFLOPs per image at the default size, official no-top file.
_REGISTRY = (
    _entry("vgg16", "vgg", "VGG16", "vgg16", "caffe", 224, 32, 512, 14_714_688, 30.693, _keras_file("vgg16"), finetune_from="block5_conv1"),
    _entry("vgg19", "vgg", "VGG19", "vgg19", "caffe", 224, 32, 512, 20_024_384, 39.017, _keras_file("vgg19"), finetune_from="block5_conv1"),
    _entry("resnet50", "resnet", "ResNet50", "resnet", "caffe", 224, 32, 2048, 23_587_712, 7.712, _keras_file("resnet50"), finetune_from="conv5_block1_1_conv"),
    _entry("resnet101", "resnet", "ResNet101", "resnet", "caffe", 224, 32, 2048, 42_658_176, 15.136, _keras_file("resnet101"), finetune_from="conv5_block1_1_conv"),
    _entry("resnet152", "resnet", "ResNet152", "resnet", "caffe", 224, 32, 2048, 58_370_944, 22.561, _keras_file("resnet152"), finetune_from="conv5_block1_1_conv"),
    _entry("resnet50_v2", "resnet_v2", "ResNet50V2", "resnet_v2", "tf", 224, 32, 2048, 23_564_800, 6.96, _keras_file("resnet50v2"), finetune_from="conv5_block1_preact_bn"),
    _entry("resnet101_v2", "resnet_v2", "ResNet101V2", "resnet_v2", "tf", 224, 32, 2048, 42_626_560, 14.385, _keras_file("resnet101v2"), finetune_from="conv5_block1_preact_bn"),
    _entry("resnet152_v2", "resnet_v2", "ResNet152V2", "resnet_v2", "tf", 224, 32, 2048, 58_331_648, 21.809, _keras_file("resnet152v2"), finetune_from="conv5_block1_preact_bn"),
    _entry("mobilenet", "mobilenet", "MobileNet", "mobilenet", "tf", 224, 32, 1024, 3_228_864, 1.135, "mobilenet_1_0_224_tf_no_top.h5", alphas=MOBILENET_ALPHAS, finetune_from="conv_dw_12"),
    _entry("mobilenet_v2", "mobilenet_v2", "MobileNetV2", "mobilenet_v2", "tf", 224, 32, 1280, 2_257_984, 0.599, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", alphas=MOBILENET_V2_ALPHAS, finetune_from="block_13_expand"),
    _entry("mobilenet_v3_small", "mobilenet_v3", "MobileNetV3Small", "mobilenet_v3", "in-model", 224, 32, 576, 939_120, 0.11, "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", alphas=MOBILENET_V3_ALPHAS, finetune_from="expanded_conv_9_expand"),
    _entry("mobilenet_v3_large", "mobilenet_v3", "MobileNetV3Large", "mobilenet_v3", "in-model", 224, 32, 960, 2_996_352, 0.428, "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", alphas=MOBILENET_V3_ALPHAS, finetune_from="expanded_conv_12_expand"),
    _entry("inception_v3", "inception_v3", "InceptionV3", "inception_v3", "tf", 299, 75, 2048, 21_802_784, 11.422, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", finetune_from="mixed8"),
    _entry("inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", "tf", 299, 75, 1536, 54_336_736, 26.309, "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5", finetune_from="mixed_7a"),
    _entry("xception", "xception", "Xception", "xception", "tf", 299, 71, 2048, 20_861_480, 16.711, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", finetune_from="block13_sepconv1_act"),
    _entry("efficientnet_b0", "efficientnet", "EfficientNetB0", "efficientnet", "in-model", 224, 32, 1280, 4_049_571, 0.769, "efficientnetb0_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b1", "efficientnet", "EfficientNetB1", "efficientnet", "in-model", 240, 32, 1280, 6_575_239, 1.371, "efficientnetb1_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b2", "efficientnet", "EfficientNetB2", "efficientnet", "in-model", 260, 32, 1408, 7_768_569, 1.984, "efficientnetb2_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b3", "efficientnet", "EfficientNetB3", "efficientnet", "in-model", 300, 32, 1536, 10_783_535, 3.651, "efficientnetb3_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b4", "efficientnet", "EfficientNetB4", "efficientnet", "in-model", 380, 32, 1792, 17_673_823, 8.784, "efficientnetb4_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b5", "efficientnet", "EfficientNetB5", "efficientnet", "in-model", 456, 32, 2048, 28_513_527, 20.529, "efficientnetb5_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b6", "efficientnet", "EfficientNetB6", "efficientnet", "in-model", 528, 32, 2304, 40_960_143, 38.131, "efficientnetb6_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_b7", "efficientnet", "EfficientNetB7", "efficientnet", "in-model", 600, 32, 2560, 64_097_687, 75.487, "efficientnetb7_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_v2_b0", "efficientnet_v2", "EfficientNetV2B0", "efficientnet_v2", "in-model", 224, 32, 1280, 5_919_312, 1.434, "efficientnetv2-b0_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_v2_b1", "efficientnet_v2", "EfficientNetV2B1", "efficientnet_v2", "in-model", 240, 32, 1280, 6_931_124, 2.391, "efficientnetv2-b1_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_v2_b2", "efficientnet_v2", "EfficientNetV2B2", "efficientnet_v2", "in-model", 260, 32, 1408, 8_769_374, 3.392, "efficientnetv2-b2_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_v2_b3", "efficientnet_v2", "EfficientNetV2B3", "efficientnet_v2", "in-model", 300, 32, 1536, 12_930_622, 6.02, "efficientnetv2-b3_notop.h5", finetune_from="block6a_expand_conv"),
    _entry("efficientnet_v2_s", "efficientnet_v2", "EfficientNetV2S", "efficientnet_v2", "in-model", 384, 32, 1280, 20_331_360, 16.729, "efficientnetv2-s_notop.h5", finetune_from="block6a_expand_conv"),
)
# fmt: on

REGISTRY: dict[str, Backbone] = {entry.name: entry for entry in _REGISTRY}


def names() -> tuple[str, ...]:
    """Registry names, in registry order (families together, small to large)."""
    return tuple(REGISTRY)


def get(name: str | Backbone) -> Backbone:
    """Looks a backbone up by registry name (case-insensitive); an entry is returned as is.

    Raises:
        ValueError: unknown name; the message lists every name and suggests the closest.
    """
    if isinstance(name, Backbone):
        return name
    key = str(name).strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    raise ValueError(f"Unsupported backbone '{name}'; {_suggestion(key)}choose one of: {', '.join(REGISTRY)}")


def _suggestion(key: str) -> str:
    squashed = {entry.replace("_", ""): entry for entry in REGISTRY}
    close = squashed.get(key.replace("_", "").replace("-", "")) or next(
        iter(difflib.get_close_matches(key, list(REGISTRY), n=1, cutoff=0.6)), None
    )
    if key.endswith(".tflite"):
        return f"for a TFLite file write 'tflite:{key}'; "
    return f"did you mean '{close}'? " if close else ""


def check_alpha(entry: Backbone, alpha: float | None) -> float | None:
    """Validates a width multiplier; returns it (default 1.0), or None for families without one.

    Raises:
        ValueError: alpha not allowed for the family (the message lists the allowed values).
    """
    if not entry.alphas:
        if alpha is not None and float(alpha) != 1.0:
            raise ValueError(
                f"{entry.name} has no width multiplier (alpha); set alpha to 1.0 or use a family that has one "
                "(mobilenet, mobilenet_v2, mobilenet_v3_*)"
            )
        return None
    value = 1.0 if alpha is None else float(alpha)
    if value not in entry.alphas:
        allowed = ", ".join(f"{choice:g}" for choice in entry.alphas)
        raise ValueError(f"alpha {alpha!r} is not available for {entry.name}; choose one of: {allowed}")
    return value


def check_image_size(entry: Backbone, image_size: int | None) -> int:
    """Validates an input side; ``None`` or 0 means the backbone's default size.

    Raises:
        ValueError: smaller than the family's minimum, or not an integer.
    """
    if image_size is None or image_size == 0:
        return entry.default_size
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise ValueError(f"image_size must be an integer number of pixels, got {image_size!r}")
    image_size = int(image_size)
    if image_size < entry.min_size:
        raise ValueError(
            f"image_size {image_size} is too small for {entry.name}; use at least {entry.min_size} "
            f"(default {entry.default_size}), or 0 for the default"
        )
    return image_size


def feature_dim(entry: Backbone | str, alpha: float | None = None) -> int:
    """Width of the pooled embedding for a width multiplier (Keras' own rounding rules)."""
    entry = get(entry)
    alpha = check_alpha(entry, alpha)
    if entry.family == "mobilenet":
        return int(1024 * alpha)
    if entry.family == "mobilenet_v2":
        return _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    if entry.family == "mobilenet_v3":
        last_block = 96 if entry.constructor.endswith("Small") else 160
        return _make_divisible(_make_divisible(last_block * alpha) * 6)
    return entry.feature_dim


def parameter_count(entry: Backbone | str, alpha: float | None = None) -> int:
    """Parameters of the no-top backbone: the registry's count at alpha 1.0, else counted on a build."""
    entry = get(entry)
    alpha = check_alpha(entry, alpha)
    if alpha in (None, 1.0):
        return entry.parameters
    from transferlab.backbones import flops

    return flops.count_parameters(build(entry, alpha=alpha, weights="none", image_size=entry.default_size))


def _make_divisible(value: float, divisor: int = 8) -> int:
    # keras.applications' rounding of channel counts (MobileNet v2/v3 `_make_divisible`/`_depth`).
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def check_weights(weights: str | os.PathLike | None, root: str | os.PathLike | None = None) -> str:
    """Normalizes a weights setting: ``imagenet``, ``none``, or the resolved path of a local file.

    Relative paths count from the main repository root (:func:`transferlab.core.paths.resolve_param_path`).

    Raises:
        ValueError: the file does not exist (the message names it and the choices).
    """
    if weights is None:
        return "none"
    text = str(weights).strip()
    if text.lower() in WEIGHTS_CHOICES:
        return text.lower()
    if not text:
        raise ValueError("weights is empty; use imagenet, none, or the path of a local weights file")
    path = paths.resolve_param_path(text, root)
    if not path.is_file():
        raise ValueError(
            f"weights file not found: {path} (from '{text}'); give an existing local weights file "
            "(relative paths count from the main repository root), 'imagenet' or 'none'"
        )
    return str(path)


def weights_identity(
    entry: Backbone | str,
    weights: str | os.PathLike | None,
    alpha: float | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> str:
    """What the weights are, independent of where they lie (part of the embedding cache key).

    Returns:
        the sha256 of a local weights file, the official Keras file name for ``imagenet``
        (which depends on alpha and size for MobileNets), or ``random-init-seed<N>`` for ``none``.
    """
    entry = get(entry)
    weights = check_weights(weights)
    if weights == "imagenet":
        return entry.official_weights_file(alpha, image_size)
    if weights == "none":
        return f"random-init-seed{int(seed)}"
    return sha256_file(weights)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and modification time)."""
    status = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return images.sha256_file(path)


def build(
    entry: Backbone | str,
    *,
    alpha: float | None = None,
    weights: str | os.PathLike | None = "imagenet",
    image_size: int | None = None,
    seed: int = 0,
) -> Any:
    """Builds the frozen-feature-extractor model of a backbone: raw RGB pixels in, embedding out.

    The model takes float32 ``(batch, size, size, 3)`` images with raw 0..255 values and applies
    the family's ``keras.applications.<module>.preprocess_input`` itself (as graph ops in front
    of the first layer, no weights, no Lambda), so every engine and the exported model see raw
    pixels. The output is the globally average-pooled last feature map ``(batch, feature_dim)``.
    The layers keep Keras' names (``finetune_from`` refers to them) and stay trainable; call the
    model with ``training=False`` (or set ``trainable = False``) to use it frozen.

    Args:
        entry: a registry entry or name.
        alpha: width multiplier for families that have one (default 1.0).
        weights: ``imagenet`` (Keras' official file, downloaded or from ``~/.keras/models``),
            ``none`` (random init seeded with ``seed``: for tests only), or a local weights file
            for the no-top model (relative paths count from the repository root).
        image_size: input side in pixels; ``None``/0 = the backbone's default size.
        seed: seeds the random init (``keras.utils.set_random_seed``) when weights is ``none``.

    Raises:
        ValueError: unknown backbone, alpha or size not allowed, weights file missing or not
            loadable, or official weights not available offline.
    """
    entry = get(entry)
    alpha = check_alpha(entry, alpha)
    size = check_image_size(entry, image_size)
    weights = check_weights(weights)
    import keras

    if weights == "none":
        keras.utils.set_random_seed(int(seed))
    pixels = keras.Input(shape=(size, size, 3), dtype="float32", name="pixels")
    preprocessed = getattr(keras.applications, entry.preprocess_module).preprocess_input(pixels)
    arguments = dict(include_top=False, weights=None if weights == "none" else weights, input_tensor=preprocessed, pooling="avg")
    if alpha is not None:
        arguments["alpha"] = alpha
    try:
        model = getattr(keras.applications, entry.constructor)(**arguments)
    except Exception as error:  # noqa: BLE001 - Keras raises bare Exception for failed downloads
        raise _weights_error(entry, weights, alpha, size, error) from error
    # Same layers, but a single (not list) input, so calling it with one array does not warn.
    return keras.Model(inputs=pixels, outputs=model.outputs[0], name=model.name)


def _weights_error(entry: Backbone, weights: str, alpha: float | None, size: int, error: Exception) -> Exception:
    if weights == "none":
        return error
    if weights == "imagenet":
        file_name = entry.official_weights_file(alpha, size)
        return ValueError(
            f"could not get Keras' official weights {file_name} for {entry.name} ({error}); without internet, "
            f"put the file into ~/.keras/models/ (or $KERAS_HOME/models/) or give a local weights file"
        )
    return ValueError(
        f"could not load weights file {weights} into {entry.name} (alpha {alpha}, size {size}): {error}. "
        "It must be the no-top weights (include_top=False) of this backbone and alpha"
    )


# ---------------------------------------------------------------- backbone specs


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed backbone spec: a registry name, ``tflite:PATH`` or ``tflite:PATH#TENSOR``.

    Attributes:
        text: the spec as written (stripped).
        kind: ``keras`` (a registry entry) or ``tflite`` (a file).
        name: the registry name, or for TFLite the file stem plus ``#TENSOR`` (a display name).
        path: the TFLite file, resolved (relative paths against the main repository root).
        tensor: the tensor to tap instead of the graph output; empty for the output.
    """

    text: str
    kind: str
    name: str
    path: Path | None = None
    tensor: str = ""

    @property
    def backbone(self) -> Backbone:
        """The registry entry of a ``keras`` spec."""
        if self.kind != "keras":
            raise ValueError(f"backbone spec '{self.text}' is a TFLite file, not a registry entry")
        return REGISTRY[self.name]


def parse_spec(spec: str, root: str | os.PathLike | None = None) -> Spec:
    """Parses a backbone spec; does not open any file (see :func:`describe_tflite`).

    Args:
        spec: a registry name (``mobilenet_v2``), ``tflite:PATH`` or ``tflite:PATH#TENSOR``.
            The tensor name follows the last ``#``.
        root: the main repository root for relative paths (default: found from the cwd).

    Raises:
        ValueError: an empty spec, an unknown name, another ``kind:`` prefix, or a ``tflite:``
            spec without a path or with an empty tensor name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"backbone spec must be a registry name or tflite:PATH[#TENSOR], got {spec!r}")
    text = spec.strip()
    if not text.lower().startswith(TFLITE_PREFIX):
        prefix, colon, _ = text.partition(":")
        if colon:
            raise ValueError(f"Unsupported backbone spec kind '{prefix}:' in '{text}'; use a registry name or tflite:PATH[#TENSOR]")
        return Spec(text=text, kind="keras", name=get(text).name)
    location = text[len(TFLITE_PREFIX) :]
    tensor = ""
    if "#" in location:
        location, _, tensor = location.rpartition("#")
        if not tensor.strip():
            raise ValueError(f"backbone spec '{text}' ends with '#' but names no tensor; write tflite:PATH#TENSOR or drop the '#'")
    if not location.strip():
        raise ValueError(f"backbone spec '{text}' has no file path; write tflite:PATH or tflite:PATH#TENSOR")
    path = paths.resolve_param_path(location.strip(), root)
    name = path.stem + (f"#{tensor}" if tensor else "")
    return Spec(text=text, kind="tflite", name=name, path=path, tensor=tensor)


# ---------------------------------------------------------------- TFLite files

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
        sha256=sha256_file(path),
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
        raise ValueError(f"TFLite file not found: {path}; check the path in the tflite: spec (relative paths count from the main repository root)")
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
        raise ValueError(f"{path}: the model must take one RGB image batch (batch, height, width, 3); its inputs are: {shapes}")
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
        raise ValueError(f"{path}: no tensor named '{tensor}'; give a full name. {heading}:\n  " + "\n  ".join(candidates))
    outputs = interpreter.get_output_details()
    if len(outputs) != 1:
        listed = "\n  ".join(detail["name"] for detail in outputs)
        raise ValueError(f"{path}: the model has {len(outputs)} outputs; choose one with tflite:PATH#TENSOR:\n  {listed}")
    return details[int(outputs[0]["index"])]


def _candidate_tensors(interpreter: Any, details: dict[int, dict], wanted: str) -> tuple[str, list[str]]:
    produced = _produced_tensors(interpreter)
    names = [details[index]["name"] for index in sorted(produced) if index in details]
    wanted_lower = wanted.lower()
    containing = [name for name in names if wanted_lower in name.lower() or any(part.lower() == wanted_lower for part in name.split(";"))]
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
