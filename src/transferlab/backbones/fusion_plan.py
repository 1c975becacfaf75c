"""Which members of a stack the ``fusion`` head fine-tunes, and where each is cut.

One rule, shared by the stage that writes tap activations (it must know which members need
taps) and by the fusion head (it must know which members it fine-tunes): both call
:func:`finetune_plan` with params ``train_head.fusion.finetune`` and ``train_head.fusion.from_layer``.

- ``finetune: auto`` fine-tunes every Keras registry member whose family has a default cut point
  (``finetune_from``, e.g. mobilenet_v2: ``block_13_expand``); ``[]`` fine-tunes none (frozen
  only, seconds); a list names the members.
- A member that cannot be fine-tuned (a ``tflite:`` file has no Keras layers; a registry family
  without a default cut point under ``auto``) gets a frozen logistic head instead, and the plan
  says why, for a log line.
- ``from_layer: auto`` cuts each fine-tuned member at its registry default; a mapping
  ``{member name: layer}`` overrides it per member.

Imports nothing heavy (the registry only), so a stage that needs no taps stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from transferlab.backbones import registry

AUTO = "auto"
TFLITE_PREFIX = "tflite:"


@dataclass(frozen=True)
class Plan:
    """The fine-tuned members (name -> first layer trained) and the frozen ones (name -> why)."""

    layers: dict[str, str] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)


def is_keras(spec: str) -> bool:
    """True for a registry spec (a Keras backbone), False for a ``tflite:`` file."""
    return not spec.strip().startswith(TFLITE_PREFIX)


def finetune_plan(
    members: Sequence[tuple[str, str]], *, finetune: str | Sequence[str], from_layer: str | Mapping[str, str]
) -> Plan:
    """Decides which members are fine-tuned, and from which layer.

    Args:
        members: ``(name, spec)`` per stack member, in stack order (name: the registry name or the
            TFLite file stem, as in :attr:`transferlab.features.files.Block.name`).
        finetune: params ``train_head.fusion.finetune``: ``auto``, or a list of member names.
        from_layer: params ``train_head.fusion.from_layer``: ``auto``, or ``{member name: layer}``.

    Returns:
        The plan; ``frozen`` says for each member that is not fine-tuned why (for a log line).

    Raises:
        ValueError: ``finetune`` or ``from_layer`` names a member that is not in the stack, or
            ``from_layer`` names a member that is not fine-tuned.
    """
    names = [name for name, _ in members]
    specs = dict(members)
    wanted = _wanted(names, finetune)
    overrides = {} if isinstance(from_layer, str) else dict(from_layer)
    if isinstance(from_layer, str) and from_layer.strip() != AUTO:
        raise ValueError(
            f"train_head.fusion.from_layer must be auto or a mapping {{member: layer}}, got {from_layer!r}"
        )
    layers: dict[str, str] = {}
    frozen: dict[str, str] = {}
    for name in names:
        if name not in wanted:
            frozen[name] = "not listed in train_head.fusion.finetune"
        elif not is_keras(specs[name]):
            frozen[name] = "a TFLite file has no Keras layers to fine-tune"
        elif name in overrides:
            layers[name] = overrides[name].strip()
        else:
            default = registry.get(name).finetune_from
            if default is None:
                frozen[name] = f"the {name} family has no default cut point (set train_head.fusion.from_layer)"
            else:
                layers[name] = default
    stray = sorted(set(overrides) - set(layers))
    if stray:
        raise ValueError(
            f"train_head.fusion.from_layer names {', '.join(stray)}, which the fusion head does not fine-tune; "
            f"fine-tuned members: {', '.join(layers) or 'none'}"
        )
    return Plan(layers=layers, frozen=frozen)


def _wanted(names: Sequence[str], finetune: str | Sequence[str]) -> set[str]:
    if isinstance(finetune, str):
        if finetune.strip() != AUTO:
            raise ValueError(f"train_head.fusion.finetune must be auto or a list of member names, got {finetune!r}")
        return set(names)
    unknown = sorted(set(finetune) - set(names))
    if unknown:
        raise ValueError(
            f"train_head.fusion.finetune names {', '.join(unknown)}, which is not in the stack; "
            f"members: {', '.join(names)}"
        )
    return set(finetune)
