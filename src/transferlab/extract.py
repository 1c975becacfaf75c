"""extract_features: embeddings of every (image, recipe) by every backbone of the stack.

Each embedding comes from the embedding cache when it is there; the rest are computed with
images decoded and resized in a thread pool while the engine runs, one batch ahead, and each
batch is written to the cache as soon as it is done (a killed run resumes where it stopped).
Each image is decoded and resized once per input size, for every member that needs it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from transferlab import augment, embedding_cache, engines, images
from transferlab.stack import Member

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
VERIFICATION_IMAGES = 16  # real photos that a converted engine must reproduce Keras on


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
    sizes = sorted({member.image_size for member in members})
    for size in sizes:
        group = [entry for entry in active if entry.run.member.image_size == size]
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

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if self.engine is None:  # built on the first miss: a warm run never imports TensorFlow
            self.engine = self.choice.build()
        return self.engine.run(pixels)


def _fill_misses(group: list[_Active], items: list[Item], *, size: int, render_one, batch_size: int, threads: int) -> None:
    missing = [item for item in items if any(item.key not in entry.run.vectors for entry in group)]
    if not missing:
        return
    names = "+".join(entry.run.member.name for entry in group)
    progress = tqdm(total=len(missing), desc=f"embedding {names} @{size}px", unit="img", dynamic_ncols=True)
    for chunk, pixels in pixel_batches(missing, render_one=lambda item: render_one(item, size), batch_size=batch_size, threads=threads):
        for entry in group:
            run = entry.run
            wanted = [index for index, item in enumerate(chunk) if item.key not in run.vectors]
            if not wanted:
                continue
            started = time.perf_counter()
            vectors = entry.embed(pixels[wanted])
            run.seconds += time.perf_counter() - started
            new = {chunk[index].key: vector for index, vector in zip(wanted, vectors)}
            entry.cache.put_many(new)  # one transaction per batch: a killed run loses only this batch
            run.vectors.update(new)
            run.computed += len(new)
        progress.update(len(chunk))
    progress.close()


@dataclass
class FeatureSet:
    """The contents of one features file (see docs/DESIGN.md)."""

    arrays: dict[str, np.ndarray]


def assemble(rows: list[dict], runs: list[MemberRun], class_names: list[str]) -> FeatureSet:
    """Concatenates each row's member embeddings in stack order into one features file."""
    widths = [len(next(iter(run.vectors.values()))) if run.vectors else 0 for run in runs]
    offsets = np.cumsum([0, *widths[:-1]]).astype(np.int64)
    features = np.zeros((len(rows), sum(widths)), dtype=np.float32)
    for index, row in enumerate(rows):
        key = (row["sha256"], row["recipe"])
        features[index] = np.concatenate([run.vectors[key] for run in runs]) if runs else []
    label_index = {name: position for position, name in enumerate(class_names)}
    return FeatureSet(
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


def write_feature_files(directory: Path, feature_sets: dict[str, FeatureSet]) -> None:
    """Writes train/val/test .npz files into ``directory`` (the caller makes it atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, feature_set in feature_sets.items():
        np.savez(directory / f"{split}.npz", **feature_set.arrays)


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
) -> tuple[dict[str, FeatureSet], dict]:
    """Embeds every row of every split with the stack; returns features files and a report.

    Args:
        members: the resolved stack (transferlab.stack.resolve_members).
        rows_by_split: rows (path, label, sha256, recipe) of train (with augmented views), val, test.
        images_directory: where the rows' paths are relative to (data/raw/images).
        cache_directory: the embedding cache folder, or None to run without the cache.
        engine: auto, keras or tflite (for Keras members; TFLite members always run on LiteRT).
        batch_size: images per inference batch.
        threads: decoding threads.
        seed: seeds random-init backbones.
        max_image_pixels: decompression-bomb limit when decoding.
    """
    started = time.perf_counter()
    items = unique_items(rows_by_split)
    if not items:
        raise ValueError("the splits hold no images; check data/splits and the split params")
    render_one = lambda item, size: render(item, images_directory=images_directory, size=size, max_image_pixels=max_image_pixels)
    with _conversion_directory(cache_directory) as converted:
        runs = embed(
            members,
            items,
            open_cache=lambda member, engine_name: _open_cache(cache_directory, member, engine_name),
            choose_engine=lambda member, sample: _choose_engine(member, sample, engine, converted, seed),
            render_one=render_one,
            batch_size=batch_size,
            threads=threads,
        )
    class_names = sorted({row["label"] for rows in rows_by_split.values() for row in rows})
    feature_sets = {split: assemble(rows, runs, class_names) for split, rows in rows_by_split.items()}
    return feature_sets, _report(runs, rows_by_split, items, cache_directory, time.perf_counter() - started)


def _choose_engine(member: Member, sample, requested: str, converted: Path, seed: int) -> engines.ConvertedEngine:
    if member.kind == "tflite":
        note = "TFLite file runs on LiteRT" + (" (engine: keras does not apply to it)" if requested == "keras" else "")
        return engines.ConvertedEngine("tflite", lambda: engines.TFLiteEngine(member.path, tensor=member.tensor), {"reason": note})
    from transferlab import backbones

    build_model = lambda: backbones.build(
        backbones.get(member.name), alpha=member.alpha, weights=member.weights, image_size=member.image_size, seed=seed
    )
    return engines.choose_keras_engine(
        requested=requested,
        build_model=build_model,
        conversion_directory=converted,
        identity=f"{member.identity}|{member.weights_identity}|{member.image_size}",
        sample_pixels=sample,
    )


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
        "stack": "+".join(run.member.name for run in runs),
        "backbones": [
            {
                "name": run.member.name,
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
        ],
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
