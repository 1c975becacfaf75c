"""export: the trained classifier as files that run without the pipeline, and the export report.

:mod:`transferlab.export.check` then checks the written folder against evaluate's predictions.

What is written (the folder's layouts and formats are described in :mod:`transferlab.export.predict`,
which runs them):

- Every backbone a Keras registry entry: ``model.keras``, one Keras model from uint8 RGB pixels
  already resized to each backbone input size (one input ``pixels_S``, ``(None, S, S, 3)``, per
  size S) to class probabilities. Inside: a cast to float, the backbone(s) with their
  ``preprocess_input``, the head (logistic: one softmax Dense whose weights fold in the per-block
  standardizer; dense: the trained head.keras, its standardizer included). A head that is a model
  of the pixels itself (``scratch``: the CNN; ``finetune``: frozen bottom + trained top, from
  :func:`transferlab.heads.finetune.full_model`) takes the backbones' place. Only built-in layers
  and Keras ops, no Lambda, so ``keras.saving.load_model(path, safe_mode=True)`` loads it with
  plain Keras. With ``export.tflite``: ``model.tflite``, the same network converted with
  ``TFLiteConverter.from_keras_model``.
- The resize is not inside either model: every format is fed the pipeline's own resize
  (:func:`transferlab.export.predict.resize_all`, which is :func:`transferlab.data.augment.render_view`),
  so the pixels are identical by construction, upscaling or downscaling, any aspect ratio. The
  earlier in-graph ``Resizing(bilinear, antialias=True)`` was within 1 grey level of Pillow but
  not equal to it: on 100x100 photos upscaled to 224 px it flipped 3 of 200 test predictions
  (issue 14). Pillow's resize rounds to uint8 between its horizontal and vertical passes with
  fixed-point weights, which no built-in Keras layer reproduces exactly for every input size.
- A stack with a ``tflite:`` backbone and a head on embeddings (no Keras model can hold a TFLite
  file): ``backbones/NN_name.tflite`` for each member (TFLite files copied, Keras members
  converted), the head, and the manifest with each file's sha256, input size and dtype, resize
  rule and block offsets.
- A head on embeddings (logistic, dense) with ``export.keras`` off (the default) and
  ``export.tflite`` on: the same ``stack`` layout for Keras backbones too (:func:`choose_layout`),
  each backbone file taken from the conversion cache that extract_features filled (the exact
  bytes it embedded with, sha256-checked: :func:`reused_conversion`), so a head change re-exports
  without TensorFlow, without tracing or converting the backbone again. Measured on the shared
  machine (MobileNetV2, logistic head, 200 images checked): the export stage went from 35-120 s
  (classifier layout: TensorFlow import, Keras build, save, conversion, Keras check) to a few
  seconds (README, "Speed").
- Always: ``labels.txt`` (one class per line, index order), ``head/`` (a copy of models/head),
  ``manifest.json``, which also records ``max_image_pixels`` (params ``download.max_image_pixels``),
  so that ``transferlab predict`` opens images with the limit the model was trained with.

A format that fails the check against evaluate is removed again by :func:`drop_formats` (its file
and its manifest entries), so the folder holds only formats that reproduce evaluate.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import registry
from transferlab.backbones.stack import Member
from transferlab.core import atomic
from transferlab.data import images
from transferlab.export import predict
from transferlab.features import files
from transferlab.heads import base, seeds

FEATURE_HEADS = ("logistic", "dense")  # classify the backbones' pooled embeddings
PIXEL_HEADS = ("finetune", "scratch")  # are (with their own backbone part) one Keras model of the pixels
FUSED_HEADS = ("fusion",)  # one head per member, combined: the fused layout (transferlab.export.fused)
EXPORTABLE_HEADS = FEATURE_HEADS + PIXEL_HEADS + FUSED_HEADS
PROVENANCE_MEMBER_KEYS = ("name", "spec", "kind", "image_size", "alpha", "weights", "random_init", "width")
RESIZE_RULE = {
    "rule": "pillow-bilinear",
    "detail": (
        "decode with EXIF orientation to 8-bit RGB (transferlab.data.images.open_rgb), then resize the whole "
        "image to SxS with PIL.Image.resize(..., Image.BILINEAR), no crop (transferlab.data.augment.render_view "
        "with the original recipe); every format (model.keras, model.tflite, backbones/*.tflite) takes these "
        "uint8 pixels, one input pixels_S per size S, and resizes nothing itself"
    ),
}
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- inputs


def check_consistency(*, members: Sequence[Member], head: base.TrainedHead, test: files.Features) -> None:
    """Raises ``ValueError`` unless params, head and features describe the same backbones.

    Args:
        members: the stack resolved from the current ``extract_features`` params.
        head: the trained head (models/head).
        test: the test features (data/features/test.npz).
    """
    description = head.description
    if description.head not in EXPORTABLE_HEADS:
        raise ValueError(
            f"export supports the {', '.join(EXPORTABLE_HEADS)} heads; models/head is a '{description.head}' head"
        )
    description.check_features(test)
    trained = [(block.spec, block.weights) for block in description.blocks]
    current = [(member.spec, member.weights_identity) for member in members]
    if trained != current:
        raise ValueError(
            f"the head was trained on {_listing(trained)}, but the extract_features params now give "
            f"{_listing(current)}; run `dvc repro` so that features, head and evaluate follow the params"
        )


def _listing(pairs: Sequence[tuple[str, str]]) -> str:
    return " + ".join(f"{spec} (weights {weights})" for spec, weights in pairs)


# ---------------------------------------------------------------- building the models


def fold_logistic(
    *, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The Dense kernel (D, C) and bias (C,) equal to standardize-then-logistic, in float64.

    ``((x - mean) / scale) @ coef.T + intercept == x @ kernel + bias``. Folding, instead of a
    Normalization layer, keeps tiny scales exact (Normalization divides by at least 1e-7).
    """
    weights = np.asarray(coef, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
    bias = np.asarray(intercept, dtype=np.float64) - weights @ np.asarray(mean, dtype=np.float64)
    return weights.T, bias


def head_model(head: base.TrainedHead) -> Any:
    """The head as a Keras model from raw (unstandardized) features to probabilities."""
    import keras

    name = head.description.head
    if name == "dense":
        return head.model
    if name != "logistic":
        raise ValueError(f"export supports the {', '.join(EXPORTABLE_HEADS)} heads, not '{name}'")
    kernel, bias = fold_logistic(
        coef=head.coef, intercept=head.intercept, mean=head.standardizer.mean_, scale=head.standardizer.scale_
    )
    features = keras.Input(shape=(kernel.shape[0],), name="features")
    layer = keras.layers.Dense(kernel.shape[1], activation="softmax", name="logistic")
    probabilities = layer(features)
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(features, probabilities, name="logistic_head")


def build_classifier(*, members: Sequence[Member], head: base.TrainedHead, head_folder: Path, seed: int) -> Any:
    """``model.keras``: one uint8 input ``pixels_S`` per input size S (pixels already resized) -> probabilities.

    ``model.tflite`` is converted from this same model.

    Args:
        members: the stack (Keras members only, unless the head is a pixel head).
        head: the trained head.
        head_folder: where the head was loaded from (the finetune head rebuilds its model there).
        seed: ``base.seed`` (rebuilds random-init backbones exactly as extract_features did).
    """
    if head.description.head in PIXEL_HEADS:
        return _pixel_core(head, head_folder)
    import keras

    sizes = sorted({member.image_size for member in members})
    inputs = {size: keras.Input(shape=(size, size, 3), dtype="uint8", name=f"pixels_{size}") for size in sizes}
    pixels = {size: keras.ops.cast(tensor, "float32") for size, tensor in inputs.items()}
    embeddings = []
    for member in members:
        backbone = registry.build(
            member.name, alpha=member.alpha, weights=member.weights, image_size=member.image_size, seed=seed
        )
        backbone.trainable = False
        embeddings.append(backbone(pixels[member.image_size], training=False))
    joined = embeddings[0] if len(embeddings) == 1 else keras.layers.Concatenate(name="stack_features")(embeddings)
    probabilities = head_model(head)(joined)
    listed = [inputs[size] for size in sizes]
    # One input is given bare, so that plain Keras takes a bare array without a structure warning.
    return keras.Model(listed[0] if len(listed) == 1 else listed, probabilities, name="transferlab_classifier")


def _pixel_core(head: base.TrainedHead, head_folder: Path) -> Any:
    """A pixel head's own model (scratch: the CNN; finetune: frozen bottom + trained top) on uint8 pixels."""
    import keras

    if head.description.head == "finetune":
        from transferlab.heads import finetune

        model = finetune.full_model(head_folder)
    else:
        model = head.model
    size = int(model.input_shape[1])
    pixels = keras.Input(shape=(size, size, 3), dtype="uint8", name=f"pixels_{size}")
    wanted = model.inputs[0].dtype
    fed = pixels if wanted == "uint8" else keras.ops.cast(pixels, wanted)
    return keras.Model(pixels, model(fed, training=False), name="transferlab_classifier")


# ---------------------------------------------------------------- writing the folder


def choose_layout(*, members: Sequence[Member], head: base.TrainedHead, tflite: bool, keras: bool) -> str:
    """``classifier`` (model.keras and/or model.tflite) or ``stack`` (backbones/*.tflite + the head).

    A pixel head is one Keras model of the pixels: ``classifier``. A stack with a ``tflite:``
    member cannot be one Keras model: ``stack``. A head on Keras backbones' embeddings is a
    ``stack`` when only TFLite is wanted (``export.tflite`` on, ``export.keras`` off): its backbone
    files come from the conversion cache, so the export needs no TensorFlow. ``model.keras`` (with
    ``export.keras``, or as the one format when ``export.tflite`` is off) makes it a ``classifier``.

    Args:
        members: the stack.
        head: the trained head.
        tflite: params ``export.tflite``.
        keras: params ``export.keras``.
    """
    if head.description.head in PIXEL_HEADS:
        return "classifier"
    if any(member.kind != "keras" for member in members):
        return "stack"
    return "stack" if tflite and not keras else "classifier"


def write_export(
    folder: Path,
    *,
    members: Sequence[Member],
    head: base.TrainedHead,
    head_folder: Path,
    seed: int,
    tflite: bool,
    max_image_pixels: int,
    block_engines: Sequence[str | None] = (),
    keras: bool = True,
    conversion_directory: Path | None = None,
    sample_pixels: Callable[[int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Writes the export into ``folder`` (an empty directory) and returns its manifest.

    Args:
        folder: where to write (the stage passes a temporary directory, swapped in on success).
        members: the stack, consistent with ``head`` (:func:`check_consistency`).
        head: the trained head.
        head_folder: models/head, copied into ``folder/head``.
        seed: ``base.seed``.
        tflite: also write ``model.tflite`` (all-Keras stacks; a stack with a TFLite member is
            always exported as TFLite files).
        max_image_pixels: the decompression-bomb limit the model was trained with (params
            ``download.max_image_pixels``), recorded in the manifest for ``transferlab predict``.
        block_engines: the engine each block's features came from (``block_engines`` of the
            features files): a TFLite member is written as the rewrite that engine ran, so the
            export computes exactly what the head was trained on.
        keras: params ``export.keras``: also write model.keras (see :func:`choose_layout`).
        conversion_directory: extract_features' conversion folder (``<cache>/converted``): a Keras
            member of a ``stack`` export whose features came from its converted file is copied
            from there (:func:`reused_conversion`); None: converted here.
        sample_pixels: size -> real photos (uint8, (N, S, S, 3)), to check a conversion that the
            folder does not hold yet against Keras, as extract_features does.
    """
    if any(member.random_init for member in members):
        logger.warning("random-init backbone weights: this export classifies nothing real")
    if choose_layout(members=members, head=head, tflite=tflite, keras=keras) == "classifier":
        layout = _write_classifier(
            folder, members=members, head=head, head_folder=head_folder, seed=seed, tflite=tflite
        )
        member_files = [{} for _ in members]
    else:
        layout, member_files = _write_stack(
            folder,
            members=members,
            seed=seed,
            block_engines=block_engines,
            conversion_directory=conversion_directory,
            sample_pixels=sample_pixels,
        )
    class_names = copy_head_and_labels(head, head_folder, folder)
    manifest = {
        "format": predict.EXPORT_FORMAT,
        "version": predict.EXPORT_VERSION,
        **layout,
        "backbone": files.stack_name(head.description.blocks),
        "class_names": class_names,
        "labels": predict.LABELS_FILE,
        "resize": RESIZE_RULE,
        "max_image_pixels": int(max_image_pixels),
        "members": [
            {**_member_entry(member, block), **written}
            for member, block, written in zip(members, head.description.blocks, member_files)
        ],
        "head": {"type": head.description.head, "folder": predict.HEAD_FOLDER, "settings": head.description.settings},
        "files": _file_table(folder),
    }
    atomic.write_json(folder / predict.MANIFEST_FILE, manifest)
    return manifest


def _write_classifier(
    folder: Path, *, members: Sequence[Member], head: base.TrainedHead, head_folder: Path, seed: int, tflite: bool
) -> dict[str, Any]:
    from transferlab.features import engines

    model = build_classifier(members=members, head=head, head_folder=head_folder, seed=seed)
    model.save(folder / predict.KERAS_FILE)
    if tflite:
        engines.convert_to_tflite(model, folder / predict.TFLITE_FILE)
    inputs = [{"name": tensor.name, "image_size": int(tensor.shape[1]), "dtype": "uint8"} for tensor in model.inputs]
    return {
        "layout": "classifier",
        "keras_model": predict.KERAS_FILE,
        "tflite_model": predict.TFLITE_FILE if tflite else "",
        "inputs": inputs,
    }


def _write_stack(
    folder: Path,
    *,
    members: Sequence[Member],
    seed: int,
    block_engines: Sequence[str],
    conversion_directory: Path | None = None,
    sample_pixels: Callable[[int], np.ndarray] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from transferlab.tflite import describe, rewrites

    recorded = list(block_engines) or ["tflite"] * len(members)
    (folder / predict.BACKBONES_FOLDER).mkdir()
    entries = []
    for index, member in enumerate(members):
        relative = f"{predict.BACKBONES_FOLDER}/{index:02d}_{_safe_name(member.name)}.tflite"
        conversion = ""
        if member.kind == "tflite":
            rewrite = rewrites.rewrite_of_engine(recorded[index] or "tflite")
            (folder / relative).write_bytes(rewrites.rewritten_content(member.path.read_bytes(), rewrite))
        else:
            conversion = _keras_member_file(
                folder / relative,
                member=member,
                seed=seed,
                engine=recorded[index],
                conversion_directory=conversion_directory,
                sample_pixels=sample_pixels,
            )
        info = describe.describe_tflite(folder / relative, member.tensor or None)
        entries.append(
            {
                "file": relative,
                "sha256": info.sha256,
                "tensor": member.tensor,
                "input_dtype": info.input_dtype,
                "input_quantization": list(info.input_quantization),
                "output": info.output_name,
                "converted_from_keras": member.kind == "keras",
                **({"conversion": conversion} if conversion else {}),
            }
        )
    return {"layout": "stack", "keras_model": "", "tflite_model": "", "inputs": []}, entries


def backbones_as_embedded(manifest: dict[str, Any]) -> bool:
    """True when every backbone file of a ``stack`` export is the very bytes the features came from.

    A TFLite member is written as the rewrite its features' engine ran; a Keras member counts when
    its converted file was reused from the conversion cache (``conversion: reused``), not converted here.
    """
    if manifest["layout"] != "stack":
        return False
    return all(member["kind"] == "tflite" or member.get("conversion") == "reused" for member in manifest["members"])


def _keras_member_file(
    path: Path,
    *,
    member: Member,
    seed: int,
    engine: str | None,
    conversion_directory: Path | None,
    sample_pixels: Callable[[int], np.ndarray] | None,
) -> str:
    """Writes a Keras member's TFLite file at ``path``; returns ``reused`` or ``converted`` (for the manifest).

    When its features came from the converted file (engine ``tflite``) and the conversion folder
    is known, those very bytes are copied (:func:`reused_conversion`); otherwise it is converted here.
    """
    if engine == "tflite" and conversion_directory is not None and sample_pixels is not None:
        content, how = reused_conversion(
            member, seed=seed, conversion_directory=conversion_directory, sample_pixels=sample_pixels
        )
        if content is not None:
            path.write_bytes(content)
            return how
    from transferlab.features import engines

    model = registry.build(
        member.name, alpha=member.alpha, weights=member.weights, image_size=member.image_size, seed=seed
    )
    engines.convert_to_tflite(model, path)
    logger.info("export: converted %s to TFLite", member.name)
    return "converted"


def reused_conversion(
    member: Member, *, seed: int, conversion_directory: Path, sample_pixels: Callable[[int], np.ndarray]
) -> tuple[bytes | None, str]:
    """The converted TFLite bytes extract_features ran for a Keras member, from the conversion folder.

    The choice is :func:`transferlab.features.engine_choice.choose_keras_engine`'s, so the export
    runs the bytes the features came from (their sha256 is checked again after reading). With the
    conversion folder warm this imports no TensorFlow and converts nothing (``reused``); a folder
    emptied since is refilled as extract_features would fill it (``converted``: the backbone is
    built, converted and checked against Keras on ``sample_pixels``).

    Returns:
        (bytes, ``reused`` or ``converted``), or (None, why) when the conversion does not agree
        with Keras (the caller converts the classifier's way and the export check decides).
    """
    from transferlab.features import cache_files, engine_choice, extract_features

    build = extract_features.backbone_builder(member, seed)
    built: list[bool] = []

    def build_model() -> Any:
        built.append(True)
        return build()

    try:
        choice = engine_choice.choose_keras_engine(
            requested="tflite",
            build_model=build_model,
            conversion_directory=conversion_directory,
            identity=engine_choice.conversion_identity(member),
            sample_pixels=lambda: sample_pixels(member.image_size),
        )
    except ValueError as error:
        logger.warning("export: the cached conversion of %s is not usable (%s); converting", member.name, error)
        return None, str(error)
    content = Path(choice.build().path).read_bytes()
    if cache_files.content_sha256(content) != choice.content_sha256:
        raise ValueError(
            f"the converted {member.name} in {conversion_directory} changed while the export read it; run again"
        )
    how = "converted" if built else "reused"
    logger.info("export: %s the converted %s (sha256 %s...)", how, member.name, choice.content_sha256[:12])
    return content, how


def copy_head_and_labels(head: base.TrainedHead, head_folder: Path, folder: Path) -> list[str]:
    """Copies the trained head into the export and writes labels.txt; returns the class names.

    Only the kept seed is copied: ``train_head.seeds`` > 1 leaves the others in models/head/seeds/.
    """
    shutil.copytree(head_folder, folder / predict.HEAD_FOLDER, ignore=seeds.not_exported(head_folder))
    class_names = list(head.description.class_names)
    (folder / predict.LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    return class_names


def _safe_name(name: str) -> str:
    return "".join(character if character.isalnum() or character in "._-" else "_" for character in name)


def _member_entry(member: Member, block: files.Block) -> dict[str, Any]:
    return {
        "name": member.name,
        "spec": member.spec,
        "kind": member.kind,
        "image_size": member.image_size,
        "alpha": member.alpha,
        "weights": member.weights_identity,
        "random_init": member.random_init,
        "width": block.width,
        "offset": block.offset,
    }


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": images.sha256_file(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != predict.MANIFEST_FILE
    }


def drop_formats(folder: Path, manifest: dict[str, Any], reasons: dict[str, str]) -> dict[str, Any]:
    """Removes the formats that failed the check against evaluate; returns the rewritten manifest.

    Each dropped format's model file is deleted and its manifest entries cleared (``keras_model`` or
    ``tflite_model`` empty, its ``files`` row gone); ``dropped`` records why, so that ``transferlab
    predict --format`` can say so. The folder then holds only formats that reproduce evaluate.

    Args:
        folder: the written export.
        manifest: its manifest (as :func:`write_export` returned it).
        reasons: format name (``keras``, ``tflite``) -> why it was dropped; empty: nothing changes.
    """
    if not reasons:
        return manifest
    if manifest["layout"] != "classifier":
        raise ValueError(f"a {manifest['layout']} export has one format only; it cannot drop {', '.join(reasons)}")
    for name, reason in reasons.items():
        logger.warning("export: dropping the %s format, it does not reproduce evaluate: %s", name, reason)
    files_table = dict(manifest["files"])
    changed = {**manifest, "dropped": {**manifest.get("dropped", {}), **reasons}}
    for name in reasons:
        key = predict.FORMAT_KEYS[name]
        (folder / manifest[key]).unlink()
        files_table.pop(manifest[key])
        changed[key] = ""
    changed["files"] = files_table
    atomic.write_json(folder / predict.MANIFEST_FILE, changed)
    return changed


def export_report(manifest: dict[str, Any], head: base.TrainedHead, check_report: dict[str, Any]) -> dict[str, Any]:
    """metrics/export.json: the check's figures (:mod:`transferlab.export.check`), file sizes and provenance."""
    return {**check_report, "files": file_sizes(manifest), "provenance": provenance(manifest, head)}


def provenance(manifest: dict[str, Any], head: base.TrainedHead) -> dict[str, Any]:
    """Which backbones and head the export holds (for metrics/export.json)."""
    return {
        "backbone": manifest["backbone"],
        "layout": manifest["layout"],
        "members": [{key: member[key] for key in PROVENANCE_MEMBER_KEYS} for member in manifest["members"]],
        "head": head.description.head,
        "head_settings": head.description.settings,
        "random_init": any(member["random_init"] for member in manifest["members"]),
    }


def file_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes per exported file (from the manifest) and their total."""
    sizes = {name: int(entry["bytes"]) for name, entry in manifest["files"].items()}
    return {**sizes, "total": sum(sizes.values())}
