"""params.yaml: one validated, frozen object per section.

Every stage loads its own section (and ``base``) once, through :func:`load_section`. A wrong
type, an unknown key or an out-of-range value raises ``ValueError`` naming the key and what is
allowed, before any work starts. The comments on each key live in params.yaml; the README's
params reference is the long form.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OFFICIAL_FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
OFFICIAL_FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    """A params.yaml section: strict types, no unknown keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BaseParams(Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42


class DownloadParams(Section):
    source: Annotated[str, Field(min_length=1)] = OFFICIAL_FLOWERS_URL
    sha256: str = OFFICIAL_FLOWERS_SHA256
    min_image_side: Annotated[int, Field(ge=1, le=4096)] = 32
    min_images_per_class: Annotated[int, Field(ge=2, le=100_000)] = 5
    max_files: Annotated[int, Field(ge=1)] = 1_000_000
    max_total_bytes: Annotated[int, Field(ge=1)] = 20 * 2**30
    max_image_pixels: Annotated[int, Field(ge=1)] = 89_478_485
    retries: Annotated[int, Field(ge=0, le=20)] = 3

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError("must be empty or 64 hexadecimal characters (a sha256 digest)")
        return value


class SplitParams(Section):
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    max_images_per_class: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (got {self.val_fraction} + "
                f"{self.test_fraction}); lower one of them"
            )
        return self


class AugmentParams(Section):
    copies: Annotated[int, Field(ge=0, le=50)] = 0
    flip: bool = True
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 15.0
    brightness: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    contrast: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    preview_images: Annotated[int, Field(ge=1, le=64)] = 6


PerBackbone = Any | dict[str, Any]  # one value for every member, or {member name: value}


class ExtractFeaturesParams(Section):
    backbone: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] = "mobilenet_v2"
    alpha: float | dict[str, float] = 1.0
    weights: str | dict[str, str] = "imagenet"
    image_size: Annotated[int, Field(ge=0, le=1024)] | dict[str, Annotated[int, Field(ge=0, le=1024)]] = 0
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 32
    engine: Literal["auto", "keras", "tflite"] = "auto"
    decode_threads: Annotated[int, Field(ge=1, le=64)] = 2
    cache: bool = True
    cache_dir: str = ""
    mirror_average: bool = False


PositiveC = Annotated[float, Field(gt=0.0, le=1e6)]


class LogisticParams(Section):
    c_grid: Annotated[list[PositiveC], Field(min_length=1, max_length=50)] = [
        0.001,
        0.003,
        0.01,
        0.03,
        0.1,
        0.3,
        1.0,
        3.0,
        10.0,
    ]
    max_iter: Annotated[int, Field(ge=10, le=100_000)] = 1000
    select_by: Literal["accuracy", "log_loss"] = "accuracy"

    @field_validator("c_grid")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError(f"values must be distinct, got {value}")
        return sorted(value)


class DenseParams(Section):
    units: Annotated[int, Field(ge=1, le=8192)] = 256
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 0.0003
    epochs: Annotated[int, Field(ge=1, le=1000)] = 50
    batch_size: Annotated[int, Field(ge=1, le=8192)] = 32
    patience: Annotated[int, Field(ge=0, le=1000)] = 5


class ScratchParams(Section):
    image_size: Annotated[int, Field(ge=8, le=1024)] = 180  # three 2x2 poolings need >= 8 pixels
    augment: bool = False
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    epochs: Annotated[int, Field(ge=1, le=1000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=8192)] = 32
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 0.001
    patience: Annotated[int, Field(ge=0, le=1000)] = 3
    decode_threads: Annotated[int, Field(ge=1, le=64)] = 2


class FinetuneParams(Section):
    from_layer: Annotated[str, Field(min_length=1)] = "auto"  # auto = the registry's finetune_from
    epochs: Annotated[int, Field(ge=1, le=1000)] = 8
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 0.0003
    batch_size: Annotated[int, Field(ge=1, le=8192)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3
    flip: bool = True
    patience: Annotated[int, Field(ge=0, le=1000)] = 3


class TrainHeadParams(Section):
    head: str = "logistic"
    class_weight: Literal["none", "balanced"] = "none"
    logistic: LogisticParams = LogisticParams()
    dense: DenseParams = DenseParams()
    scratch: ScratchParams = ScratchParams()
    finetune: FinetuneParams = FinetuneParams()

    @field_validator("head")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in _head_names():
            raise ValueError(f"unknown head '{value}'; choose one of: {', '.join(_head_names())}")
        return value

    def head_options(self) -> dict[str, Any]:
        """The chosen head's own settings (``train_head.<head>``) as keyword arguments."""
        section = getattr(self, self.head, None)  # a head may have no settings of its own
        return {} if section is None else section.model_dump()


class EvaluateParams(Section):
    gallery_images: Annotated[int, Field(ge=1, le=64)] = 12


class ExportParams(Section):
    tflite: bool = True
    check_images: Annotated[int, Field(ge=0)] = 200  # 0 = every test image


# The heads train_head can train; transferlab.heads maps each to its module (and refuses others).
HEAD_NAMES = ("dense", "finetune", "logistic", "scratch")


def _head_names() -> list[str]:
    return list(HEAD_NAMES)


SECTIONS: dict[str, type[Section]] = {
    "base": BaseParams,
    "download": DownloadParams,
    "split": SplitParams,
    "augment": AugmentParams,
    "extract_features": ExtractFeaturesParams,
    "train_head": TrainHeadParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
}


def parse_section(name: str, raw: Any) -> Section:
    """Validates one section's raw mapping; raises ``ValueError`` that names the key.

    Args:
        name: the section name, one of :data:`SECTIONS`.
        raw: the mapping read from params.yaml (``None`` means all defaults).
    """
    if name not in SECTIONS:
        raise ValueError(f"Unknown params section '{name}'; choose one of: {', '.join(sorted(SECTIONS))}")
    model = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"params.yaml: section '{name}' must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ValueError(_describe(name, model, error)) from None


def _describe(name: str, model: type[Section], error: ValidationError) -> str:
    lines = [f"params.yaml: invalid '{name}' section:"]
    seen: set[str] = set()
    for item in error.errors():
        location = [str(part) for part in item["loc"] if not _is_union_tag(part)]
        key = ".".join([name, *location]) if location else name
        if item["type"] == "extra_forbidden":
            message = f"unknown key; allowed keys: {', '.join(_fields_at(model, location[:-1]))}"
        elif item["type"] == "value_error":
            message = item["msg"].removeprefix("Value error, ")
        else:
            message = f"{item['msg']} (got {item.get('input')!r})"
        line = f"  {key}: {message}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    # The keys allowed where an unknown key was found (nested sections have their own).
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member it tried ("str", "list[str]", ...) into the location.
    return isinstance(part, str) and ("[" in part or "-" in part or part in {"str", "int", "float", "bool"})


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 floats without a dot (``1e-3``) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_params_file(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """Reads params.yaml into a mapping; a missing or malformed file raises ``ValueError``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} not found; run the stage from the repository root (where params.yaml is)")
    try:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must be a mapping of sections, got {type(content).__name__}")
    unknown = sorted(set(content) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    return content


def load_section(name: str, path: str | os.PathLike = "params.yaml") -> Section:
    """Loads and validates one section of params.yaml."""
    return parse_section(name, read_params_file(path).get(name))
