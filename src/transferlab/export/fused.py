"""Export of a fused model (the ``fusion`` head): every member's backbone file, its head, the combiner.

The ``fused`` layout (run by :class:`transferlab.export.predict.FusedRunner`, so what the export
stage checks is what ``transferlab predict`` runs):

- only the member heads with a weight above 0: a weight-0 head adds exactly 0 to the combiner's
  sum, so leaving it (and the backbone only it reads) out changes no prediction and saves its
  backbone run per image; the manifest names them under ``fusion.left_out``;
- ``backbones/NN_name.tflite`` for each *frozen* member (a member read by a logistic member head):
  TFLite files as the features were computed, Keras members converted, exactly as the ``stack``
  layout writes them (:func:`transferlab.export.build._write_stack`);
- ``fused/<key>.tflite`` for each *fine-tuned* member head: its frozen bottom and trained top as one
  model from uint8 pixels (resized the pipeline's way) to probabilities, converted from
  :func:`transferlab.heads.finetune.full_model`, as the ``classifier`` layout converts a finetune head;
- ``head/``: models/head (the member heads under ``head/members/<key>/``; the logistic ones run
  from there, numpy only);
- the manifest's ``fusion`` entry: per member head its key, kind, blocks (indices into
  ``members``), weight, folder and, for a fine-tuned one, its file and input size; and the
  combiner rule (:func:`transferlab.heads.fusion.combine`, the one the fusion head itself runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferlab.backbones.stack import Member
from transferlab.core import atomic
from transferlab.export import build, predict
from transferlab.features import files
from transferlab.heads import base, fusion

FUSED_FOLDER = "fused"
logger = logging.getLogger(__name__)


def write_fused(
    folder: Path,
    *,
    members: Sequence[Member],
    head: fusion.FusionHead,
    head_folder: Path,
    seed: int,
    max_image_pixels: int,
    block_engines: Sequence[str | None] = (),
    tflite: bool = True,
    keras: bool = False,
    **stack_options: Any,
) -> dict[str, Any]:
    """Writes a fused model's export into ``folder`` (an empty directory); returns its manifest.

    Args:
        folder: where to write (the stage passes a temporary directory, swapped in on success).
        members: the stack, consistent with ``head`` (:func:`transferlab.export.build.check_consistency`).
        head: the trained fusion head.
        head_folder: models/head, copied into ``folder/head``.
        seed: ``base.seed`` (rebuilds random-init backbones exactly as extract_features did).
        max_image_pixels: the decompression-bomb limit the model was trained with, for the manifest.
        block_engines: the engine each block's features came from (a TFLite member is written as
            the rewrite that engine ran).
        tflite: params ``export.tflite``; a fused model is always TFLite files (as a stack with a
            ``tflite:`` member is), so it changes nothing.
        keras: params ``export.keras``; no ``model.keras`` for a fused model (a log line says so).
        stack_options: passed on to the ``stack`` layout's writer for the frozen members (the
            conversion folder to reuse, when the stage has one).
    """
    if any(member.random_init for member in members):
        logger.warning("random-init backbone weights: this export classifies nothing real")
    if keras or not tflite:
        logger.info("export: a fused model is exported as TFLite files only (export.keras/export.tflite ignored)")
    used = [(entry, weight) for entry, weight in zip(head.members, head.weights) if weight > 0]
    left_out = [entry.key for entry, weight in zip(head.members, head.weights) if weight <= 0]
    if left_out:
        logger.info(
            "export: member head(s) %s left out (weight 0 on validation: they change no prediction), "
            "so predict runs %d of %d backbones",
            ", ".join(left_out),
            len({index for entry, _ in used for index in entry.blocks}),
            len(members),
        )
    frozen = sorted({index for entry, _ in used if entry.kind == "logistic" for index in entry.blocks})
    recorded = list(block_engines) or [None] * len(members)
    member_files: list[dict[str, Any]] = [{} for _ in members]
    if frozen:
        _, written = build._write_stack(
            folder,
            members=[members[index] for index in frozen],
            seed=seed,
            block_engines=[recorded[index] for index in frozen],
            **stack_options,
        )
        for index, entry in zip(frozen, written):
            member_files[index] = entry
    heads = [_head_entry(folder, entry, weight, head_folder) for entry, weight in used]
    class_names = build.copy_head_and_labels(head, head_folder, folder)
    manifest = {
        "format": predict.EXPORT_FORMAT,
        "version": predict.EXPORT_VERSION,
        "layout": "fused",
        "keras_model": "",
        "tflite_model": "",
        "inputs": [],
        "backbone": files.stack_name(head.description.blocks),
        "class_names": class_names,
        "labels": predict.LABELS_FILE,
        "resize": build.RESIZE_RULE,
        "max_image_pixels": int(max_image_pixels),
        "members": [
            {**build._member_entry(member, block), **written}
            for member, block, written in zip(members, head.description.blocks, member_files)
        ],
        "fusion": {"heads": heads, "left_out": left_out, "combiner": head.description.settings.get("combiner", "")},
        "head": {"type": fusion.NAME, "folder": predict.HEAD_FOLDER, "settings": head.description.settings},
        "files": build._file_table(folder),
    }
    atomic.write_json(folder / predict.MANIFEST_FILE, manifest)
    return manifest


def _head_entry(folder: Path, entry: fusion.MemberHead, weight: float, head_folder: Path) -> dict[str, Any]:
    """One member head in the manifest; a fine-tuned one is converted to ``fused/<key>.tflite`` here."""
    described = {
        "key": entry.key,
        "head": entry.kind,
        "blocks": list(entry.blocks),
        "weight": float(weight),
        "folder": f"{predict.HEAD_FOLDER}/{fusion.MEMBERS_FOLDER}/{entry.key}",
    }
    if entry.kind == "logistic":
        return described
    from transferlab.features import engines

    model = build._pixel_core(entry.head, Path(head_folder) / fusion.MEMBERS_FOLDER / entry.key)
    (folder / FUSED_FOLDER).mkdir(exist_ok=True)
    relative = f"{FUSED_FOLDER}/{entry.key}.tflite"
    engines.convert_to_tflite(model, folder / relative)
    logger.info("export: converted the fine-tuned %s head to TFLite", entry.key)
    return {**described, "file": relative, "image_size": int(model.inputs[0].shape[1])}


def is_fused(head: base.TrainedHead) -> bool:
    """True for a head that exports as the ``fused`` layout."""
    return head.description.head == fusion.NAME
