"""extract_features: embeddings of every (image, recipe) by every backbone of the stack.

Each embedding comes from the embedding cache when it is there; the rest are computed with
images decoded and resized in a thread pool while the engine runs, one batch ahead (see
:mod:`transferlab.features.decode`), and each batch is written to the cache as soon as it is done
(a killed run resumes where it stopped). Each image is decoded and resized once per input size,
for every member that needs it. Which engine runs each member is chosen by
:mod:`transferlab.features.engine_choice`.

Tap activations for fine-tuning are not made here but by the extract_taps stage
(:mod:`transferlab.features.extract_taps`), so that changing the head never reruns this stage.

The cache only ever saves work, so a cache folder that cannot be used (read-only, ``/proc``, a
file in its place, a disk that fills up during the run) never stops the stage: one warning
names the folder and why, and the run goes on computing what it would have read, with the
same features (see :func:`usable_cache_directory`).

The run never holds its embeddings: each batch goes to the cache as it is made, and the features
files are assembled from the cache a chunk of rows at a time (:class:`EmbeddingRows`), so the
stage's memory does not grow with the embeddings of 10^5-10^6 images. Without a cache folder the
rows go to a temporary cache that is deleted with the run; only rows that no cache could take
(a disk that filled up) are held in memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import stack
from transferlab.backbones.stack import Member
from transferlab.core import paths
from transferlab.features import (
    cache_remote,
    cpu,
    decode,
    embedding_cache,
    engine_choice,
    executor_ray,
    files,
    mirror,
)

LOGGER = logging.getLogger(__name__)
Key = tuple[str, str]  # (image sha256, recipe): an embedding's key in the cache
LOOKUP_ROWS = 4096  # keys looked up in the cache at once: the warm run's memory is one such chunk of rows
EXECUTORS = ("local", "ray")


class EmbeddingRows:
    """One member's embeddings in this run, read back a chunk of rows at a time, never held whole.

    They live in the member's embedding cache; only those the cache could not take (it failed
    mid-run: a full disk) are held here, in ``held``.
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.held: dict[Key, np.ndarray] = {}

    def read(self, keys: Sequence[Key]) -> np.ndarray:
        """The embeddings of ``keys``, in order, as one (len(keys), width) array.

        Raises:
            ValueError: a row is in neither place (the cache changed under the run: run the stage again).
        """
        if not self.held:
            return self._from_cache(keys)
        stored = [key for key in keys if key not in self.held]
        from_cache = dict(zip(stored, self._from_cache(stored), strict=True)) if stored else {}
        return np.stack([self.held[key] if key in self.held else from_cache[key] for key in keys])

    def _from_cache(self, keys: Sequence[Key]) -> np.ndarray:
        try:
            return self.cache.read_batch(keys)
        except (KeyError, embedding_cache.CacheUnavailable) as error:
            reason = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ValueError(
                f"an embedding of this run is no longer in its cache ({reason}): was the cache pruned or "
                "damaged while the stage ran? Run extract_features again; it embeds only what is missing"
            ) from None


@dataclass
class MemberRun:
    """What happened to one member: its engine, cache counters, and where its embeddings are."""

    member: Member
    engine: str
    rows: EmbeddingRows | None = None  # every view's embedding, read back by key
    width: int = 0  # the embedding's length
    hits: int = 0
    computed: int = 0
    corrupt: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    engine_note: str = ""
    measured_speed: float | None = None  # engine images/s, this run's or remembered by the cache
    choice: dict = field(default_factory=dict)  # engine_choice.ConvertedEngine.summary(): what was chosen, measured
    # Reads the rows' features by key: ``rows.read``, or the mean of each view's and its mirror
    # image's with mirror averaging (set by :func:`extract_features`).
    read: Callable[[Sequence[Key]], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.read is None and self.rows is not None:
            self.read = self.rows.read

    @classmethod
    def of_vectors(cls, member: Any, engine: str, vectors: dict[Key, np.ndarray]) -> MemberRun:
        """A run whose embeddings are the given ones, held in memory (tests and small callers)."""
        rows = EmbeddingRows(embedding_cache.DisabledCache())
        rows.held = dict(vectors)
        width = len(next(iter(vectors.values()))) if vectors else 0
        return cls(member=member, engine=engine, rows=rows, width=width)


@dataclass
class SplitRows:
    """One split's rows (path, label, sha256, recipe) as columns, read from a stream of row mappings.

    A dict per row costs about 450 bytes at 200k rows; four columns of shared strings (labels
    interned) cost about half, and the features file's string columns are written from them
    without building a numpy copy.
    """

    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    recipes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, rows: Iterable[Mapping[str, str]] | SplitRows) -> SplitRows:
        """The rows as columns (``recipe`` may be missing: the original image, ``""``)."""
        if isinstance(rows, SplitRows):
            return rows
        columns = cls()
        for row in rows:
            columns.paths.append(row["path"])
            columns.labels.append(sys.intern(row["label"]))
            columns.sha256.append(row["sha256"])
            columns.recipes.append(row.get("recipe") or "")  # "" (most rows) is one shared object
        return columns

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self, start: int = 0, stop: int | None = None) -> list[Key]:
        """The cache keys, (sha256, recipe), of rows ``start`` to ``stop`` (default: all)."""
        return list(zip(self.sha256[start:stop], self.recipes[start:stop], strict=True))


def unique_items(rows_by_split: Mapping[str, SplitRows | Iterable[Mapping[str, str]]]) -> list[decode.Item]:
    """Every distinct (sha256, recipe) once, in a stable order (split, then row order).

    Each split's rows are :class:`SplitRows` (extract_features) or row mappings (extract_taps).
    """
    seen: set[Key] = set()
    items = []
    for split in files.SPLITS:
        rows = SplitRows.of(rows_by_split.get(split, ()))
        for sha256, recipe, path in zip(rows.sha256, rows.recipes, rows.paths, strict=True):
            if (sha256, recipe) not in seen:
                seen.add((sha256, recipe))
                items.append(decode.Item(sha256, recipe, path))
    return items


def embed(
    members: list[Member],
    items: list[decode.Item],
    *,
    open_cache: Callable[[Member, engine_choice.ConvertedEngine], embedding_cache.EmbeddingCache],
    choose_engine: Callable[[Member, Callable[[], np.ndarray]], engine_choice.ConvertedEngine],
    render_one: Callable[[decode.Item, int], np.ndarray],
    batch_size: int,
    threads: int,
    extra_jobs: Sequence[Any] = (),
    fill: Callable[[list, list[decode.Item], int], None] | None = None,
) -> list[MemberRun]:
    """Embeds ``items`` with every member: cache hits first, then the misses, batch by batch.

    Args:
        members: the stack.
        items: the distinct views to embed.
        open_cache: (member, chosen engine) -> an open cache for that member's namespace (keyed by
            the engine's name and the sha256 of the model bytes it runs).
        choose_engine: (member, sample pixels) -> the engine to run (may convert, once).
        render_one: (item, size) -> uint8 pixels.
        batch_size: images per inference batch.
        threads: decoding threads.
        extra_jobs: more work on the same decoded pixels (a :class:`transferlab.features.tap_jobs.TapJob`):
            each has ``size``, ``label``, ``wants(item)`` and ``consume(items, pixels)``.
        fill: (jobs of one input size, items, size) -> None, making every job get the views it
            wants, elsewhere (the Ray executor: :mod:`transferlab.features.executor_ray`); None:
            here, with ``render_one`` in ``threads`` threads (:func:`transferlab.features.decode.fill_misses`).
    """
    active = []
    for member in members:
        choice = choose_engine(member, engine_choice.verification_pixels(items, render_one, member.image_size))
        cache = open_cache(member, choice)
        run = MemberRun(
            member=member, engine=choice.name, engine_note=choice.verdict.get("reason", ""), choice=choice.summary()
        )
        entry = _Active(run, cache, choice)
        entry.look_up(items)
        active.append(entry)
    jobs = [*active, *extra_jobs]
    for size in sorted({job.size for job in jobs}):
        group = [job for job in jobs if job.size == size]
        if fill is not None:
            fill(group, items, size)
        else:
            decode.fill_misses(group, items, size=size, render_one=render_one, batch_size=batch_size, threads=threads)
    for entry in active:
        entry.finish()
    return [entry.run for entry in active]


@dataclass
class _Active:
    """One member while it embeds: its cache, the keys it still has to embed, its engine (built on demand)."""

    run: MemberRun
    cache: Any  # an embedding_cache.EmbeddingCache, or a DisabledCache once it failed
    choice: engine_choice.ConvertedEngine
    engine: object = None
    wanted: set = field(default_factory=set)  # the views (Items) not in the cache: embedded by this run
    writable: bool = True  # False once the cache failed a write: the rest of the rows are held in memory

    def __post_init__(self) -> None:
        self.run.rows = EmbeddingRows(self.cache)
        self.run.read = self.run.rows.read
        self.writable = getattr(self.cache, "enabled", False)  # a disabled cache drops what it is given

    @property
    def size(self) -> int:
        return self.run.member.image_size

    @property
    def label(self) -> str:
        return self.run.member.name

    def look_up(self, items: Sequence[decode.Item]) -> None:
        """Finds which of the (distinct) views the cache holds (verifying each row's checksum), a chunk at a time.

        A row that fails its checksum is deleted by the cache and embedded again, as a miss. The
        misses are kept as the views themselves (a set entry each, no key tuple).
        """
        wanted: set[decode.Item] = set()
        try:
            for start in range(0, len(items), LOOKUP_ROWS):
                chunk = items[start : start + LOOKUP_ROWS]
                found = self.cache.get_many([item.key for item in chunk])
                if found and not self.run.width:
                    self.run.width = len(next(iter(found.values())))
                wanted.update(item for item in chunk if item.key not in found)
        except embedding_cache.CacheUnavailable as error:  # e.g. locked by a stuck process: compute instead
            self.give_up_cache(error)
            wanted = set(items)
        self.wanted = wanted
        self.run.hits, self.run.corrupt = len(items) - len(wanted), self.cache.corrupt

    def wants(self, item: decode.Item) -> bool:
        return item in self.wanted

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if self.engine is None:  # built on the first miss: a warm run never imports TensorFlow
            self.engine = self.choice.build()
        return self.engine.run(pixels)

    def consume(self, chunk: list[decode.Item], pixels: np.ndarray) -> None:
        started = time.perf_counter()
        vectors = self.embed(pixels)
        self.store(chunk, vectors, time.perf_counter() - started)

    def store(self, chunk: list[decode.Item], vectors: np.ndarray, seconds: float) -> None:
        """Writes a batch's embeddings (computed here or by a Ray worker) to the cache, or holds them."""
        run = self.run
        run.seconds += seconds
        new = {item.key: vector for item, vector in zip(chunk, vectors, strict=True)}
        if new and not run.width:
            run.width = len(vectors[0])
        if self.writable:
            try:
                self.cache.put_many(new)  # one transaction per batch: a killed run loses only this batch
            except embedding_cache.CacheUnavailable as error:  # e.g. the disk filled up: go on without it
                self.stop_writing(error)
        if not self.writable:
            run.rows.held.update({key: np.array(vector) for key, vector in new.items()})
        run.computed += len(new)

    def stop_writing(self, error: Exception) -> None:
        """Warns once; the cache stays open for reading the rows it took, the rest are held in memory."""
        LOGGER.warning("%s goes on without the embedding cache, storing nothing more: %s", self.label, error)
        self.writable = False

    def give_up_cache(self, error: Exception) -> None:
        """Warns once and goes on without the cache: it only ever saves work."""
        self.stop_writing(error)
        with contextlib.suppress(Exception):
            self.cache.close()
        self.cache = self.run.rows.cache = embedding_cache.DisabledCache()

    def finish(self) -> None:
        """Remembers the engine's speed in the cache and reads back the figures; the cache stays open for reading."""
        if not self.writable:
            return
        try:
            self.cache.record_speed(self.run.computed, self.run.seconds)
            self.run.measured_speed = self.cache.measured_images_per_second()
            self.run.cache_bytes = self.cache.disk_bytes()
        except (embedding_cache.CacheUnavailable, OSError) as error:
            self.stop_writing(error)


def assemble(
    rows: SplitRows | Iterable[Mapping[str, str]],
    runs: list[MemberRun],
    class_names: list[str],
    *,
    storage_dtype: str = "float32",
    chunk_rows: int = files.CHUNK_ROWS,
) -> files.FeatureSet:
    """Concatenates each row's member embeddings in stack order into one features file.

    The matrix is not built here: the result holds it as :class:`transferlab.features.files.RowChunks`
    that the writer streams into the file ``chunk_rows`` rows at a time, so the stage never holds
    a second copy of the embeddings.

    Args:
        rows: the split's rows (path, label, sha256, recipe), as :class:`SplitRows` or row mappings.
        runs: each member's run: its width and ``read`` (keys -> their embeddings, in order).
        class_names: the class names (labels index them).
        storage_dtype: ``float32``, or ``float16`` (half the bytes; refused if a value would overflow it).
        chunk_rows: rows per chunk of the matrix.
    """
    rows = SplitRows.of(rows)
    widths = [run.width for run in runs]
    offsets = np.cumsum([0, *widths[:-1]]).astype(np.int64)

    def float32_chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(rows), chunk_rows):
            part = rows.keys(start, start + chunk_rows)
            blocks = [run.read(part).astype(np.float32, copy=False) for run in runs]
            yield np.hstack(blocks) if blocks else np.zeros((len(part), 0), dtype=np.float32)

    if storage_dtype == "float16":
        largest = max((float(np.abs(chunk).max()) for chunk in float32_chunks() if chunk.size), default=0.0)
        if largest > float(np.finfo(np.float16).max):
            raise ValueError(
                f"an embedding value ({largest:.4g}) exceeds float16's range; "
                "set extract_features.storage_dtype: float32"
            )
    matrix = files.RowChunks((len(rows), sum(widths)), np.dtype(storage_dtype), float32_chunks)
    label_index = {name: position for position, name in enumerate(class_names)}
    return files.FeatureSet(
        {
            "labels": np.array([label_index[label] for label in rows.labels], dtype=np.int32),
            "class_names": np.array(class_names, dtype=str),
            # Lists, not numpy arrays (4 bytes a character): the writer streams them into the file.
            "paths": rows.paths,
            "sha256": rows.sha256,
            "recipes": rows.recipes,
            "block_specs": np.array([run.member.spec for run in runs], dtype=str),
            "block_names": np.array([run.member.name for run in runs], dtype=str),
            "block_weights": np.array([run.member.weights_identity for run in runs], dtype=str),
            "block_engines": np.array([run.engine for run in runs], dtype=str),
            "block_widths": np.array(widths, dtype=np.int64),
            "block_offsets": offsets,
        },
        matrix,
    )


def extract_features(
    *,
    members: list[Member],
    rows_by_split: Mapping[str, SplitRows | Iterable[Mapping[str, str]]],
    images_directory: Path,
    cache_directory: Path | None,
    engine: str,
    batch_size: int,
    threads: int,
    seed: int,
    max_image_pixels: int,
    mirror_average: bool = False,
    executor: str = "local",
    ray_workers: int = 0,
    cache_remote_url: str = "",
    storage_dtype: str = "float32",
    write_to: Path | None = None,
) -> tuple[dict[str, files.FeatureSet], dict]:
    """Embeds every row of every split with the stack; returns features files and a report.

    The embeddings go to the cache as they are made and the files are assembled from it a chunk
    of rows at a time, so memory does not grow with them. With ``write_to`` the files are
    written there (``<split>.npz``) and the returned feature sets map them; without it they are
    built in memory (for small callers and tests).

    Args:
        members: the resolved stack (transferlab.backbones.stack.resolve_members).
        rows_by_split: rows (path, label, sha256, recipe) of train (with augmented views), val, test:
            :class:`SplitRows`, or row mappings (turned into them).
        images_directory: where the rows' paths are relative to (data/raw/images).
        cache_directory: the embedding cache folder, or None to run without the cache.
        engine: auto, keras or tflite. Keras members: see engine_choice.choose_keras_engine. TFLite
            members run on LiteRT: as given, or with auto a faster rewrite of the file chosen by
            measurement (see engine_choice.choose_tflite_engine).
        batch_size: images per inference batch.
        threads: decoding threads.
        seed: seeds random-init backbones.
        max_image_pixels: decompression-bomb limit when decoding (params ``download.max_image_pixels``).
        mirror_average: each row's embedding is the mean of its view's and that view's mirror
            image's (see :mod:`transferlab.features.mirror`); mirrored views are cached like any view.
        executor: where the misses are embedded: ``local`` (here, decoding in threads) or ``ray``
            (an actor pool, see :mod:`transferlab.features.executor_ray`; the same features).
        ray_workers: actors with ``executor: ray``; 0 = one per CPU Ray offers.
        storage_dtype: the features files' float type, ``float32`` or ``float16``.
        cache_remote_url: ``extract_features.cache_remote``: the shared cache each member's missing
            rows are fetched from, and its new rows pushed to (see :mod:`transferlab.features.cache_remote`).
        write_to: the folder to write the features files into, or None to return them in memory.
    """
    started = time.perf_counter()
    if executor not in EXECUTORS:
        raise ValueError(f"Unsupported executor '{executor}'; choose one of: {', '.join(EXECUTORS)}")
    if any(member.random_init for member in members):
        LOGGER.warning("weights: none -> RANDOM-INIT backbone(s): for tests only; every output says random_init")
    rows_by_split = {split: SplitRows.of(rows) for split, rows in rows_by_split.items()}
    items = unique_items(rows_by_split)
    if not items:
        raise ValueError("the splits hold no images; check data/splits and the split params")
    views = mirror.with_mirrors(items) if mirror_average else items

    def render_one(item: decode.Item, size: int) -> np.ndarray:
        return decode.render(item, images_directory=images_directory, size=size, max_image_pixels=max_image_pixels)

    requested_cache, cache_directory = cache_directory, usable_cache_directory(cache_directory)
    sync = cache_remote.open_sync(cache_remote_url, cache_directory)
    with contextlib.ExitStack() as resources:
        store = resources.enter_context(embedding_store(cache_directory))

        def open_cache(member: Member, choice: engine_choice.ConvertedEngine):
            cache = resources.enter_context(_open_cache(store, member, choice))  # open until the files are written
            if sync is not None:  # fills the local cache with the shared rows it lacks, before any lookup
                sync.pull(cache, [view.key for view in views], label=member.name)
            return cache

        builders = {member.name: backbone_builder(member, seed) for member in members if member.kind == "keras"}
        with conversion_directory(cache_directory) as converted:
            on_ray = functools.partial(  # absolute paths: Ray workers run in folders of their own
                _fill_on_ray,
                engine=engine,
                converted=Path(converted).resolve(),
                seed=seed,
                render=functools.partial(
                    decode.render, images_directory=Path(images_directory).resolve(), max_image_pixels=max_image_pixels
                ),
                batch_size=batch_size,
                threads=threads,
                workers=ray_workers,
            )
            if sync is not None:  # the team's converted models: everyone's rows then land in the same namespaces
                sync.adopt_conversions(members, converted, engine)
            runs = embed(
                members,
                views,
                open_cache=open_cache,
                choose_engine=lambda member, sample: _choose_engine(
                    member, sample, engine, converted, builders.get(member.name)
                ),
                render_one=render_one,
                batch_size=batch_size,
                threads=threads,
                fill=on_ray if executor == "ray" else None,
            )
        if sync is not None:  # the rows as embedded, before mirror averaging replaces them
            for run in runs:
                sync.push(run.member.name, run.rows.read)
            sync.push_conversions(members, converted, engine)
        if cache_directory is None:  # a temporary store, not a cache: it keeps nothing
            for run in runs:
                run.cache_bytes = 0
        if mirror_average:
            for run in runs:
                run.read = mirror.averaging(run.rows.read)
        class_names = sorted({label for rows in rows_by_split.values() for label in set(rows.labels)})
        feature_sets = {
            split: assemble(rows, runs, class_names, storage_dtype=storage_dtype)
            for split, rows in rows_by_split.items()
        }
        # Written (or, for callers that keep them, built in memory) while the caches are open.
        feature_sets = _written(write_to, feature_sets) if write_to is not None else _in_memory(feature_sets)
    report = _report(runs, rows_by_split, views, cache_directory, time.perf_counter() - started)
    if requested_cache is not None and cache_directory is None:
        report["cache"] = f"unusable: {requested_cache}"
    if sync is None:
        cache_remote.add_local_only(report)
    else:
        sync.add_to_report(report)
    return feature_sets, report


def _fill_on_ray(
    group: list[_Active], views: list[decode.Item], size: int, *, engine: str, converted: Path, seed: int, **options
) -> None:
    """The Ray executor's fill: each job's engine rebuilt in the actors by :func:`worker_engine`."""
    factories = [
        functools.partial(
            worker_engine, job.run.member, engine, converted, seed, job.choice.name, job.choice.content_sha256
        )
        for job in group
    ]
    executor_ray.fill_misses(group, views, size=size, factories=factories, **options)


def worker_engine(member: Member, requested: str, converted: Path, seed: int, name: str, content_sha256: str) -> Any:
    """Builds, in a Ray worker, the engine the driver chose for ``member``: loaded, never chosen again.

    The driver's verdict and converted model are read from the conversion folder ``converted``
    (nothing is converted or measured here); the engine must have the driver's ``name`` and run
    bytes of its ``content_sha256``, so workers can never place other features under its cache key.
    """

    def no_verdict() -> np.ndarray:  # asked for photos only when there is something to convert or measure
        raise ValueError(
            f"a Ray worker found no engine verdict for {member.name} in {converted}; every worker must see the "
            "driver's cache folder (set extract_features.cache_dir to a shared file system), then run again"
        )

    build_model = backbone_builder(member, seed) if member.kind == "keras" else None
    choice = _choose_engine(member, no_verdict, requested, converted, build_model)
    if (choice.name, choice.content_sha256) != (name, content_sha256):
        raise ValueError(
            f"a Ray worker chose engine {choice.name} {choice.content_sha256[:12]} for {member.name}, not the "
            f"driver's {name} {content_sha256[:12]} (the conversion folder {converted} changed during the run); "
            "run again"
        )
    return choice.build()


def backbone_builder(member: Member, seed: int) -> Callable[[], Any]:
    """Builds the member's Keras model on the first call, then returns that same model."""
    from transferlab.backbones import registry

    built: list = []

    def build() -> Any:
        if not built:
            entry = registry.get(member.name)
            built.append(
                registry.build(
                    entry, alpha=member.alpha, weights=member.weights, image_size=member.image_size, seed=seed
                )
            )
        return built[0]

    return build


def _choose_engine(
    member: Member, sample, requested: str, converted: Path, build_model: Callable[[], Any] | None
) -> engine_choice.ConvertedEngine:
    if member.kind == "tflite":  # the file as given, or a faster rewrite chosen by measurement
        return engine_choice.choose_tflite_engine(
            requested=requested,
            path=member.path,
            tensor=member.tensor,
            sha256=member.weights_identity,
            conversion_directory=converted,
            sample_pixels=sample,
        )
    return engine_choice.choose_keras_engine(
        requested=requested,
        build_model=build_model,
        conversion_directory=converted,
        identity=engine_choice.conversion_identity(member),
        sample_pixels=sample,
        choose_batch=True,
    )


def usable_cache_directory(cache_directory: Path | None) -> Path | None:
    """``cache_directory`` if an embedding cache can be kept there, else None (with one warning).

    Working without the cache gives the same features, only slower, so an unusable folder
    (read-only, ``/proc``, a file in its place) is reported and skipped, never fatal.
    """
    if cache_directory is None:
        return None
    reason = embedding_cache.unusable_reason(cache_directory)
    if reason is None:
        return cache_directory
    LOGGER.warning(
        "The embedding cache folder %s cannot be used (%s); running without the cache: every embedding is "
        "computed and none is remembered. Set extract_features.cache_dir to a writable folder "
        "(or extract_features.cache: false to run without it quietly)",
        cache_directory,
        reason,
    )
    return None


def _in_memory(feature_sets: dict[str, files.FeatureSet]) -> dict[str, files.FeatureSet]:
    """The feature sets with their matrices built in memory (read from the caches, which close next)."""
    return {
        split: files.FeatureSet({**feature_set.arrays, "features": feature_set.rows().materialize()})
        for split, feature_set in feature_sets.items()
    }


def _written(directory: Path, feature_sets: dict[str, files.FeatureSet]) -> dict[str, files.FeatureSet]:
    """Writes the features files into ``directory``; returns the feature sets with their files' matrices mapped."""
    files.write_feature_files(directory, feature_sets)
    return {
        split: files.FeatureSet(
            dict(feature_set.arrays), files.RowChunks.of(files.map_matrix(directory / f"{split}.npz"))
        )
        for split, feature_set in feature_sets.items()
    }


@contextlib.contextmanager
def embedding_store(cache_directory: Path | None) -> Iterator[Path | None]:
    """Where the run's embeddings go: the cache folder, else a temporary one deleted with the run.

    Without a cache the embeddings still go to disk (a temporary cache that remembers nothing),
    so that the run never holds them in memory. None where no temporary folder can be made:
    then they are held in memory.
    """
    if cache_directory is not None:
        yield cache_directory
        return
    try:
        temporary = tempfile.TemporaryDirectory(prefix="transferlab-embeddings-")
    except OSError as error:
        LOGGER.warning("No temporary folder for the run's embeddings (%s); holding them in memory", error)
        yield None
        return
    with temporary as folder:
        yield Path(folder)


def _open_cache(cache_directory: Path | None, member: Member, choice: engine_choice.ConvertedEngine):
    if cache_directory is None:
        return embedding_cache.DisabledCache()
    try:
        return embedding_cache.open_member_cache(cache_directory, member, choice)
    except embedding_cache.CacheUnavailable as error:
        LOGGER.warning("%s; embedding %s without the cache", error, member.name)
        return embedding_cache.DisabledCache()


@contextlib.contextmanager
def conversion_directory(cache_directory: Path | None) -> Iterator[Path]:
    """The folder for converted models and saved backbones: ``<cache>/converted``, else a temporary one."""
    # Converted TFLite models live beside the embeddings; without a cache (or when the cache's
    # converted/ cannot be written), in a temporary folder: converting again costs seconds.
    if cache_directory is not None:
        converted = cache_directory / "converted"
        reason = paths.unwritable_reason(converted)
        if reason is None:
            yield converted
            return
        LOGGER.warning(
            "The conversion folder %s cannot be used (%s); converting into a temporary folder", converted, reason
        )
    with tempfile.TemporaryDirectory(prefix="transferlab-converted-") as temporary:
        yield Path(temporary)


def _report(
    runs: list[MemberRun], rows_by_split: dict, items: list[decode.Item], cache_directory: Path | None, seconds: float
) -> dict:
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
                "engine_choice": run.choice,
                "feature_dim": run.width,
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
        "cpu": cpu.current().as_dict(),  # engine verdicts hold for this CPU only (transferlab.features.cpu)
        "rows": {split: len(rows) for split, rows in rows_by_split.items()},
        "distinct_views": len(items),
        "embedded": computed,
        "cache_hits": sum(run.hits for run in runs),
        "cache": str(cache_directory) if cache_directory is not None else "disabled",
        "cache_bytes": sum(run.cache_bytes for run in runs),
        "seconds": round(seconds, 3),
        "images_per_second": round(computed / seconds, 1) if computed else None,
    }


def log_report(report: dict) -> None:
    """Logs the stage's summary of a report: the stack's counts and speed."""
    speed = report["images_per_second"]
    LOGGER.info(
        "%s: %d embedded, %d cache hits, %.1f s%s",
        report["stack"],
        report["embedded"],
        report["cache_hits"],
        report["seconds"],
        f" ({speed} images/s)" if speed is not None else " (nothing to embed)",
    )
