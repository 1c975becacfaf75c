"""extract_features: embeddings of every (image, recipe) by every backbone of the stack.

Each embedding comes from the embedding cache when it is there; the rest are computed with
images decoded and resized in a thread pool while the engine runs, one batch ahead, and each
batch is written to the cache as soon as it is done (a killed run resumes where it stopped).
Each image is decoded and resized once per input size, for every member that needs it.

For the ``finetune`` head it also caches *tap activations* of the stack's Keras member: the
tensor feeding ``train_head.finetune.from_layer``, computed by the frozen bottom of the backbone
(see :mod:`transferlab.backbones.taps`) from the same decoded pixels, stored as float16 in the same cache
(the namespace adds the tap layer) and exported to ``{split}.npy`` files batch by batch, so the
whole set never sits in memory.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from transferlab.backbones import stack, taps
from transferlab.data import augment, images
from transferlab.features import embedding_cache, engines, files, mirror
from transferlab.tflite import rewrites
from transferlab.backbones.stack import Member

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
VERIFICATION_IMAGES = 16  # real photos that a converted engine must reproduce Keras on
TAP_DTYPE = np.float16  # half the bytes of float32; the fine-tuned top does not notice the rounding


@dataclass(frozen=True)
class Item:
    """One view to embed: an image's content hash, its augmentation recipe, and where it is."""

    sha256: str
    recipe: str
    path: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.sha256, self.recipe)


@dataclass
class MemberRun:
    """What happened to one member: its engine, cache counters, and the embeddings by key."""

    member: Member
    engine: str
    vectors: dict = field(default_factory=dict)
    hits: int = 0
    computed: int = 0
    corrupt: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    engine_note: str = ""
    measured_speed: float | None = None  # engine images/s, this run's or remembered by the cache


def read_rows(path: Path) -> list[dict]:
    """Reads a split or augmented CSV (path,label,sha256[,recipe]) into dicts."""
    if not Path(path).exists():
        raise ValueError(f"{path} not found; run the split and augment stages first (dvc repro augment)")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.setdefault("recipe", "")
        row["recipe"] = row["recipe"] or ""
    return rows


def unique_items(rows_by_split: dict[str, list[dict]]) -> list[Item]:
    """Every distinct (sha256, recipe) once, in a stable order (split, then row order)."""
    seen: dict[tuple[str, str], Item] = {}
    for split in SPLITS:
        for row in rows_by_split.get(split, []):
            item = Item(row["sha256"], row["recipe"], row["path"])
            seen.setdefault(item.key, item)
    return list(seen.values())


def render(item: Item, *, images_directory: Path, size: int, max_image_pixels: int) -> np.ndarray:
    """The pixels of one view: decode as training does, then the recipe's one pure function."""
    image = images.open_rgb(images_directory / item.path, max_image_pixels=max_image_pixels)
    return augment.render_view(image, item.recipe, size)


def pixel_batches(
    items: list[Item], *, render_one: Callable[[Item], np.ndarray], batch_size: int, threads: int
) -> Iterator[tuple[list[Item], np.ndarray]]:
    """Yields (items, uint8 pixels) batches, decoding up to two batches ahead in threads."""
    chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for chunk in chunks[:2]:
            pending.append((chunk, [pool.submit(render_one, item) for item in chunk]))
        next_chunk = 2
        while pending:
            chunk, futures = pending.popleft()
            if next_chunk < len(chunks):
                upcoming = chunks[next_chunk]
                pending.append((upcoming, [pool.submit(render_one, item) for item in upcoming]))
                next_chunk += 1
            yield chunk, np.stack([future.result() for future in futures])


def embed(
    members: list[Member],
    items: list[Item],
    *,
    open_cache: Callable[[Member, str], embedding_cache.EmbeddingCache],
    choose_engine: Callable[[Member, Callable[[], np.ndarray]], engines.ConvertedEngine],
    render_one: Callable[[Item, int], np.ndarray],
    batch_size: int,
    threads: int,
    extra_jobs: Sequence[Any] = (),
) -> list[MemberRun]:
    """Embeds ``items`` with every member: cache hits first, then the misses, batch by batch.

    Args:
        members: the stack.
        items: the distinct views to embed.
        open_cache: (member, engine name) -> an open cache for that member's namespace.
        choose_engine: (member, sample pixels) -> the engine to run (may convert, once).
        render_one: (item, size) -> uint8 pixels.
        batch_size: images per inference batch.
        threads: decoding threads.
        extra_jobs: more work on the same decoded pixels (a :class:`TapJob`): each has ``size``,
            ``label``, ``wants(item)`` and ``consume(items, pixels)``.
    """
    active = []
    for member in members:
        sample = lambda member=member: np.stack([render_one(item, member.image_size) for item in items[:VERIFICATION_IMAGES]])
        choice = choose_engine(member, sample)
        cache = open_cache(member, choice.name)
        run = MemberRun(member=member, engine=choice.name, engine_note=choice.verdict.get("reason", ""))
        run.vectors = cache.get_many([item.key for item in items])
        run.hits, run.corrupt = len(run.vectors), cache.corrupt
        active.append(_Active(run, cache, choice))
    jobs = [*active, *extra_jobs]
    for size in sorted({job.size for job in jobs}):
        group = [job for job in jobs if job.size == size]
        _fill_misses(group, items, size=size, render_one=render_one, batch_size=batch_size, threads=threads)
    for entry in active:
        entry.cache.record_speed(entry.run.computed, entry.run.seconds)
        entry.run.measured_speed = entry.cache.measured_images_per_second()
        entry.run.cache_bytes = entry.cache.disk_bytes()
        entry.cache.close()
    return [entry.run for entry in active]


@dataclass
class _Active:
    run: MemberRun
    cache: embedding_cache.EmbeddingCache
    choice: engines.ConvertedEngine
    engine: object = None

    @property
    def size(self) -> int:
        return self.run.member.image_size

    @property
    def label(self) -> str:
        return self.run.member.name

    def wants(self, item: Item) -> bool:
        return item.key not in self.run.vectors

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if self.engine is None:  # built on the first miss: a warm run never imports TensorFlow
            self.engine = self.choice.build()
        return self.engine.run(pixels)

    def consume(self, chunk: list[Item], pixels: np.ndarray) -> None:
        run = self.run
        started = time.perf_counter()
        vectors = self.embed(pixels)
        run.seconds += time.perf_counter() - started
        new = {item.key: vector for item, vector in zip(chunk, vectors)}
        self.cache.put_many(new)  # one transaction per batch: a killed run loses only this batch
        run.vectors.update(new)
        run.computed += len(new)


def _fill_misses(group: list, items: list[Item], *, size: int, render_one, batch_size: int, threads: int) -> None:
    missing = [item for item in items if any(job.wants(item) for job in group)]
    if not missing:
        return
    names = "+".join(job.label for job in group)
    progress = tqdm(total=len(missing), desc=f"embedding {names} @{size}px", unit="img", dynamic_ncols=True)
    for chunk, pixels in pixel_batches(missing, render_one=lambda item: render_one(item, size), batch_size=batch_size, threads=threads):
        for job in group:
            wanted = [index for index, item in enumerate(chunk) if job.wants(item)]
            if wanted:
                job.consume([chunk[index] for index in wanted], pixels[wanted])
        progress.update(len(chunk))
    progress.close()


def assemble(rows: list[dict], runs: list[MemberRun], class_names: list[str]) -> files.FeatureSet:
    """Concatenates each row's member embeddings in stack order into one features file."""
    widths = [len(next(iter(run.vectors.values()))) if run.vectors else 0 for run in runs]
    offsets = np.cumsum([0, *widths[:-1]]).astype(np.int64)
    features = np.zeros((len(rows), sum(widths)), dtype=np.float32)
    for index, row in enumerate(rows):
        key = (row["sha256"], row["recipe"])
        features[index] = np.concatenate([run.vectors[key] for run in runs]) if runs else []
    label_index = {name: position for position, name in enumerate(class_names)}
    return files.FeatureSet(
        {
            "features": features,
            "labels": np.array([label_index[row["label"]] for row in rows], dtype=np.int32),
            "class_names": np.array(class_names, dtype=str),
            "paths": np.array([row["path"] for row in rows], dtype=str),
            "sha256": np.array([row["sha256"] for row in rows], dtype=str),
            "recipes": np.array([row["recipe"] for row in rows], dtype=str),
            "block_specs": np.array([run.member.spec for run in runs], dtype=str),
            "block_names": np.array([run.member.name for run in runs], dtype=str),
            "block_weights": np.array([run.member.weights_identity for run in runs], dtype=str),
            "block_engines": np.array([run.engine for run in runs], dtype=str),
            "block_widths": np.array(widths, dtype=np.int64),
            "block_offsets": offsets,
        }
    )


def extract_features(
    *,
    members: list[Member],
    rows_by_split: dict[str, list[dict]],
    images_directory: Path,
    cache_directory: Path | None,
    engine: str,
    batch_size: int,
    threads: int,
    seed: int,
    max_image_pixels: int,
    tap_request: TapRequest | None = None,
    mirror_average: bool = False,
) -> tuple[dict[str, files.FeatureSet], dict]:
    """Embeds every row of every split with the stack; returns features files and a report.

    Args:
        members: the resolved stack (transferlab.backbones.stack.resolve_members).
        rows_by_split: rows (path, label, sha256, recipe) of train (with augmented views), val, test.
        images_directory: where the rows' paths are relative to (data/raw/images).
        cache_directory: the embedding cache folder, or None to run without the cache.
        engine: auto, keras or tflite. Keras members: see engines.choose_keras_engine. TFLite
            members run on LiteRT: as given, or with auto a faster rewrite of the file chosen by
            measurement (see rewrites.choose_tflite_engine).
        batch_size: images per inference batch.
        threads: decoding threads.
        seed: seeds random-init backbones.
        max_image_pixels: decompression-bomb limit when decoding.
        tap_request: also cache and export tap activations (the ``finetune`` head), or None.
        mirror_average: each row's embedding is the mean of its view's and that view's mirror
            image's (see :mod:`transferlab.features.mirror`); mirrored views are cached like any view.
    """
    started = time.perf_counter()
    items = unique_items(rows_by_split)
    if not items:
        raise ValueError("the splits hold no images; check data/splits and the split params")
    if mirror_average and tap_request is not None:
        raise ValueError(
            "extract_features.mirror_average averages pooled embeddings, but the finetune head trains on tap "
            "activations (it mirrors them itself: train_head.finetune.flip); set extract_features.mirror_average: false"
        )
    views = mirror.with_mirrors(items) if mirror_average else items
    render_one = lambda item, size: render(item, images_directory=images_directory, size=size, max_image_pixels=max_image_pixels)
    builders = {member.name: _backbone_builder(member, seed) for member in members if member.kind == "keras"}
    fill = lambda job: _fill_misses([job], items, size=job.size, render_one=render_one, batch_size=batch_size, threads=threads)
    with _conversion_directory(cache_directory) as converted, _tap_cache_directory(cache_directory, tap_request) as tap_cache:
        tap_job = None
        if tap_request is not None:
            tap_job = _open_tap_job(tap_request, members, items, engine=engine, converted=converted, cache_directory=tap_cache,
                                    builders=builders, render_one=render_one)
        runs = embed(
            members,
            views,
            open_cache=lambda member, engine_name: _open_cache(cache_directory, member, engine_name),
            choose_engine=lambda member, sample: _choose_engine(member, sample, engine, converted, builders.get(member.name)),
            render_one=render_one,
            batch_size=batch_size,
            threads=threads,
            extra_jobs=[tap_job] if tap_job else [],
        )
        tap_report = None if tap_job is None else _write_taps(tap_job, tap_request.directory, rows_by_split, converted=converted, fill=fill)
    if mirror_average:
        for run in runs:
            run.vectors = mirror.average_mirrors(run.vectors, [item.key for item in items])
    class_names = sorted({row["label"] for rows in rows_by_split.values() for row in rows})
    feature_sets = {split: assemble(rows, runs, class_names) for split, rows in rows_by_split.items()}
    report = _report(runs, rows_by_split, views, cache_directory, time.perf_counter() - started)
    if tap_report is not None:
        report["taps"] = {**tap_report, "cache_bytes": tap_report["cache_bytes"] if cache_directory else 0}
    return feature_sets, report


def _backbone_builder(member: Member, seed: int) -> Callable[[], Any]:
    """Builds the member's Keras model on the first call, then returns that same model."""
    from transferlab.backbones import registry

    built: list = []

    def build() -> Any:
        if not built:
            entry = registry.get(member.name)
            built.append(registry.build(entry, alpha=member.alpha, weights=member.weights, image_size=member.image_size, seed=seed))
        return built[0]

    return build


def _choose_engine(member: Member, sample, requested: str, converted: Path, build_model: Callable[[], Any] | None) -> engines.ConvertedEngine:
    if member.kind == "tflite":  # the file as given, or a faster rewrite chosen by measurement
        return rewrites.choose_tflite_engine(
            requested=requested, path=member.path, tensor=member.tensor, sha256=member.weights_identity,
            conversion_directory=converted, sample_pixels=sample,
        )
    return engines.choose_keras_engine(
        requested=requested,
        build_model=build_model,
        conversion_directory=converted,
        identity=_identity(member),
        sample_pixels=sample,
    )


def _identity(member: Member, tap: str = "") -> str:
    # Names a converted model (and the saved backbone) in the conversion folder.
    return f"{member.identity}|{member.weights_identity}|{member.image_size}" + (f"|tap:{tap}" if tap else "")


# ---------------------------------------------------------------- tap activations (finetune head)


@dataclass(frozen=True)
class TapRequest:
    """Tap activations to cache and export beside the embeddings, for the ``finetune`` head.

    Attributes:
        layer: the first layer the head trains (``train_head.finetune.from_layer``) or ``auto``
            (the registry's ``finetune_from``); the tap is the tensor feeding it.
        directory: where ``{split}.npy`` (float16, rows as in the features files),
            ``taps.json`` and ``backbone.keras`` (the frozen backbone) are written.
    """

    layer: str
    directory: Path


def tap_member(members: list[Member]) -> Member:
    """The stack's one member, a Keras backbone, whose top the ``finetune`` head trains.

    Raises:
        ValueError: the stack is not exactly one Keras backbone (the head has no way yet to
            combine a fine-tuned member with the other members of a stack).
    """
    if len(members) != 1 or members[0].kind != "keras":
        listed = ", ".join(f"{member.name} ({member.kind})" for member in members)
        raise ValueError(
            f"train_head.head=finetune fine-tunes the top of one Keras backbone, but extract_features.backbone is "
            f"{listed}; set it to one registry backbone (`transferlab backbones` lists them), or choose another head "
            "for a stack or a TFLite file"
        )
    return members[0]


@dataclass
class TapJob:
    """Tap activations of one member at one layer: which are cached, and computing the others."""

    member: Member
    layer: str
    cache: Any  # embedding_cache.EmbeddingCache
    choice: engines.ConvertedEngine
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

    def wants(self, item: Item) -> bool:
        return item.key not in self.present

    def consume(self, chunk: list[Item], pixels: np.ndarray) -> None:
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
        self.cache.put_many({item.key: array for item, array in zip(chunk, maps)})
        self.present.update(item.key for item in chunk)
        self.computed += len(chunk)

    def forget_missing(self, keys: list[tuple[str, str]]) -> None:
        """Drops the keys that are no longer cached (a corrupt row found on reading is deleted)."""
        self.present.difference_update(self.cache.missing(keys))


def _open_tap_job(request: TapRequest, members, items, *, engine, converted, cache_directory, builders, render_one) -> TapJob:
    member = tap_member(members)
    layer = taps.resolve_from_layer(member.name, request.layer)
    build_backbone = builders[member.name]
    sample = lambda: np.stack([render_one(item, member.image_size) for item in items[:VERIFICATION_IMAGES]])
    choice = engines.choose_keras_engine(
        requested=engine,
        build_model=lambda: taps.bottom_model(build_backbone(), layer, flatten=True),
        conversion_directory=converted,
        identity=_identity(member, layer),
        sample_pixels=sample,
    )
    namespace = embedding_cache.namespace_key(
        backbone=member.identity, weights_identity=member.weights_identity, image_size=member.image_size,
        engine=choice.name, tap=layer,
    )
    description = {"spec": member.spec, "name": member.name, "weights": member.weights_identity,
                   "image_size": member.image_size, "engine": choice.name, "tap": layer}
    cache = embedding_cache.EmbeddingCache(cache_directory, namespace, description=description)
    job = TapJob(member=member, layer=layer, cache=cache, choice=choice, build_backbone=build_backbone)
    keys = [item.key for item in items]
    job.present = set(keys) - set(cache.missing(keys))
    job.hits = len(job.present)
    if job.hits < len(keys):  # taps cached for every view were made at a valid layer
        taps.find_cut(build_backbone(), layer)  # a bad layer fails here, before any work
    return job


def _write_taps(job: TapJob, directory: Path, rows_by_split: dict, *, converted: Path, fill: Callable) -> dict:
    """Exports each split's taps in row order, the frozen backbone and taps.json; returns the report."""
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
    shutil.copyfile(_saved_backbone(job, converted), directory / taps.BACKBONE_FILE)
    shape = list(np.load(directory / f"{next(iter(rows_by_split))}.npy", mmap_mode="r").shape[1:])
    description = {
        "member": job.member.name, "spec": job.member.spec, "weights": job.member.weights_identity,
        "image_size": job.member.image_size, "alpha": job.member.alpha, "layer": job.layer, "shape": shape,
        "dtype": np.dtype(TAP_DTYPE).name, "engine": job.choice.name, "backbone_file": taps.BACKBONE_FILE,
        "rows": {split: len(rows) for split, rows in rows_by_split.items()},
    }
    (directory / taps.DESCRIPTION_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    file_bytes = sum((directory / f"{split}.npy").stat().st_size for split in rows_by_split)
    cache_bytes = job.cache.disk_bytes()
    job.cache.close()
    return {
        "member": job.member.name, "layer": job.layer, "shape": shape, "dtype": description["dtype"],
        "bytes_per_image": int(np.prod(shape)) * np.dtype(TAP_DTYPE).itemsize,
        "engine": job.choice.name, "engine_note": job.choice.verdict.get("reason", ""),
        "cache_hits": job.hits, "computed": job.computed, "corrupt_entries_recomputed": job.cache.corrupt,
        "engine_seconds": round(job.seconds, 3), "cache_bytes": cache_bytes, "file_bytes": file_bytes,
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


def _saved_backbone(job: TapJob, converted: Path) -> Path:
    """The member's frozen backbone as a .keras file, saved once in the conversion folder."""
    path = converted / _file_key(_identity(job.member), ".keras")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".backbone-") as temporary:
            staged = Path(temporary) / taps.BACKBONE_FILE  # Keras insists on the .keras suffix
            job.build_backbone().save(staged)
            os.replace(staged, path)
    return path


def _file_key(identity: str, suffix: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest() + suffix


@contextlib.contextmanager
def _tap_cache_directory(cache_directory: Path | None, request: TapRequest | None) -> Iterator[Path | None]:
    # Taps are exported from the cache; with the cache disabled they pass through a temporary one.
    if request is None or cache_directory is not None:
        yield cache_directory
        return
    with tempfile.TemporaryDirectory(prefix="transferlab-taps-") as temporary:
        yield Path(temporary)


def _open_cache(cache_directory: Path | None, member: Member, engine_name: str):
    if cache_directory is None:
        return embedding_cache.DisabledCache()
    namespace = embedding_cache.namespace_key(
        backbone=member.identity, weights_identity=member.weights_identity, image_size=member.image_size, engine=engine_name
    )
    description = {"spec": member.spec, "name": member.name, "weights": member.weights_identity, "image_size": member.image_size, "engine": engine_name}
    return embedding_cache.EmbeddingCache(cache_directory, namespace, description=description)


@contextlib.contextmanager
def _conversion_directory(cache_directory: Path | None) -> Iterator[Path]:
    # Converted TFLite models live beside the embeddings; without a cache, in a temporary folder.
    if cache_directory is not None:
        yield cache_directory / "converted"
        return
    with tempfile.TemporaryDirectory(prefix="transferlab-converted-") as temporary:
        yield Path(temporary)


def _report(runs: list[MemberRun], rows_by_split: dict, items: list[Item], cache_directory: Path | None, seconds: float) -> dict:
    computed = sum(run.computed for run in runs)
    return {
        "stack": stack.describe([run.member for run in runs]),
        # A mapping by member name, not a list: `dvc exp show` and `dvc metrics diff` drop lists.
        "backbones": {
            run.member.name: {
                "spec": run.member.spec,
                "kind": run.member.kind,
                "alpha": run.member.alpha,
                "weights": run.member.weights_identity,
                "random_init": run.member.random_init,
                "image_size": run.member.image_size,
                "engine": run.engine,
                "engine_note": run.engine_note,
                "feature_dim": len(next(iter(run.vectors.values()))),
                "cache_hits": run.hits,
                "embedded": run.computed,
                "corrupt_entries_recomputed": run.corrupt,
                "engine_seconds": round(run.seconds, 3),
                "engine_images_per_second": round(run.measured_speed, 1) if run.measured_speed else None,
                "cache_bytes": run.cache_bytes,
            }
            for run in runs
        },
        "random_init": any(run.member.random_init for run in runs),
        "rows": {split: len(rows) for split, rows in rows_by_split.items()},
        "distinct_views": len(items),
        "embedded": computed,
        "cache_hits": sum(run.hits for run in runs),
        "cache": str(cache_directory) if cache_directory is not None else "disabled",
        "cache_bytes": sum(run.cache_bytes for run in runs),
        "seconds": round(seconds, 3),
        "images_per_second": round(computed / seconds, 1) if computed else None,
    }
