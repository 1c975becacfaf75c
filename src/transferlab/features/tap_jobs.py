"""Tap activations of one Keras member at one layer: cached, computed, exported (the extract_taps stage).

The heads that fine-tune (``finetune``, and ``fusion`` for its fine-tuned members) train the
top of a Keras backbone from a layer on; everything below that layer is frozen, so its output
(the *tap*: the tensor feeding ``from_layer``) is computed once, by the frozen bottom of the
backbone (see :mod:`transferlab.backbones.taps`). A :class:`TapJob` is a job for
:func:`transferlab.features.decode.fill_misses`: it stores taps as float16 in the embedding
cache (the namespace adds the tap layer), and :func:`write_taps` exports them to
``{split}.npy`` files batch by batch, so the whole set never sits in memory, beside
``taps.json`` and the frozen backbone (the contract is :mod:`transferlab.features.files`').
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import taps
from transferlab.backbones.stack import Member
from transferlab.features import cache_files, decode, embedding_cache, engine_choice, files

TAP_DTYPE = np.float16  # half the bytes of float32; the fine-tuned top does not notice the rounding


@dataclass
class TapJob:
    """Tap activations of one member at one layer: which are cached, and computing the others."""

    member: Member
    layer: str
    cache: Any  # embedding_cache.EmbeddingCache
    choice: engine_choice.ConvertedEngine
    build_backbone: Callable[[], Any]
    present: set = field(default_factory=set)
    hits: int = 0
    computed: int = 0
    seconds: float = 0.0
    shape: tuple[int, ...] = ()
    engine: object = None

    @property
    def size(self) -> int:
        return self.member.image_size

    @property
    def label(self) -> str:
        return f"{self.member.name} taps at {self.layer}"

    def wants(self, item: decode.Item) -> bool:
        return item.key not in self.present

    def consume(self, chunk: list[decode.Item], pixels: np.ndarray) -> None:
        started = time.perf_counter()
        if self.engine is None:  # engines return flat rows; the map's shape comes from the graph
            self.shape = taps.tap_shape(self.build_backbone(), self.layer)
            self.engine = self.choice.build()
        maps = self.engine.run(pixels).reshape(len(chunk), *self.shape).astype(TAP_DTYPE)
        if not np.isfinite(maps).all():
            raise ValueError(
                f"tap activations of {self.member.name} at '{self.layer}' overflow float16; "
                "choose another train_head.finetune.from_layer"
            )
        self.seconds += time.perf_counter() - started
        self.cache.put_many({item.key: array for item, array in zip(chunk, maps, strict=True)})
        self.present.update(item.key for item in chunk)
        self.computed += len(chunk)

    def forget_missing(self, keys: list[tuple[str, str]]) -> None:
        """Drops the keys that are no longer cached (a corrupt row found on reading is deleted)."""
        self.present.difference_update(self.cache.missing(keys))


def open_tap_job(
    member: Member,
    layer: str,
    items: list[decode.Item],
    *,
    engine: str,
    converted: Path,
    cache_directory: Path,
    build_backbone: Callable[[], Any],
    render_one: Callable[[decode.Item, int], np.ndarray],
) -> TapJob:
    """Opens the tap cache of one Keras member at one layer and chooses the engine that computes taps.

    Args:
        member: a Keras member of the stack.
        layer: the first layer the head trains, or ``auto`` (the registry's ``finetune_from``);
            the tap is the tensor feeding it.
        items: every view; the job knows which of them are cached.
        engine: the ``extract_features.engine`` param (see engine_choice.choose_keras_engine).
        converted: the conversion folder (converted models, verdicts, saved backbones).
        cache_directory: the embedding cache folder (a temporary one when the cache is off).
        build_backbone: builds (once) the member's Keras backbone.
        render_one: (item, size) -> uint8 pixels, for the engine's verification photos.

    Raises:
        ValueError: the member is not a Keras backbone, or the layer is not a valid cut point.
    """
    if member.kind != "keras":
        raise ValueError(f"{member.name} is a {member.kind} backbone: only Keras registry backbones can be fine-tuned")
    layer = taps.resolve_from_layer(member.name, layer)
    choice = engine_choice.choose_keras_engine(
        requested=engine,
        build_model=lambda: taps.bottom_model(build_backbone(), layer, flatten=True),
        conversion_directory=converted,
        identity=engine_choice.conversion_identity(member, layer),
        sample_pixels=engine_choice.verification_pixels(items, render_one, member.image_size),
    )
    cache = embedding_cache.open_member_cache(cache_directory, member, choice, tap=layer)
    job = TapJob(member=member, layer=layer, cache=cache, choice=choice, build_backbone=build_backbone)
    keys = [item.key for item in items]
    job.present = set(keys) - set(cache.missing(keys))
    job.hits = len(job.present)
    if job.hits < len(keys):  # taps cached for every view were made at a valid layer
        taps.find_cut(build_backbone(), layer)  # a bad layer fails here, before any work
    return job


def write_taps(
    job: TapJob, directory: Path, rows_by_split: dict, *, converted: Path, fill: Callable[[TapJob], None]
) -> dict:
    """Exports each split's taps in row order, the frozen backbone and taps.json; returns the report.

    Args:
        job: the tap job, after every view was computed or found cached.
        directory: the member's folder (``{split}.npy``, ``taps.json``, ``backbone.keras``).
        rows_by_split: the features files' rows, in their order.
        converted: the conversion folder, where the frozen backbone is saved once.
        fill: computes the views the job no longer has (a corrupt cache row deleted on reading).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        keys = [(row["sha256"], row["recipe"]) for row in rows]
        for attempt in range(3):
            try:
                _export_split(job, keys, directory / f"{split}.npy")
                break
            except KeyError:  # a row that failed its checksum was deleted while reading: compute it again
                if attempt == 2:
                    raise
                job.forget_missing(keys)
                fill(job)
    _copy_backbone(job, converted, directory / taps.BACKBONE_FILE)
    shape = list(np.load(directory / f"{next(iter(rows_by_split))}.npy", mmap_mode="r").shape[1:])
    description = {
        "member": job.member.name,
        "spec": job.member.spec,
        "weights": job.member.weights_identity,
        "image_size": job.member.image_size,
        "alpha": job.member.alpha,
        "layer": job.layer,
        "shape": shape,
        "dtype": np.dtype(TAP_DTYPE).name,
        "engine": job.choice.name,
        "backbone_file": taps.BACKBONE_FILE,
        "rows": {split: len(rows) for split, rows in rows_by_split.items()},
        "rows_sha256": {
            split: files.rows_digest([row["sha256"] for row in rows], [row["recipe"] for row in rows])
            for split, rows in rows_by_split.items()
        },
    }
    files.write_tap_description(directory, description)
    file_bytes = sum((directory / f"{split}.npy").stat().st_size for split in rows_by_split)
    cache_bytes = job.cache.disk_bytes()
    job.cache.close()
    return {
        "member": job.member.name,
        "layer": job.layer,
        "shape": shape,
        "dtype": description["dtype"],
        "bytes_per_image": int(np.prod(shape)) * np.dtype(TAP_DTYPE).itemsize,
        "engine": job.choice.name,
        "engine_note": job.choice.verdict.get("reason", ""),
        "cache_hits": job.hits,
        "computed": job.computed,
        "corrupt_entries_recomputed": job.cache.corrupt,
        "engine_seconds": round(job.seconds, 3),
        "cache_bytes": cache_bytes,
        "file_bytes": file_bytes,
    }


def _export_split(job: TapJob, keys: list[tuple[str, str]], path: Path) -> None:
    if keys:
        job.cache.export_memmap(keys, path, dtype=TAP_DTYPE)
        return
    np.save(path, np.zeros((0, *_cached_shape(job)), dtype=TAP_DTYPE))  # an empty split


def _cached_shape(job: TapJob) -> tuple[int, ...]:
    if job.shape:
        return job.shape
    return tuple(job.cache.read_batch([next(iter(job.present))]).shape[1:])


def _saved_backbone(job: TapJob, converted: Path) -> tuple[Path, str]:
    """The member's frozen backbone as a .keras file, saved once in the conversion folder, and its sha256.

    Its sha256 is recorded beside it once it is in place, and checked whenever it is reused: a
    damaged copy is saved again (with a warning), never handed to the finetune head.
    """
    path = converted / _file_key(engine_choice.conversion_identity(job.member), ".keras")
    sha256 = cache_files.intact_file_sha256(path, consequence="saving the backbone again")
    if sha256 is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".backbone-") as temporary:
            staged = Path(temporary) / taps.BACKBONE_FILE  # Keras insists on the .keras suffix
            job.build_backbone().save(staged)
            os.replace(staged, path)
        sha256 = cache_files.record_file(path)
    return path, sha256


def _copy_backbone(job: TapJob, converted: Path, destination: Path) -> None:
    """Copies the saved backbone out of the cache folder; the copy must have the checked sha256."""
    source, sha256 = _saved_backbone(job, converted)
    shutil.copyfile(source, destination)
    if cache_files.file_sha256(destination) != sha256:
        raise ValueError(f"{source} changed while it was copied to {destination}; run extract_taps again")


def _file_key(identity: str, suffix: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest() + suffix


@contextlib.contextmanager
def tap_cache_directory(cache_directory: Path | None) -> Iterator[Path]:
    """The cache folder taps go through: the embedding cache, or a temporary one when it is off.

    Taps are exported from the cache, so with the cache disabled they still need one.
    """
    if cache_directory is not None:
        yield cache_directory
        return
    with tempfile.TemporaryDirectory(prefix="transferlab-taps-") as temporary:
        yield Path(temporary)
