"""From the ``extract_features`` params to the backbones of a stack, each with its own settings.

``extract_features.backbone`` is one spec or a list of specs (a stack). ``alpha``, ``weights``
and ``image_size`` each take one value for every Keras member, or a mapping from member name to
value, so that a mixed stack reads naturally in params.yaml and through ``dvc exp run -S``::

    backbone: [mobilenet, mobilenet_v2, "tflite:../shared/weights/x.tflite"]
    weights: {mobilenet: ../shared/weights/a.h5, mobilenet_v2: ../shared/weights/b.h5}
    alpha: {mobilenet: 0.25}

A TFLite member takes its input size, dtype and quantization from its file, so those settings
do not apply to it. A member's ``name`` is its registry name, or for ``tflite:`` the file stem
(plus ``#TENSOR``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.backbones import registry
from transferlab.tflite.describe import describe_tflite

PER_MEMBER_SETTINGS = ("alpha", "weights", "image_size")


@dataclass(frozen=True)
class Member:
    """One backbone of a stack, fully resolved.

    Attributes:
        spec: the spec as written in params.
        name: short display name (registry name, or TFLite file stem[#tensor]).
        kind: ``keras`` or ``tflite``.
        identity: what the backbone is, independent of file paths (part of the cache key).
        weights_identity: sha256 of the weights file, the official file name, or random-init-seed<N>.
        image_size: square input size in pixels.
        alpha: width multiplier (Keras families that have one), else None.
        weights: ``imagenet``, ``none`` or a resolved local path (Keras members).
        path: the TFLite file (TFLite members).
        tensor: the tapped tensor name for ``tflite:PATH#TENSOR``, else empty.
        random_init: True when the weights are random (``weights: none``): for tests only.
    """

    spec: str
    name: str
    kind: str
    identity: str
    weights_identity: str
    image_size: int
    alpha: float | None = None
    weights: str = ""
    path: Path | None = None
    tensor: str = ""
    random_init: bool = False


def resolve_members(params: Any, *, seed: int, root: Path | None = None) -> list[Member]:
    """Resolves ``extract_features`` params into the stack's members, validating everything.

    Args:
        params: the validated ``extract_features`` section.
        seed: ``base.seed`` (random-init weights are seeded with it).
        root: the main repository root for relative paths (default: found from the cwd).
    """
    specs = [params.backbone] if isinstance(params.backbone, str) else list(params.backbone)
    members = [_resolve_one(spec, params, seed=seed, root=root) for spec in specs]
    names = [member.name for member in members]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"extract_features.backbone lists {', '.join(duplicates)} more than once; list each backbone once"
        )
    for setting in PER_MEMBER_SETTINGS:
        value = getattr(params, setting)
        if isinstance(value, Mapping):
            # Names of other registry backbones are allowed, so that one mapping in params.yaml
            # serves every experiment of a comparison; anything else is a typo.
            unknown = sorted(set(value) - set(names) - set(registry.names()))
            if unknown:
                raise ValueError(
                    f"extract_features.{setting} names {', '.join(unknown)}, which is neither in the stack nor a "
                    f"registered backbone; use member names: {', '.join(names)}"
                )
    return members


def _setting(params: Any, setting: str, name: str) -> Any:
    value = getattr(params, setting)
    if isinstance(value, Mapping):
        return value.get(name, type(params).model_fields[setting].default)
    return value


def _resolve_one(spec: str, params: Any, *, seed: int, root: Path | None) -> Member:
    parsed = registry.parse_spec(spec, root=root)
    if parsed.kind == "tflite":
        info = describe_tflite(parsed.path, parsed.tensor or None)
        return Member(
            spec=spec,
            name=parsed.name,
            kind="tflite",
            identity=f"tflite:{info.sha256}#{parsed.tensor}",
            weights_identity=info.sha256,
            image_size=info.image_size,
            path=parsed.path,
            tensor=parsed.tensor,
        )
    entry = registry.get(parsed.name)
    alpha = float(_setting(params, "alpha", entry.name)) if entry.alphas else None
    image_size = int(_setting(params, "image_size", entry.name)) or entry.default_size
    weights = _resolve_weights(str(_setting(params, "weights", entry.name)), root)
    identity = registry.weights_identity(entry, weights, alpha=alpha, image_size=image_size, seed=seed)
    return Member(
        spec=spec,
        name=entry.name,
        kind="keras",
        identity=f"keras:{entry.name}" + (f"@{alpha:g}" if alpha is not None else ""),
        weights_identity=identity,
        image_size=image_size,
        alpha=alpha,
        weights=weights,
        random_init=weights == "none",
    )


def _resolve_weights(weights: str, root: Path | None) -> str:
    try:
        return registry.check_weights(weights, root)
    except ValueError as error:
        raise ValueError(f"extract_features.weights: {error}") from None


def label(member: Member) -> str:
    """A member's display name: its name, with ``@alpha`` when the width multiplier is not 1."""
    return member.name + (f"@{member.alpha:g}" if member.alpha not in (None, 1.0) else "")


def describe(members: list[Member]) -> str:
    """The stack's display name: member labels joined by '+'."""
    return "+".join(label(member) for member in members)
