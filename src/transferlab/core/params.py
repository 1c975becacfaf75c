"""params.yaml: one validated, frozen object per section.

Every stage loads its own section (and ``base``) once, through :func:`load_section`. A wrong
type, an unknown key or an out-of-range value raises ``ValueError`` naming the key and what is
allowed, before any work starts. The comments on each key live in params.yaml; the README's
params reference is the long form.

The file is read defensively, since a params file is input like any other: YAML aliases may
add at most :data:`MAX_ALIAS_VALUES` values to what the file writes out (a few hundred bytes of
nested aliases otherwise expand to gigabytes during validation), rejected values are shown shortened,
and every message names the file actually read (``--params OTHER.yaml``), not "params.yaml".
"""

from __future__ import annotations

import collections
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OFFICIAL_FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
OFFICIAL_FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
# extract_features.cache_remote: s3://bucket[/prefix], S3's bucket naming rules, no empty path parts.
_S3_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^/\s]+)*")


class Section(BaseModel):
    """A params.yaml section: strict types, no unknown keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BaseParams(Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42


class DownloadParams(Section):
    source: Annotated[str, Field(min_length=1)] = OFFICIAL_FLOWERS_URL
    sha256: str = OFFICIAL_FLOWERS_SHA256
    min_image_side: Annotated[int, Field(ge=1, le=4096)] = 8  # 28x28 digits and 32x32 icons are datasets too
    min_images_per_class: Annotated[int, Field(ge=2, le=100_000)] = 5
    max_files: Annotated[int, Field(ge=1)] = 1_000_000
    max_total_bytes: Annotated[int, Field(ge=1)] = 20 * 2**30
    # flower_photos unpacks to 1.02 times its .tgz; a bomb of zeros to about 1000 times.
    max_expansion_ratio: Annotated[float, Field(ge=1.0)] = 100.0
    max_image_pixels: Annotated[int, Field(ge=1)] = 89_478_485
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    deadline_seconds: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 3600

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
    # Images the user confirmed as mislabelled (or unwanted): sha256 digests or paths relative to
    # data/raw/images. Versioned with the params, so `dvc params diff` shows what was dropped.
    exclude: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=100_000)] = []

    @field_validator("exclude")
    @classmethod
    def _distinct_entries(cls, value: list[str]) -> list[str]:
        repeated = sorted(entry for entry, count in collections.Counter(value).items() if count > 1)
        if repeated:
            raise ValueError(f"entries must be distinct; listed more than once: {', '.join(repeated[:5])}")
        return value

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

    def recipe_options(self) -> dict[str, Any]:
        """The recipe settings (everything but the preview's size) as keyword arguments."""
        return self.model_dump(exclude={"preview_images"})


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
    # The shared embedding cache on S3 (features/cache_remote.py): "" or s3://bucket[/prefix].
    cache_remote: str = ""
    mirror_average: bool = False
    executor: Literal["local", "ray"] = "local"
    ray_workers: Annotated[int, Field(ge=0, le=4096)] = 0  # 0 = one per CPU Ray offers
    storage_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("cache_remote")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not _S3_URL.fullmatch(value):
            raise ValueError(
                f"must be empty (local cache only) or s3://BUCKET[/PREFIX] (a bucket name of 3-63 lowercase "
                f"letters, digits, dots and hyphens); got {value!r}"
            )
        return value


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
    # Above this many GB of training matrix the head trains out of core (L-BFGS over row chunks).
    max_memory_gb: Annotated[float, Field(gt=0.0, le=4096.0)] = 4.0

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
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine: the rate decays to 0 over the epochs
    batch_size: Annotated[int, Field(ge=1, le=8192)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3
    flip: bool = True
    patience: Annotated[int, Field(ge=0, le=1000)] = 3


MemberName = Annotated[str, Field(min_length=1)]


class FusionParams(Section):
    """``train_head.fusion``: one head per stack member (or group), fused with weights chosen on validation."""

    # auto = every Keras registry member with a cut point; [] = frozen only; or the members to fine-tune.
    finetune: Literal["auto"] | list[MemberName] = "auto"
    # auto = each fine-tuned member's registry default (finetune_from); or {member name: layer}.
    from_layer: Literal["auto"] | dict[str, MemberName] = "auto"
    # Frozen members: one logistic head each (separate), one on their joined columns (joint), or
    # auto: separate when a member is fine-tuned, else joint.
    frozen: Literal["auto", "separate", "joint"] = "auto"
    # Step of the simplex grid of combiner weights (one weight per member head, summing to 1).
    weight_step: Annotated[float, Field(ge=0.01, le=1.0)] = 0.1

    @field_validator("finetune")
    @classmethod
    def _distinct_members(cls, value: Any) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"list each member once, got {value}")
        return value

    @field_validator("weight_step")
    @classmethod
    def _divides_one(cls, value: float) -> float:
        if abs(round(1.0 / value) * value - 1.0) > 1e-9:
            raise ValueError(f"must divide 1 into equal steps (0.5, 0.25, 0.2, 0.1, 0.05, ...), got {value}")
        return value


class TrainHeadParams(Section):
    head: str = "logistic"
    class_weight: Literal["none", "balanced"] = "none"
    seeds: Annotated[int, Field(ge=1, le=20)] = 1  # trainings per stochastic head; 1 = today's single model
    logistic: LogisticParams = LogisticParams()
    dense: DenseParams = DenseParams()
    scratch: ScratchParams = ScratchParams()
    finetune: FinetuneParams = FinetuneParams()
    fusion: FusionParams = FusionParams()

    @field_validator("head")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in _head_names():
            raise ValueError(f"unknown head '{value}'; choose one of: {', '.join(_head_names())}")
        return value

    def head_options(self) -> dict[str, Any]:
        """The chosen head's own settings (``train_head.<head>``) as keyword arguments."""
        section = getattr(self, self.head, None)  # a head may have no settings of its own
        options = {} if section is None else section.model_dump()
        if self.head == "fusion":  # its member heads are trained with the logistic and finetune settings
            finetune = self.finetune.model_dump(exclude={"from_layer", "member"})  # per member: fusion.*
            options.update(logistic_options=self.logistic.model_dump(), finetune_options=finetune)
        return options


class EvaluateParams(Section):
    gallery_images: Annotated[int, Field(ge=1, le=64)] = 12


class ExportParams(Section):
    tflite: bool = True
    # Also model.keras beside the TFLite files: costs TensorFlow, a Keras build and a conversion per export.
    keras: bool = False
    check_images: Annotated[int, Field(ge=0)] = 200  # 0 = every test image


Share = Annotated[float, Field(ge=0.0, le=1.0)]


class GateParams(Section):
    """`transferlab gate`: the thresholds a change must meet against its baseline (flags override)."""

    min_test_accuracy: Share = 0.0  # 0 = no absolute floor
    max_macro_f1_drop: Share = 0.01  # 1 = never fails
    max_class_f1_drop: Share = 0.05
    min_export_agreement: Share = 0.99  # 0 = export not gated (metrics/export.json not required)


# The heads train_head can train; transferlab.heads maps each to its module (and refuses others).
HEAD_NAMES = ("dense", "finetune", "fusion", "logistic", "scratch")


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
    "gate": GateParams,
}


def parse_section(name: str, raw: Any, *, source: str | os.PathLike = "params.yaml") -> Section:
    """Validates one section's raw mapping; raises ``ValueError`` that names the key.

    Args:
        name: the section name, one of :data:`SECTIONS`.
        raw: the mapping read from params.yaml (``None`` means all defaults).
        source: the file ``raw`` came from, as messages should name it.
    """
    if name not in SECTIONS:
        raise ValueError(f"Unknown params section '{name}'; choose one of: {', '.join(sorted(SECTIONS))}")
    model = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: section '{name}' must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ValueError(_describe(name, model, error, source=source)) from None


# Rejected values are shown this long at most: enough to recognise, never megabytes.
MAX_SHOWN_CHARACTERS = 200
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 3, 120, 120, 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 8


def shown(value: Any) -> str:
    """``repr(value)``, bounded: nested and long values are elided to :data:`MAX_SHOWN_CHARACTERS`."""
    return _shorten(_SHORT_REPR.repr(value))


def _shorten(text: str, limit: int = MAX_SHOWN_CHARACTERS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 16]}... (shortened)"


def _describe(name: str, model: type[Section], error: ValidationError, *, source: str | os.PathLike) -> str:
    lines = [f"{source}: invalid '{name}' section:"]
    seen: set[str] = set()
    for item in error.errors():
        location = [str(part) for part in item["loc"] if not _is_union_tag(part)]
        key = _shorten(".".join([name, *location]) if location else name)
        if item["type"] == "extra_forbidden":
            message = f"unknown key; allowed keys: {', '.join(_fields_at(model, location[:-1]))}"
        elif item["type"] == "value_error":
            message = _shorten(item["msg"].removeprefix("Value error, "), 2 * MAX_SHOWN_CHARACTERS)
        else:
            message = f"{_shorten(item['msg'])} (got {shown(item.get('input'))})"
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


# Values (scalars, lists, mappings) that YAML aliases may add to those a params file writes
# out; a long list written out in full (download.exclude) is fine. Nested aliases grow
# exponentially: 471 bytes of them made a 351 MB error message before this bound.
MAX_ALIAS_VALUES = 10_000


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that reads YAML 1.2 floats without a dot (``1e-3``) as floats and
    refuses documents whose aliases add more than :data:`MAX_ALIAS_VALUES` values."""

    def construct_document(self, node: yaml.Node) -> Any:
        # The composed graph shares each anchored node, so it is as small as the file; counting
        # its expanded size here stops a bomb before any Python object is expanded.
        _check_expanded_size(node, MAX_ALIAS_VALUES)
        return super().construct_document(node)


class _TooLarge(ValueError):
    """A document whose aliases expand past the bound, or refer to themselves."""


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Raises :class:`_TooLarge` when expanding the aliases of ``root`` would add more than ``limit`` values.

    Iterative depth-first count, memoized per node, so shared (aliased) nodes cost once to count.
    ``sizes`` holds one entry per node written out, so a subtree that already expands to more than
    ``len(sizes) + limit`` values proves the bound broken before the whole document is counted.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        children = _children(node)
        if children_counted:
            in_progress.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > len(sizes) + limit:
                raise _TooLarge(
                    f"its YAML aliases (*name) add more than {limit} values to those written out, far more than "
                    "any params file needs (an alias bomb?); write the values out instead of nesting aliases"
                )
        elif id(node) in in_progress:
            raise _TooLarge("a YAML alias (*name) refers to a value that contains it; remove the self-reference")
        elif id(node) not in sizes:
            in_progress.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


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
        raise ValueError(f"{path} is not valid YAML: {_shorten(str(error), 2 * MAX_SHOWN_CHARACTERS)}") from None
    except _TooLarge as error:
        raise ValueError(f"{path}: {error}") from None
    except RecursionError:
        raise ValueError(f"{path} nests its values too deeply to be a params file; flatten it") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must be a mapping of sections, got {type(content).__name__}")
    unknown = sorted(shown(key) for key in set(content) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    return content


def load_section(name: str, path: str | os.PathLike = "params.yaml") -> Section:
    """Loads and validates one section of a params file (``params.yaml`` unless told otherwise)."""
    return parse_section(name, read_params_file(path).get(name), source=path)
