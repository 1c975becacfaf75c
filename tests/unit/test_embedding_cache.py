"""The embedding cache: content keys, exact round trips, corruption, concurrency, kill-resume, streaming."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from transferlab.features import embedding_cache

MAP_SHAPE = (14, 14, 96)  # a MobileNetV2 block_12_add tap, as cached for fine-tuning


def _key(index: int, recipe: str = "") -> tuple[str, str]:
    return (hashlib.sha256(f"image-{index}".encode()).hexdigest(), recipe)


def _value(index: int, shape=(8,), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(index).standard_normal(shape).astype(dtype)


def _namespace(**changes) -> str:
    fields = {"backbone": "mobilenet_v2", "weights_identity": "a" * 64, "image_size": 224, "engine": "keras"}
    return embedding_cache.namespace_key(**{**fields, **changes})


@pytest.fixture()
def cache(tmp_path):
    with embedding_cache.EmbeddingCache(tmp_path, _namespace(), description={"backbone": "mobilenet_v2"}) as opened:
        yield opened


# The same key and value functions as above, for child processes (they cannot import this file).
_CHILD_PRELUDE = r"""
import hashlib, sys
import numpy as np
from transferlab.features import embedding_cache
def _key(index, recipe=""):
    return (hashlib.sha256(f"image-{index}".encode()).hexdigest(), recipe)
def _value(index, shape=(8,), dtype=np.float32):
    return np.random.default_rng(index).standard_normal(shape).astype(dtype)
"""


def _run_child(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_PRELUDE + script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- namespaces and keys ------------------------------------------------------------------------


def test_namespace_key_is_stable_and_every_field_counts():
    base = _namespace()
    assert base == _namespace(image_size=(224, 224))
    # Pinned: a different key orphans every cache on disk, so a change here must be deliberate.
    assert base == "f0da119cc04afe4fb72857b5ef7b02366765cd0a9f4cfe59947aa51d292628f5"
    variants = [
        _namespace(backbone="mobilenet"),
        _namespace(weights_identity="b" * 64),
        _namespace(image_size=160),
        _namespace(image_size=(224, 192)),
        _namespace(engine="tflite"),
        _namespace(tap="block_12_add"),
    ]
    assert len({base, *variants}) == 1 + len(variants)


@pytest.mark.parametrize(
    "changes",
    [{"backbone": ""}, {"engine": " "}, {"weights_identity": None}, {"image_size": 0}, {"image_size": "224"}],
)
def test_namespace_key_rejects_bad_fields(changes):
    with pytest.raises(ValueError, match="Embedding cache"):
        _namespace(**changes)


def test_namespaces_live_in_separate_database_files(tmp_path):
    keras_namespace, tflite_namespace = _namespace(), _namespace(engine="tflite")
    with embedding_cache.EmbeddingCache(tmp_path, keras_namespace, description={"engine": "keras"}) as keras_cache:
        keras_cache.put_many({_key(1): _value(1)})
        assert keras_cache.path == tmp_path / keras_namespace[:2] / f"{keras_namespace}.sqlite"
    with embedding_cache.EmbeddingCache(tmp_path, tflite_namespace, description={"engine": "tflite"}) as tflite_cache:
        assert tflite_cache.get_many([_key(1)]) == {}
        assert tflite_cache.path != keras_cache.path
    # A human (or sqlite3 on the command line) can tell what a file holds.
    with sqlite3.connect(keras_cache.path) as connection:
        meta = dict(connection.execute("SELECT name, value FROM meta"))
    assert meta["namespace"] == keras_namespace and '"engine": "keras"' in meta["description"]


@pytest.mark.parametrize("key", [("daisy/1.jpg", ""), (_key(1)[0].upper(), ""), (_key(1)[0], None), _key(1)[0]])
def test_keys_are_content_hashes_never_paths(cache, key):
    with pytest.raises(ValueError, match="sha256|recipe"):
        cache.put_many({key: _value(1)})


def test_object_arrays_are_rejected(cache):
    with pytest.raises(ValueError, match="dtype object"):
        cache.put_many({_key(1): np.array(["a", None], dtype=object)})


# -- round trips --------------------------------------------------------------------------------


def test_hit_after_miss(cache):
    assert cache.get_many([_key(1)]) == {}
    assert _key(1) not in cache
    cache.put_many({_key(1): _value(1)})
    assert _key(1) in cache and len(cache) == 1
    np.testing.assert_array_equal(cache.get_many([_key(1)])[_key(1)], _value(1))
    assert cache.counters() == {"hits": 1, "misses": 1, "writes": 1, "corrupt": 0}


@pytest.mark.parametrize(
    "value",
    [
        _value(1, (1280,), np.float32),
        _value(2, MAP_SHAPE, np.float16),
        np.arange(12, dtype=np.uint8).reshape(3, 4).T,  # not C-contiguous
        np.array(7, dtype=np.int64),  # 0-d
        _value(3, (2, 3), np.dtype(">f4")),  # big-endian
        np.zeros((0, 5), dtype=np.float32),
    ],
    ids=["float32-embedding", "float16-map", "transposed-uint8", "scalar", "big-endian", "empty"],
)
def test_arrays_come_back_identical(tmp_path, value):
    namespace = _namespace()
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as writer:
        writer.put_many({_key(1): value})
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as reader:
        restored = reader.get_many([_key(1)])[_key(1)]
    assert restored.dtype == value.dtype and restored.shape == value.shape
    assert restored.tobytes() == value.tobytes()
    restored[...] = 0  # callers get their own writable copy


def test_recipes_are_separate_entries_and_put_replaces(cache):
    cache.put_many({_key(1): _value(1), _key(1, '{"flip":true}'): _value(2)})
    cache.put_many({_key(1): _value(3)})
    found = cache.get_many([_key(1), _key(1, '{"flip":true}')])
    np.testing.assert_array_equal(found[_key(1)], _value(3))
    np.testing.assert_array_equal(found[_key(1, '{"flip":true}')], _value(2))
    assert len(cache) == 2


def test_get_many_over_many_query_chunks(cache):
    cache.put_many({_key(index): _value(index) for index in range(0, 2000, 2)})
    wanted = [_key(index) for index in range(2000)] + [_key(4)]  # a duplicate is looked up once
    found = cache.get_many(wanted)
    assert sorted(found) == sorted(_key(index) for index in range(0, 2000, 2))
    assert all(np.array_equal(found[_key(index)], _value(index)) for index in range(0, 2000, 2))
    assert (cache.hits, cache.misses) == (1000, 1000)
    assert cache.missing(wanted) == [_key(index) for index in range(1, 2000, 2)]


# -- corruption ---------------------------------------------------------------------------------


def _flip_byte(blob: bytes) -> bytes:
    return blob[:5] + bytes([blob[5] ^ 0x01]) + blob[6:]


@pytest.mark.parametrize(
    "column, damage",
    [
        ("data", _flip_byte),
        ("data", lambda blob: blob[: len(blob) // 2]),
        ("shape", lambda shape: "[4, 4]"),  # same bytes, still reshapes: only the digest can tell
        ("dtype", lambda dtype: "<i4"),  # likewise
        ("digest", _flip_byte),
    ],
    ids=["flipped-byte", "truncated", "shape", "dtype", "digest"],
)
def test_corrupt_row_is_not_served_but_counted_and_recomputed(tmp_path, caplog, column, damage):
    namespace = _namespace()
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as writer:
        writer.put_many({_key(index): _value(index, (16,)) for index in range(3)})
        path = writer.path
    with sqlite3.connect(path) as connection:
        (stored,) = connection.execute(f"SELECT {column} FROM entries WHERE sha256 = ?", (_key(1)[0],)).fetchone()
        connection.execute(f"UPDATE entries SET {column} = ? WHERE sha256 = ?", (damage(stored), _key(1)[0]))
    reopened = embedding_cache.EmbeddingCache(tmp_path, namespace, description={})
    with reopened as reader, caplog.at_level(logging.WARNING):
        found = reader.get_many([_key(index) for index in range(3)])
        assert sorted(found) == sorted([_key(0), _key(2)])
        assert reader.counters() == {"hits": 2, "misses": 1, "writes": 0, "corrupt": 1}
        assert len(reader) == 2 and _key(1) not in reader  # deleted, so the next run recomputes it
        assert "failed their checksum" in caplog.text
        reader.put_many({_key(1): _value(1, (16,))})
        np.testing.assert_array_equal(reader.get_many([_key(1)])[_key(1)], _value(1, (16,)))


def test_read_batch_never_serves_a_corrupt_row(tmp_path):
    namespace = _namespace()
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as writer:
        writer.put_many({_key(index): _value(index, MAP_SHAPE, np.float16) for index in range(4)})
        path = writer.path
    with sqlite3.connect(path) as connection:
        (stored,) = connection.execute("SELECT data FROM entries WHERE sha256 = ?", (_key(2)[0],)).fetchone()
        connection.execute("UPDATE entries SET data = ? WHERE sha256 = ?", (_flip_byte(stored), _key(2)[0]))
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as reader:
        with pytest.raises(KeyError, match="run extract_features"):
            reader.read_batch([_key(index) for index in range(4)])
        assert reader.corrupt == 1 and len(reader) == 3


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path, caplog):
    namespace = _namespace()
    path = embedding_cache.database_path(tmp_path, namespace)
    path.parent.mkdir(parents=True)
    garbage = b"this is not SQLite " * 500
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING), embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as cache:
        assert len(cache.moved_aside) == 1
        aside = cache.moved_aside[0]
        assert aside.name.startswith(f"{path.name}.corrupt-") and aside.read_bytes() == garbage
        assert "moved it aside" in caplog.text
        cache.put_many({_key(1): _value(1)})
        assert _key(1) in cache


def test_a_damaged_database_found_mid_run_is_moved_aside(tmp_path):
    namespace = _namespace()
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as writer:
        writer.put_many({_key(index): _value(index, MAP_SHAPE, np.float16) for index in range(100)})
        path = writer.path
    os.truncate(path, path.stat().st_size * 4 // 10)  # header and schema intact, most pages gone
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as cache:
        found = cache.get_many([_key(index) for index in range(100)])
        assert len(found) < 100 and len(cache.moved_aside) == 1
        cache.put_many({_key(0): _value(0)})
        assert len(cache) == 1 + len(found)


def test_another_namespaces_file_is_moved_aside(tmp_path):
    first, second = _namespace(), _namespace(engine="tflite")
    with embedding_cache.EmbeddingCache(tmp_path, first, description={}) as cache:
        cache.put_many({_key(1): _value(1)})
    target = embedding_cache.database_path(tmp_path, second)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(cache.path.read_bytes())
    with embedding_cache.EmbeddingCache(tmp_path, second, description={}) as misplaced:
        assert len(misplaced.moved_aside) == 1 and _key(1) not in misplaced


# -- processes ----------------------------------------------------------------------------------

_WRITER = r"""
import pathlib, time
directory, namespace, start, stop, go = sys.argv[1:]
start, stop = int(start), int(stop)
while not pathlib.Path(go).exists():
    time.sleep(0.002)
with embedding_cache.EmbeddingCache(directory, namespace, description={"writer": start}) as cache:
    for first in range(start, stop, 10):
        batch = range(first, min(first + 10, stop))
        cache.put_many({_key(index): _value(index, (14, 14, 96), np.float16) for index in batch})
        assert len(cache.get_many([_key(index) for index in batch])) == len(batch)
print(cache.counters())
"""


def test_two_processes_filling_one_namespace_at_once(tmp_path):
    namespace, go = _namespace(), tmp_path / "go"
    # Overlapping key sets, started together on a database neither finds: creation races too.
    writers = [_run_child(_WRITER, tmp_path, namespace, start, start + 300, go) for start in (0, 150)]
    go.touch()
    for writer in writers:
        stdout, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr
        assert "'writes': 300" in stdout
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as cache:
        found = cache.get_many([_key(index) for index in range(450)])
        assert len(cache) == 450 and cache.corrupt == 0
        assert all(np.array_equal(found[_key(index)], _value(index, MAP_SHAPE, np.float16)) for index in range(450))


_FILLER = r"""
import contextlib, time
directory, namespace, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
BATCH, TOTAL = 100, 1000
original = embedding_cache.EmbeddingCache._transaction
transactions = []

@contextlib.contextmanager
def pausing(connection):
    # Holds the transaction open after its inserts (3.8 MB, more than SQLite's page cache, so
    # uncommitted pages spill into the write-ahead log), just before COMMIT.
    with original(connection):
        yield
        transactions.append(1)
        if len(transactions) == pause_at:
            print("paused", flush=True)
            time.sleep(120)

embedding_cache.EmbeddingCache._transaction = staticmethod(pausing)
with embedding_cache.EmbeddingCache(directory, namespace, description={}) as cache:
    todo = set(cache.missing([_key(index) for index in range(TOTAL)]))
    indexes = [index for index in range(TOTAL) if _key(index) in todo]
    for first in range(0, len(indexes), BATCH):
        batch = indexes[first : first + BATCH]
        cache.put_many({_key(index): _value(index, (14, 14, 96), np.float16) for index in batch})
        print("committed", len(batch), flush=True)
"""


def test_a_killed_run_keeps_complete_batches_and_resumes(tmp_path):
    namespace = _namespace()
    # Transaction 1 creates the schema; 2.. are batches of 100, so 4 batches commit before the kill.
    filler = _run_child(_FILLER, tmp_path, namespace, 6)
    lines = []
    for line in filler.stdout:
        lines.append(line.strip())
        if line.startswith("paused"):
            break
    assert lines == ["committed 100"] * 4 + ["paused"], filler.stderr.read() if filler.poll() else lines
    filler.send_signal(signal.SIGKILL)
    filler.communicate(timeout=30)

    keys = [_key(index) for index in range(1000)]
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as cache:
        assert cache.missing(keys) == keys[400:]  # exactly the four complete batches
        assert sum(1 for _ in cache.read_batches(keys[:400], 64)) == 7 and cache.corrupt == 0

    resumed = _run_child(_FILLER, tmp_path, namespace, 0)
    stdout, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, stderr
    assert stdout.split("\n")[:-1] == ["committed 100"] * 6  # only what was missing
    with embedding_cache.EmbeddingCache(tmp_path, namespace, description={}) as cache:
        assert len(cache) == 1000
        for first, batch in enumerate(cache.read_batches(keys, 250)):
            expected = [_value(index, MAP_SHAPE, np.float16) for index in range(first * 250, first * 250 + 250)]
            np.testing.assert_array_equal(batch, np.stack(expected))
        assert cache.corrupt == 0


# -- streaming large activations ----------------------------------------------------------------


def test_read_batches_streams_in_key_order_without_loading_everything(cache):
    count, batch_size = 300, 10  # 11 MB of float16 maps, 376 KB per batch
    cache.put_many({_key(index): _value(index, MAP_SHAPE, np.float16) for index in range(count)})
    order = list(reversed(range(count)))  # any order, not the insertion order
    expected = [
        hashlib.sha256(
            np.stack([_value(index, MAP_SHAPE, np.float16) for index in order[first : first + batch_size]])
        ).hexdigest()
        for first in range(0, count, batch_size)
    ]
    tracemalloc.start()
    try:
        batches = cache.read_batches([_key(index) for index in order], batch_size)
        assert tracemalloc.get_traced_memory()[0] < 200_000  # nothing read before the first batch
        received = []
        for batch in batches:
            assert batch.shape == (batch_size, *MAP_SHAPE) and batch.dtype == np.float16
            received.append(hashlib.sha256(batch).hexdigest())
            del batch
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == expected
    total = count * np.prod(MAP_SHAPE) * 2
    assert peak < total / 8, f"peak {peak} bytes while streaming {total} bytes"


def test_read_batches_last_batch_and_missing_keys(cache):
    cache.put_many({_key(index): _value(index) for index in range(25)})
    assert [len(batch) for batch in cache.read_batches([_key(index) for index in range(25)], 10)] == [10, 10, 5]
    with pytest.raises(KeyError, match="1 of 2 entries"):
        cache.read_batch([_key(0), _key(99)])
    with pytest.raises(ValueError, match="batch_size"):
        cache.read_batches([_key(0)], 0)


def test_read_batch_rejects_mixed_shapes(cache):
    cache.put_many({_key(0): _value(0, (4,)), _key(1): _value(1, (5,))})
    with pytest.raises(ValueError, match="entries differ"):
        cache.read_batch([_key(0), _key(1)])


def test_export_memmap_writes_a_npy_in_key_order(cache, tmp_path):
    cache.put_many({_key(index): _value(index, MAP_SHAPE, np.float16) for index in range(30)})
    keys = [_key(index) for index in (5, 0, 29, 7)]
    written = cache.export_memmap(keys, tmp_path / "maps.npy", dtype=np.dtype("float32"), batch_size=3)
    table = np.load(written, mmap_mode="r")
    assert table.dtype == np.float32 and table.shape == (4, *MAP_SHAPE)
    expected = np.stack([_value(index, MAP_SHAPE, np.float16) for index in (5, 0, 29, 7)]).astype(np.float32)
    np.testing.assert_array_equal(table, expected)
    with pytest.raises(KeyError):
        cache.export_memmap([_key(0), _key(99)], tmp_path / "partial.npy")
    assert not (tmp_path / "partial.npy").exists()  # complete or absent


# -- helpers and the disabled cache -------------------------------------------------------------


def test_disk_bytes_grow_with_entries(cache):
    empty = cache.disk_bytes()
    cache.put_many({_key(index): _value(index, MAP_SHAPE, np.float16) for index in range(20)})
    assert cache.disk_bytes() - empty >= 20 * np.prod(MAP_SHAPE) * 2


def test_disabled_cache_stores_nothing():
    disabled = embedding_cache.DisabledCache()
    disabled.put_many({_key(1): _value(1)})
    assert disabled.get_many([_key(1), _key(2)]) == {} and _key(1) not in disabled and len(disabled) == 0
    assert disabled.counters() == {"hits": 0, "misses": 2, "writes": 0, "corrupt": 0}
    assert disabled.missing([_key(1)]) == [_key(1)] and disabled.disk_bytes() == 0
    with pytest.raises(KeyError, match="disabled"):
        disabled.read_batches([_key(1)], 4)
    with pytest.raises(ValueError):
        disabled.put_many({"daisy/1.jpg": _value(1)})


def test_cache_directory_rule(tmp_path, monkeypatch):
    assert embedding_cache.cache_directory("") == Path(os.environ["TRANSFERLAB_CACHE_DIR"])
    monkeypatch.setenv("TRANSFERLAB_ROOT", str(tmp_path))
    assert embedding_cache.cache_directory("cache/embeddings") == tmp_path / "cache" / "embeddings"
    assert embedding_cache.cache_directory(tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_open_cache(tmp_path):
    fields = {"backbone": "mobilenet_v2", "weights_identity": "w", "image_size": 96, "engine": "tflite"}
    assert isinstance(embedding_cache.open_cache(enabled=False, cache_dir="", **fields), embedding_cache.DisabledCache)
    with embedding_cache.open_cache(enabled=True, cache_dir=str(tmp_path), tap="block_12_add", **fields) as cache:
        assert cache.path.is_relative_to(tmp_path) and cache.namespace == embedding_cache.namespace_key(
            tap="block_12_add", **fields
        )
        assert cache.description()["image_size"] == [96, 96] and cache.description()["tap"] == "block_12_add"


def test_a_closed_cache_says_so(cache):
    cache.close()
    with pytest.raises(ValueError, match="closed"):
        cache.get_many([_key(1)])


# -- the remembered engine speed is checked like every row -----------------------------------


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ("Expecting nothing", "is not valid JSON"),
        ('{"images": 100, "seconds": 2.0}', "has no checksum"),
        (None, "does not match its checksum"),
    ],
)
def test_a_damaged_speed_record_is_named_ignored_and_forgotten(cache, caplog, stored, problem):
    cache.record_speed(100, 2.0)
    assert cache.measured_images_per_second() == 50.0
    if stored is None:  # a changed figure under the old checksum
        stored = cache._connection.execute("SELECT value FROM meta WHERE name = 'speed'").fetchone()[0]
        stored = stored.replace('"images": 100', '"images": 900')
    cache._connection.execute("UPDATE meta SET value = ? WHERE name = 'speed'", (stored,))
    with caplog.at_level(logging.WARNING):
        assert cache.measured_images_per_second() is None
    assert str(cache.path) in caplog.text and f"remembered engine speed {problem}" in caplog.text
    assert "measures it again" in caplog.text
    caplog.clear()
    assert cache.measured_images_per_second() is None and caplog.text == "", "warned once, then forgotten"
    cache.record_speed(10, 1.0)
    assert cache.measured_images_per_second() == 10.0
