"""The ``fusion`` head: one head per stack member (or group), fused with weights chosen on validation.

Frozen features of one stack level off (about 94.6% on flower_photos); heads that see different
features, combined well, go past it. Each *member head* is trained on its own columns:

- members the fusion fine-tunes (params ``train_head.fusion.finetune``, decided by
  :func:`transferlab.backbones.fusion_plan.finetune_plan`) get the ``finetune`` head on their cached
  tap activations, with the ``train_head.finetune`` settings;
- the other members get the ``logistic`` head (``train_head.logistic`` settings) on their frozen
  block columns: one head on their joined columns (``frozen: joint``, the stack's own logistic
  head) or one head each (``frozen: separate``). ``auto`` (the default) is ``separate`` when a
  member is fine-tuned and ``joint`` when none is: on flower_photos each was the better one on
  held-out halves of validation in its case (README "Best accuracy"). A member that cannot be
  fine-tuned (a ``tflite:`` file) is logged as such.

The combiner sums the member heads' log-probabilities with weights ``w`` (``w >= 0``, ``sum w =
1``) and renormalizes: ``p = softmax(sum_m w_m log p_m)``, a weighted geometric mean. The weights
are the point of a simplex grid (step ``weight_step``, default 0.1) with the highest validation
log-likelihood; ties go to the weights closest to equal. Test is never seen. Why so simple: the
member heads already used validation (logistic picks C on it; finetune with a constant rate stops early on it), so
their validation figures are a little optimistic; a combiner with many parameters fitted on the
same few hundred images would chase that. Here there are M-1 free parameters on a coarse grid,
and log-likelihood (smooth, every image counts) rather than accuracy (a handful of flips) picks
them. A weight of 0 drops a member that only adds noise. Per-member temperatures were not kept:
with a weight per member they add M parameters that change the fused argmax little.

Saved head: head.json (settings: the member heads, their blocks and weights) and
``members/<key>/``, each a saved head of its own kind (what :func:`transferlab.heads.load_head`
reads). ``<key>`` is the member's name with characters other than letters, digits, ``_`` and
``-`` replaced by ``_`` (``frozen`` for a joint group of several members): it keys the member's
figures in metrics/evaluate.json (``members.<key>.test_accuracy``).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import fusion_plan
from transferlab.features import files
from transferlab.heads import base

NAME = "fusion"
MEMBERS_FOLDER = "members"
JOINT_KEY = "frozen"
FROZEN = ("auto", "joint", "separate")
PROBABILITY_FLOOR = 1e-12  # log(0) guard: a member certain of a wrong class must not veto every other
MAX_GRID_POINTS = 200_000
TIE_TOLERANCE = 1e-9  # nats per image: validation log-likelihoods this close count as equal
# The member heads' modules, imported when used (finetune imports Keras). Not through the head
# registry: transferlab.heads imports this module by name, and the import graph stays acyclic.
MEMBER_MODULES = {"logistic": "transferlab.heads.logistic", "finetune": "transferlab.heads.finetune"}
logger = logging.getLogger(__name__)


def _deterministic(options: Mapping[str, Any]) -> bool:
    """Frozen-only fusion (logistic member heads, grid weights) gives the same model for every seed."""
    return options.get("finetune") == []


DETERMINISTIC = _deterministic  # read by train_head.seeds (see transferlab.heads)


@dataclass(frozen=True)
class MemberHead:
    """One member head of a fusion: which blocks it reads, its kind, the trained head.

    Attributes:
        key: its name in metrics and its folder under ``members/``.
        blocks: indices of the stack's blocks (members) it reads, in stack order.
        kind: ``logistic`` or ``finetune``.
        head: the trained head (its description's blocks are the sliced ones, offsets from 0).
    """

    key: str
    blocks: tuple[int, ...]
    kind: str
    head: base.TrainedHead


@dataclass(frozen=True)
class FusionHead:
    """A trained fusion head: member heads and the combiner weights (one per member head)."""

    description: base.HeadDescription
    members: tuple[MemberHead, ...]
    weights: np.ndarray  # (M,), >= 0, sums to 1

    def member_probabilities(self, split: files.Features) -> dict[str, np.ndarray]:
        """Each member head's class probabilities (N, C) for the rows of ``split``, by key."""
        return {
            member.key: base.predict_split(member.head, member_split(split, member.blocks, kind=member.kind))
            for member in self.members
        }

    def predict_split(self, split: files.Features) -> np.ndarray:
        """The fused class probabilities (N, C) for the rows of ``split`` (taps for fine-tuned members)."""
        return self.combine_members(self.member_probabilities(split))

    def combine_members(self, probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
        """The fused probabilities from :meth:`member_probabilities`' result (no member runs twice)."""
        return combine([probabilities[member.key] for member in self.members], self.weights)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Fused probabilities (N, C) from raw features (N, D); only when no member is fine-tuned."""
        tuned = [member.key for member in self.members if member.kind != "logistic"]
        if tuned:
            raise ValueError(
                f"the fusion head's member(s) {', '.join(tuned)} classify tap activations, not features; "
                "pass a split with base.predict_split"
            )
        parts = [
            member.head.predict_proba(np.asarray(features)[:, _columns(self.description.blocks, member.blocks)])
            for member in self.members
        ]
        return combine(parts, self.weights)

    def save(self, folder: Path) -> None:
        """Writes head.json and one saved head per member under ``members/<key>/``."""
        for member in self.members:
            target = folder / MEMBERS_FOLDER / member.key
            target.mkdir(parents=True)
            member.head.save(target)
        self.description.write(folder)


# ---------------------------------------------------------------- the combiner


def combine(probabilities: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``softmax(sum_m w_m log max(p_m, floor))``: the weighted geometric mean of the members, renormalized.

    Args:
        probabilities: one (N, C) array per member head.
        weights: one weight per member head.
    """
    logits = sum(
        float(weight) * np.log(np.maximum(np.asarray(part, dtype=np.float64), PROBABILITY_FLOOR))
        for weight, part in zip(weights, probabilities)
    )
    return base.softmax(np.asarray(logits))


def weight_grid(members: int, step: float) -> np.ndarray:
    """Every weight vector of ``members`` entries, multiples of ``step``, >= 0, summing to 1: (G, M)."""
    parts = int(round(1.0 / step))
    if abs(parts * step - 1.0) > 1e-9:
        raise ValueError(f"train_head.fusion.weight_step must divide 1 into equal steps, got {step}")
    if members == 1:
        return np.ones((1, 1))
    count = _compositions(parts, members)
    if count > MAX_GRID_POINTS:
        raise ValueError(
            f"{members} member heads on a weight grid of step {step} make {count} weight vectors; raise "
            "train_head.fusion.weight_step or set train_head.fusion.frozen: joint (one head for the frozen members)"
        )
    # Stars and bars: choose where the M-1 bars sit among parts + M - 1 places.
    rows = []
    for bars in itertools.combinations(range(parts + members - 1), members - 1):
        edges = (-1, *bars, parts + members - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(members)])
    return np.asarray(rows, dtype=np.float64) / parts


def _compositions(parts: int, members: int) -> int:
    from math import comb

    return comb(parts + members - 1, members - 1)


def choose_weights(
    probabilities: Sequence[np.ndarray], labels: np.ndarray, *, step: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """The grid weights with the highest validation log-likelihood; ties go to the most equal weights.

    Args:
        probabilities: each member head's validation probabilities, (N, C) each.
        labels: the validation labels, (N,).
        step: the grid step (params ``train_head.fusion.weight_step``).

    Returns:
        The weights (M,), and a report: the fused and equal-weight validation log loss, grid size.
    """
    members = len(probabilities)
    equal = np.full(members, 1.0 / members)
    labels = np.asarray(labels)
    if len(labels) == 0:
        logger.warning("no validation rows: the fusion weights stay equal (set split.val_fraction > 0 to choose them)")
        return equal, {"grid_points": 0, "val_log_loss": None, "equal_weights_val_log_loss": None}
    grid = weight_grid(members, step)
    logs = np.stack([np.log(np.maximum(np.asarray(p, dtype=np.float64), PROBABILITY_FLOOR)) for p in probabilities])
    losses = np.concatenate([_losses(grid[start : start + 512], logs, labels) for start in range(0, len(grid), 512)])
    best = losses.min()
    tied = np.flatnonzero(losses <= best + TIE_TOLERANCE)
    chosen = tied[np.argmin(((grid[tied] - equal) ** 2).sum(axis=1))]
    report = {
        "grid_points": int(len(grid)),
        "val_log_loss": float(losses[chosen]),
        "equal_weights_val_log_loss": float(_losses(equal[None, :], logs, labels)[0]),
    }
    return grid[chosen], report


def _losses(weights: np.ndarray, logs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean validation cross-entropy of the fused probabilities for each weight row: (G,)."""
    logits = np.einsum("gm,mnc->gnc", weights, logs)
    logits = logits - logits.max(axis=2, keepdims=True)
    normalizer = np.log(np.exp(logits).sum(axis=2))
    picked = logits[:, np.arange(len(labels)), labels]
    return (normalizer - picked).mean(axis=1)


# ---------------------------------------------------------------- member splits


def member_split(split: files.Features, blocks: Sequence[int], *, kind: str = "logistic") -> files.Features:
    """``split`` restricted to the columns of ``blocks`` (offsets from 0), with that member's taps for finetune."""
    chosen, offset = [], 0
    for index in blocks:
        block = split.blocks[index]
        chosen.append(dataclasses.replace(block, offset=offset))
        offset += block.width
    tapped = member_taps(split, split.blocks[blocks[0]]) if kind == "finetune" else None
    taps = {} if tapped is None else {split.blocks[blocks[0]].name or split.blocks[blocks[0]].spec: tapped}
    return dataclasses.replace(
        split,
        features=split.features[:, _columns(split.blocks, blocks)],
        blocks=tuple(chosen),
        engine=[split.block_engines[index] for index in blocks],
        taps=taps,
    )


def member_taps(split: files.Features, block: files.Block) -> files.Taps | None:
    """The tap activations of one member of ``split`` (None when extract_taps wrote none for it)."""
    return dict(split.taps or {}).get(block.name or block.spec)


def _columns(blocks: Sequence[files.Block], indices: Sequence[int]) -> np.ndarray:
    return np.concatenate([np.arange(blocks[i].offset, blocks[i].offset + blocks[i].width) for i in indices])


def metric_key(name: str) -> str:
    """A member's name as a metrics key and folder name: letters, digits, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "member"


def frozen_grouping(plan: fusion_plan.Plan) -> str:
    """``frozen: auto``: ``separate`` (a logistic head per frozen member) if a member is fine-tuned, else ``joint``."""
    return "separate" if plan.layers else "joint"


def _groups(
    blocks: Sequence[files.Block], plan: fusion_plan.Plan, frozen: str
) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, block indices, kind) per member head: fine-tuned members, then the frozen ones."""
    names = [block.name or block.spec for block in blocks]
    groups = [(metric_key(name), (index,), "finetune") for index, name in enumerate(names) if name in plan.layers]
    still = tuple(index for index, name in enumerate(names) if name not in plan.layers)
    if frozen == "joint" and len(still) > 1:
        groups.append((JOINT_KEY, still, "logistic"))
    else:
        groups.extend((metric_key(names[index]), (index,), "logistic") for index in still)
    keys = [key for key, _, _ in groups]
    return [(key if keys.count(key) == 1 else f"{key}_{i}", b, k) for i, (key, b, k) in enumerate(groups)]


# ---------------------------------------------------------------- training


def train(
    *,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    finetune: str | Sequence[str],
    from_layer: str | Mapping[str, str],
    frozen: str,
    weight_step: float,
    logistic_options: Mapping[str, Any],
    finetune_options: Mapping[str, Any],
    log_step: base.StepLogger | None = None,
) -> base.TrainOutcome:
    """Trains one head per member (or group), then the combiner weights on validation.

    Args:
        train: training features (augmented views included), with taps for fine-tuned members.
        val: validation features: the member heads' own selection and the combiner weights.
        seed: seeds every member head.
        class_weight: ``none`` or ``balanced``, for every member head.
        finetune: params ``train_head.fusion.finetune`` (``auto`` or member names).
        from_layer: params ``train_head.fusion.from_layer`` (``auto`` or ``{member: layer}``).
        frozen: ``joint`` (one logistic head on the frozen members' joined columns), ``separate``
            (one each) or ``auto`` (:func:`frozen_grouping`); the settings record the one used.
        weight_step: the combiner's grid step.
        logistic_options: the ``train_head.logistic`` settings.
        finetune_options: the ``train_head.finetune`` settings, without ``from_layer``.
        log_step: the per-step curves of the first member head (dvclive).

    Returns:
        The fusion head, and a report: per member head its kind, members, weight and validation
        figures; the weights; the combiner's validation log loss against equal weights.
    """
    base.check_trainable(train, val)
    if frozen not in FROZEN:
        raise ValueError(f"Unsupported train_head.fusion.frozen '{frozen}'; choose one of: {', '.join(FROZEN)}")
    plan = fusion_plan.finetune_plan(
        [(block.name or block.spec, block.spec) for block in train.blocks], finetune=finetune, from_layer=from_layer
    )
    for name, reason in plan.frozen.items():
        logger.info("fusion: %s gets a frozen logistic head (%s)", name, reason)
    if frozen == "auto":
        frozen = frozen_grouping(plan)
        logger.info("fusion: frozen auto is %s (%s member is fine-tuned)", frozen, "a" if plan.layers else "no")
    members = []
    for number, (key, blocks, kind) in enumerate(_groups(train.blocks, plan, frozen)):
        members.append(
            _train_member(
                key, blocks, kind, train=train, val=val, seed=seed, class_weight=class_weight, plan=plan,
                logistic_options=logistic_options, finetune_options=finetune_options,
                log_step=log_step if number == 0 else None,
            )
        )  # fmt: skip
    val_parts = [base.predict_split(m.head, member_split(val, m.blocks, kind=m.kind)) for m in members]
    weights, combiner = choose_weights(val_parts, val.labels, step=weight_step)
    logger.info("fusion weights (chosen on validation): %s", _weights_text(members, weights))
    settings = {
        "finetune": finetune if isinstance(finetune, str) else list(finetune),
        "from_layer": from_layer if isinstance(from_layer, str) else dict(from_layer),
        "frozen": frozen,
        "weight_step": weight_step,
        "class_weight": class_weight,
        "seed": seed,
        "combiner": "softmax(sum_m w_m log max(p_m, 1e-12)), weights on a simplex grid by validation log-likelihood",
        "members": [_member_settings(member, float(weight), train.blocks) for member, weight in zip(members, weights)],
    }
    head = FusionHead(
        description=base.description_for(NAME, train, settings, {"members": MEMBERS_FOLDER}),
        members=tuple(members),
        weights=np.asarray(weights, dtype=np.float64),
    )
    report = {"weights": {m.key: float(w) for m, w in zip(members, weights)}, "combiner": combiner, "members": {}}
    for member, part in zip(members, val_parts):
        report["members"][member.key] = {"head": member.kind, **_val_figures(part, val.labels)}
    return base.TrainOutcome(head=head, report=report)


def _train_member(
    key: str,
    blocks: tuple[int, ...],
    kind: str,
    *,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    plan: fusion_plan.Plan,
    logistic_options: Mapping[str, Any],
    finetune_options: Mapping[str, Any],
    log_step: base.StepLogger | None,
) -> MemberHead:
    names = [train.blocks[index].name or train.blocks[index].spec for index in blocks]
    member_train = member_split(train, blocks, kind=kind)
    member_val = member_split(val, blocks, kind=kind)
    if kind == "finetune":
        if not member_train.taps or not member_val.taps:
            raise ValueError(
                f"the fusion head fine-tunes {names[0]}, but {train.source} has no tap activations for it; "
                "re-run the taps stage (dvc repro), or leave it frozen: train_head.fusion.finetune: []"
            )
        options = {**finetune_options, "from_layer": plan.layers[names[0]]}
    else:
        options = dict(logistic_options)
    logger.info("fusion: training the %s head of %s", kind, " + ".join(names))
    outcome = importlib.import_module(MEMBER_MODULES[kind]).train(
        train=member_train, val=member_val, seed=seed, class_weight=class_weight, log_step=log_step, **options
    )
    return MemberHead(key=key, blocks=blocks, kind=kind, head=outcome.head)


def _member_settings(member: MemberHead, weight: float, blocks: Sequence[files.Block]) -> dict[str, Any]:
    return {
        "key": member.key,
        "head": member.kind,
        "blocks": list(member.blocks),
        "names": [blocks[index].name or blocks[index].spec for index in member.blocks],
        "weight": weight,
        "folder": f"{MEMBERS_FOLDER}/{member.key}",
    }


def _val_figures(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if len(labels) == 0:
        return {}
    figures = base.accuracy_and_loss(probabilities, labels)
    return {"val_accuracy": figures["accuracy"], "val_loss": figures["loss"]}


def _weights_text(members: Sequence[MemberHead], weights: np.ndarray) -> str:
    return ", ".join(f"{member.key} {weight:.2f}" for member, weight in zip(members, weights))


# ---------------------------------------------------------------- loading


def load(folder: Path, description: base.HeadDescription) -> FusionHead:
    """Loads a head written by :meth:`FusionHead.save`."""
    entries = description.settings.get("members")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{folder}/head.json lists no fusion members; re-run train_head")
    members = []
    for entry in entries:
        member_folder = Path(folder) / MEMBERS_FOLDER / str(entry["key"])
        if entry.get("head") not in MEMBER_MODULES or not member_folder.is_dir():
            raise ValueError(f"{member_folder} is not a member head head.json lists; re-run train_head")
        head = importlib.import_module(MEMBER_MODULES[entry["head"]]).load(
            member_folder, base.read_description(member_folder)
        )
        blocks = tuple(int(index) for index in entry["blocks"])
        if head.description.head != entry["head"] or len(head.description.blocks) != len(blocks):
            raise ValueError(
                f"{member_folder} does not hold the {entry['head']} head head.json lists; re-run train_head"
            )
        members.append(MemberHead(key=str(entry["key"]), blocks=blocks, kind=str(entry["head"]), head=head))
    weights = np.asarray([float(entry["weight"]) for entry in entries], dtype=np.float64)
    return FusionHead(description=description, members=tuple(members), weights=weights)
