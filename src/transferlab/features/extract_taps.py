"""extract_taps: tap activations of the stack members a head fine-tunes, in a stage of their own.

The heads that fine-tune a Keras backbone (``finetune``; ``fusion`` for the members it
fine-tunes) train on *tap activations*: the input of the first layer they train, computed once
per view by the frozen bottom (see :mod:`transferlab.features.tap_jobs`). They were made by
extract_features until issue 15; that stage then had the head's params among its own, so
switching ``train_head.head`` between logistic and dense re-ran it. Here they have a stage
whose params are only what taps depend on, and which does nothing (and imports no TensorFlow)
when no head needs taps: it writes the same small ``taps.json`` every time, so DVC sees an
unchanged output.

Which members are tapped (:func:`plan_taps`):

- ``finetune``: one Keras member. In a stack that holds several, the first (stack order)
  whose registry entry names a default cut point (``finetune_from``) when
  ``train_head.finetune.from_layer`` is ``auto``, else the first Keras member. TFLite members
  are never tapped (a ``.tflite`` file cannot be cut and trained); the finetune head trains on
  its member alone, and the ``fusion`` head is the way to combine it with the others.
- ``fusion``: the members :func:`transferlab.backbones.fusion_plan.finetune_plan` fine-tunes
  (params ``train_head.fusion.finetune`` and ``from_layer``), the rule the fusion head itself
  follows; a member it leaves frozen gets a log line saying why.
- any other head: none.

Taps are cached in the embedding cache (one namespace per member, engine and layer), so a
warm rerun only exports them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import fusion_plan, registry, taps
from transferlab.backbones.stack import Member
from transferlab.features import decode, extract_features, files, tap_jobs

LOGGER = logging.getLogger(__name__)
TAP_HEADS = ("finetune", "fusion")  # the heads that train on tap activations


@dataclass(frozen=True)
class TapPlan:
    """One member to tap, and the first layer its head trains (``auto``: the registry's default)."""

    member: Member
    layer: str


def plan_taps(
    members: Sequence[Member],
    *,
    head: str,
    finetune_from_layer: str = taps.AUTO,
    fusion_finetune: str | Sequence[str] = taps.AUTO,
    fusion_from_layer: str | Mapping[str, str] = taps.AUTO,
) -> list[TapPlan]:
    """The members whose taps ``head`` trains on, in stack order (see the module docstring for the rules).

    Args:
        members: the stack.
        head: ``train_head.head``.
        finetune_from_layer: ``train_head.finetune.from_layer``.
        fusion_finetune: ``train_head.fusion.finetune``: ``auto`` or member names.
        fusion_from_layer: ``train_head.fusion.from_layer``: ``auto`` or {member name: layer}.

    Raises:
        ValueError: ``finetune`` on a stack without a Keras member, or a fusion param naming a
            member that is not in the stack.
    """
    if head == "finetune":
        return [TapPlan(_finetune_member(members, finetune_from_layer), finetune_from_layer)]
    if head == "fusion":
        return _fusion_plan(members, fusion_finetune, fusion_from_layer)
    return []


def _has_default_cut(member: Member) -> bool:
    return member.kind == "keras" and bool(registry.get(member.name).finetune_from)


def _finetune_member(members: Sequence[Member], from_layer: str) -> Member:
    keras_members = [member for member in members if member.kind == "keras"]
    if not keras_members:
        raise ValueError(
            "train_head.head=finetune fine-tunes a Keras registry backbone, but extract_features.backbone holds "
            f"only TFLite files ({', '.join(member.name for member in members)}); add a registry backbone "
            "(`transferlab backbones` lists them) or choose another head"
        )
    if from_layer.strip() == taps.AUTO:
        keras_members = [member for member in keras_members if _has_default_cut(member)] or keras_members
    chosen = keras_members[0]
    if len(members) > 1:
        LOGGER.info(
            "finetune head on the stack %s: fine-tuning %s alone (the first Keras member%s); "
            "train_head.head=fusion combines it with the others",
            "+".join(member.name for member in members),
            chosen.name,
            " with a default cut point" if from_layer.strip() == taps.AUTO else "",
        )
    return chosen


def _fusion_plan(
    members: Sequence[Member], finetune: str | Sequence[str], from_layer: str | Mapping[str, str]
) -> list[TapPlan]:
    plan = fusion_plan.finetune_plan(
        [(member.name, member.spec) for member in members], finetune=finetune, from_layer=from_layer
    )
    for name, why in plan.frozen.items():
        LOGGER.info("fusion: %s is not fine-tuned (%s): no taps", name, why)
    return [TapPlan(member, plan.layers[member.name]) for member in members if member.name in plan.layers]


def extract_taps(
    *,
    plans: Sequence[TapPlan],
    rows_by_split: dict[str, list[dict]],
    images_directory: Path,
    cache_directory: Path | None,
    engine: str,
    batch_size: int,
    threads: int,
    seed: int,
    max_image_pixels: int,
    directory: Path,
) -> dict[str, Any]:
    """Writes the taps of every planned member into ``directory`` (data/taps/); returns the report.

    With no plan it only writes the index (``{"members": {}}``, always the same bytes) and
    imports nothing heavy.

    Args:
        plans: the members and layers (:func:`plan_taps`).
        rows_by_split: rows (path, label, sha256, recipe) of train (with augmented views), val,
            test, in the features files' order.
        images_directory: where the rows' paths are relative to (data/raw/images).
        cache_directory: the embedding cache folder, or None to run without it (taps then go
            through a temporary one).
        engine: the ``extract_features.engine`` param: auto, keras or tflite.
        batch_size: images per inference batch.
        threads: decoding threads.
        seed: seeds random-init backbones (as extract_features does).
        max_image_pixels: decompression-bomb limit when decoding.
        directory: the folder to fill (the caller makes it atomic).
    """
    started = time.perf_counter()
    if not plans:
        files.write_taps_index(directory, {})
        return {"members": {}, "note": "no head trains on tap activations", "seconds": 0.0}
    items = extract_features.unique_items(rows_by_split)
    if not items:
        raise ValueError("the splits hold no images; check data/splits and the split params")

    def render_one(item: decode.Item, size: int) -> np.ndarray:
        return decode.render(item, images_directory=images_directory, size=size, max_image_pixels=max_image_pixels)

    def fill(jobs: Sequence[tap_jobs.TapJob]) -> None:
        for size in sorted({job.size for job in jobs}):  # each image decoded once per input size
            group = [job for job in jobs if job.size == size]
            decode.fill_misses(group, items, size=size, render_one=render_one, batch_size=batch_size, threads=threads)

    requested_cache, cache_directory = cache_directory, extract_features.usable_cache_directory(cache_directory)
    reports, folders = {}, {}
    with (
        extract_features.conversion_directory(cache_directory) as converted,
        tap_jobs.tap_cache_directory(cache_directory) as tap_cache,
    ):
        jobs = [
            tap_jobs.open_tap_job(
                plan.member,
                plan.layer,
                items,
                engine=engine,
                converted=converted,
                cache_directory=tap_cache,
                build_backbone=extract_features.backbone_builder(plan.member, seed),
                render_one=render_one,
            )
            for plan in plans
        ]
        fill(jobs)
        for job in jobs:
            folders[job.member.name] = files.tap_folder_name(job.member.name)
            report = tap_jobs.write_taps(
                job,
                directory / folders[job.member.name],
                rows_by_split,
                converted=converted,
                fill=lambda lost: fill([lost]),
            )
            reports[job.member.name] = {**report, "cache_bytes": report["cache_bytes"] if cache_directory else 0}
    files.write_taps_index(directory, folders)
    summary: dict[str, Any] = {"members": reports, "seconds": round(time.perf_counter() - started, 3)}
    summary["cache"] = str(cache_directory) if cache_directory is not None else "disabled"
    if requested_cache is not None and cache_directory is None:
        summary["cache"] = f"unusable: {requested_cache}"
    return summary


def log_report(report: Mapping[str, Any]) -> None:
    """Logs one line per tapped member (or that there were none)."""
    if not report["members"]:
        LOGGER.info("no head trains on tap activations: nothing to extract")
    for name, member in report["members"].items():
        LOGGER.info(
            "%s taps at %s %s: %d computed, %d cache hits, %.1f MB in files",
            name,
            member["layer"],
            member["shape"],
            member["computed"],
            member["cache_hits"],
            member["file_bytes"] / 1e6,
        )
