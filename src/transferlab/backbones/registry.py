"""The backbone registry: every pretrained ImageNet CNN transferlab uses as a frozen feature extractor.

One frozen :class:`Backbone` record per ``keras.applications`` model carries its own input
contract (constructor, ``preprocess_input`` module, default and minimum input size, feature
width, width multipliers) and its cost (parameters, GFLOPs), so preprocessing never lives in
params.yaml: it travels with the backbone, *inside* the model :func:`build` returns.

Besides registry names, a backbone *spec* may be ``tflite:PATH`` or ``tflite:PATH#TENSOR``: any
TFLite image model, described by :func:`transferlab.tflite.describe.describe_tflite` (input,
output width, parameters, operations). Relative paths count from the main repository root (see
:mod:`transferlab.core.paths`), so they mean the same in ``dvc exp run --queue`` copies of the
repository.

Numbers in the registry (``parameters``, ``gflops``) come from ``benchmarks/registry_numbers.py``
(Keras 3.15.1); the contract test in ``tests/unit/test_backbone_contract.py`` re-checks them.
Conventions: ``parameters`` = ``count_params()`` of the model without its top
(``include_top=False``) at alpha 1.0, batch-norm statistics included; ``gflops`` = 2 x
multiply-accumulates of the convolution and dense layers for one image at the default size (see
:mod:`transferlab.backbones.flops`; MobileNetV2 0.60, ResNet50 7.7, VGG16 30.7).

Importing this module never imports TensorFlow (``transferlab backbones`` must stay fast):
:func:`build` imports Keras when it runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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


def _family(family: str, **defaults: Any) -> dict[str, Any]:
    """The fields a family's rows share; a row overrides any of them (timm's ``_cfg(...)``).

    Most families take ImageNet's 224 pixels and accept down to Keras' 32; ``preprocess_module``
    and ``preprocess_mode`` come from the family (VGG's rows name their own module).
    """
    return {"family": family, "default_size": 224, "min_size": 32, **defaults}


def _row(name: str, family: dict[str, Any], **fields: Any) -> Backbone:
    """One registry entry: its family's defaults, then the row's own keyword fields."""
    return Backbone(name=name, **{**family, **fields})


_VGG = _family("vgg", preprocess_mode="caffe", feature_dim=512, finetune_from="block5_conv1")
_RESNET = _family(
    "resnet", preprocess_module="resnet", preprocess_mode="caffe", feature_dim=2048, finetune_from="conv5_block1_1_conv"
)
_RESNET_V2 = _family(
    "resnet_v2",
    preprocess_module="resnet_v2",
    preprocess_mode="tf",
    feature_dim=2048,
    finetune_from="conv5_block1_preact_bn",
)
_MOBILENET = _family("mobilenet", preprocess_module="mobilenet", preprocess_mode="tf", alphas=MOBILENET_ALPHAS)
_MOBILENET_V2 = _family(
    "mobilenet_v2", preprocess_module="mobilenet_v2", preprocess_mode="tf", alphas=MOBILENET_V2_ALPHAS
)
_MOBILENET_V3 = _family(
    "mobilenet_v3", preprocess_module="mobilenet_v3", preprocess_mode="in-model", alphas=MOBILENET_V3_ALPHAS
)
_INCEPTION_V3 = _family(
    "inception_v3", preprocess_module="inception_v3", preprocess_mode="tf", default_size=299, min_size=75
)
_INCEPTION_RESNET_V2 = _family(
    "inception_resnet_v2", preprocess_module="inception_resnet_v2", preprocess_mode="tf", default_size=299, min_size=75
)
_XCEPTION = _family("xception", preprocess_module="xception", preprocess_mode="tf", default_size=299, min_size=71)
_EFFICIENTNET = _family(
    "efficientnet", preprocess_module="efficientnet", preprocess_mode="in-model", finetune_from="block6a_expand_conv"
)
_EFFICIENTNET_V2 = _family(
    "efficientnet_v2",
    preprocess_module="efficientnet_v2",
    preprocess_mode="in-model",
    finetune_from="block6a_expand_conv",
)

# parameters: count_params() without the top at alpha 1.0; gflops: per image at the default size;
# weights_file: Keras' official no-top file at alpha 1.0 and the default size.
_REGISTRY = (
    _row(
        "vgg16",
        _VGG,
        constructor="VGG16",
        preprocess_module="vgg16",
        parameters=14_714_688,
        gflops=30.693,
        weights_file=_keras_file("vgg16"),
    ),
    _row(
        "vgg19",
        _VGG,
        constructor="VGG19",
        preprocess_module="vgg19",
        parameters=20_024_384,
        gflops=39.017,
        weights_file=_keras_file("vgg19"),
    ),
    _row(
        "resnet50",
        _RESNET,
        constructor="ResNet50",
        parameters=23_587_712,
        gflops=7.712,
        weights_file=_keras_file("resnet50"),
    ),
    _row(
        "resnet101",
        _RESNET,
        constructor="ResNet101",
        parameters=42_658_176,
        gflops=15.136,
        weights_file=_keras_file("resnet101"),
    ),
    _row(
        "resnet152",
        _RESNET,
        constructor="ResNet152",
        parameters=58_370_944,
        gflops=22.561,
        weights_file=_keras_file("resnet152"),
    ),
    _row(
        "resnet50_v2",
        _RESNET_V2,
        constructor="ResNet50V2",
        parameters=23_564_800,
        gflops=6.96,
        weights_file=_keras_file("resnet50v2"),
    ),
    _row(
        "resnet101_v2",
        _RESNET_V2,
        constructor="ResNet101V2",
        parameters=42_626_560,
        gflops=14.385,
        weights_file=_keras_file("resnet101v2"),
    ),
    _row(
        "resnet152_v2",
        _RESNET_V2,
        constructor="ResNet152V2",
        parameters=58_331_648,
        gflops=21.809,
        weights_file=_keras_file("resnet152v2"),
    ),
    _row(
        "mobilenet",
        _MOBILENET,
        constructor="MobileNet",
        feature_dim=1024,
        parameters=3_228_864,
        gflops=1.135,
        weights_file="mobilenet_1_0_224_tf_no_top.h5",
        finetune_from="conv_dw_12",
    ),
    _row(
        "mobilenet_v2",
        _MOBILENET_V2,
        constructor="MobileNetV2",
        feature_dim=1280,
        parameters=2_257_984,
        gflops=0.599,
        weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        finetune_from="block_13_expand",
    ),
    _row(
        "mobilenet_v3_small",
        _MOBILENET_V3,
        constructor="MobileNetV3Small",
        feature_dim=576,
        parameters=939_120,
        gflops=0.11,
        weights_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        finetune_from="expanded_conv_9_expand",
    ),
    _row(
        "mobilenet_v3_large",
        _MOBILENET_V3,
        constructor="MobileNetV3Large",
        feature_dim=960,
        parameters=2_996_352,
        gflops=0.428,
        weights_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        finetune_from="expanded_conv_12_expand",
    ),
    _row(
        "inception_v3",
        _INCEPTION_V3,
        constructor="InceptionV3",
        feature_dim=2048,
        parameters=21_802_784,
        gflops=11.422,
        weights_file=_keras_file("inception_v3"),
        finetune_from="mixed8",
    ),
    _row(
        "inception_resnet_v2",
        _INCEPTION_RESNET_V2,
        constructor="InceptionResNetV2",
        feature_dim=1536,
        parameters=54_336_736,
        gflops=26.309,
        weights_file=_keras_file("inception_resnet_v2"),
        finetune_from="mixed_7a",
    ),
    _row(
        "xception",
        _XCEPTION,
        constructor="Xception",
        feature_dim=2048,
        parameters=20_861_480,
        gflops=16.711,
        weights_file=_keras_file("xception"),
        finetune_from="block13_sepconv1_act",
    ),
    _row(
        "efficientnet_b0",
        _EFFICIENTNET,
        constructor="EfficientNetB0",
        feature_dim=1280,
        parameters=4_049_571,
        gflops=0.769,
        weights_file="efficientnetb0_notop.h5",
    ),
    _row(
        "efficientnet_b1",
        _EFFICIENTNET,
        constructor="EfficientNetB1",
        default_size=240,
        feature_dim=1280,
        parameters=6_575_239,
        gflops=1.371,
        weights_file="efficientnetb1_notop.h5",
    ),
    _row(
        "efficientnet_b2",
        _EFFICIENTNET,
        constructor="EfficientNetB2",
        default_size=260,
        feature_dim=1408,
        parameters=7_768_569,
        gflops=1.984,
        weights_file="efficientnetb2_notop.h5",
    ),
    _row(
        "efficientnet_b3",
        _EFFICIENTNET,
        constructor="EfficientNetB3",
        default_size=300,
        feature_dim=1536,
        parameters=10_783_535,
        gflops=3.651,
        weights_file="efficientnetb3_notop.h5",
    ),
    _row(
        "efficientnet_b4",
        _EFFICIENTNET,
        constructor="EfficientNetB4",
        default_size=380,
        feature_dim=1792,
        parameters=17_673_823,
        gflops=8.784,
        weights_file="efficientnetb4_notop.h5",
    ),
    _row(
        "efficientnet_b5",
        _EFFICIENTNET,
        constructor="EfficientNetB5",
        default_size=456,
        feature_dim=2048,
        parameters=28_513_527,
        gflops=20.529,
        weights_file="efficientnetb5_notop.h5",
    ),
    _row(
        "efficientnet_b6",
        _EFFICIENTNET,
        constructor="EfficientNetB6",
        default_size=528,
        feature_dim=2304,
        parameters=40_960_143,
        gflops=38.131,
        weights_file="efficientnetb6_notop.h5",
    ),
    _row(
        "efficientnet_b7",
        _EFFICIENTNET,
        constructor="EfficientNetB7",
        default_size=600,
        feature_dim=2560,
        parameters=64_097_687,
        gflops=75.487,
        weights_file="efficientnetb7_notop.h5",
    ),
    _row(
        "efficientnet_v2_b0",
        _EFFICIENTNET_V2,
        constructor="EfficientNetV2B0",
        feature_dim=1280,
        parameters=5_919_312,
        gflops=1.434,
        weights_file="efficientnetv2-b0_notop.h5",
    ),
    _row(
        "efficientnet_v2_b1",
        _EFFICIENTNET_V2,
        constructor="EfficientNetV2B1",
        default_size=240,
        feature_dim=1280,
        parameters=6_931_124,
        gflops=2.391,
        weights_file="efficientnetv2-b1_notop.h5",
    ),
    _row(
        "efficientnet_v2_b2",
        _EFFICIENTNET_V2,
        constructor="EfficientNetV2B2",
        default_size=260,
        feature_dim=1408,
        parameters=8_769_374,
        gflops=3.392,
        weights_file="efficientnetv2-b2_notop.h5",
    ),
    _row(
        "efficientnet_v2_b3",
        _EFFICIENTNET_V2,
        constructor="EfficientNetV2B3",
        default_size=300,
        feature_dim=1536,
        parameters=12_930_622,
        gflops=6.02,
        weights_file="efficientnetv2-b3_notop.h5",
    ),
    _row(
        "efficientnet_v2_s",
        _EFFICIENTNET_V2,
        constructor="EfficientNetV2S",
        default_size=384,
        feature_dim=1280,
        parameters=20_331_360,
        gflops=16.729,
        weights_file="efficientnetv2-s_notop.h5",
    ),
)

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
    arguments = dict(
        include_top=False, weights=None if weights == "none" else weights, input_tensor=preprocessed, pooling="avg"
    )
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
    """Parses a backbone spec; does not open any file (see :func:`transferlab.tflite.describe.describe_tflite`).

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
            raise ValueError(
                f"Unsupported backbone spec kind '{prefix}:' in '{text}'; use a registry name or tflite:PATH[#TENSOR]"
            )
        return Spec(text=text, kind="keras", name=get(text).name)
    location = text[len(TFLITE_PREFIX) :]
    tensor = ""
    if "#" in location:
        location, _, tensor = location.rpartition("#")
        if not tensor.strip():
            raise ValueError(
                f"backbone spec '{text}' ends with '#' but names no tensor; write tflite:PATH#TENSOR or drop the '#'"
            )
    if not location.strip():
        raise ValueError(f"backbone spec '{text}' has no file path; write tflite:PATH or tflite:PATH#TENSOR")
    path = paths.resolve_param_path(location.strip(), root)
    name = path.stem + (f"#{tensor}" if tensor else "")
    return Spec(text=text, kind="tflite", name=name, path=path, tensor=tensor)
