"""The content-addressed embedding cache: arrays keyed by image content and view, never by path.

TF Hub's retrain.py called these "bottlenecks". One SQLite database per *namespace*, the sha256
of everything that changes the numbers (backbone spec, weights identity, input size, engine,
tap layer, cache format, and for TFLite engines the sha256 of the exact model bytes run), at
``<directory>/<namespace[:2]>/<namespace>.sqlite``. Inside, one row
per (image sha256, recipe) holds the array's raw bytes, dtype, shape and a blake2b digest that is
checked on every read: a row that fails the check is deleted, counted and reported as a miss, so
the caller recomputes it; it is never served.

Crash and concurrency safety come from SQLite itself: WAL journal, one transaction per
``put_many`` (a killed run loses at most the batch in flight), ``BEGIN IMMEDIATE`` plus a long
busy timeout so two processes filling one namespace wait for each other instead of failing, and
``INSERT OR REPLACE`` so they may write the same entries (with the same bytes) in any order. A
database file that is not readable SQLite is moved aside with a warning and a fresh one started.
A folder where no database can be kept (read-only, ``/proc``, a file in its place) raises
:class:`CacheUnavailable`, a ``ValueError`` with one line that names it; :func:`unusable_reason`
asks the same question up front, so a run can go on without the cache instead.

Values may be any numeric array: float32 pooled embeddings (5 KB for 1280 values) or float16
intermediate activations (38 KB for a 14x14x96 map). ``read_batches`` and ``export_memmap``
stream large sets batch by batch, never holding them all in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from transferlab.core import atomic, paths
from transferlab.features import cache_files

LOGGER = logging.getLogger(__name__)

# Part of every namespace key: bump it when the row layout or the digest changes, so old
# databases are left alone instead of misread.
CACHE_FORMAT_VERSION = 1
# Writers wait this long for each other; a batch commit takes milliseconds, so only a stuck
# process would exhaust it.
BUSY_TIMEOUT_SECONDS = 60.0
# Keys per SELECT: two bound variables each, well under SQLite's historical limit of 999.
KEYS_PER_QUERY = 400
# 16 KiB pages: a 38 KB activation map spans 3 pages instead of 10. Measured on 3670 maps:
# writes 1.4x faster than with 4 KiB pages, reads 1.1x, 1% more disk; 64 KiB pages would waste
# 40% of the disk on such maps. Only applies when a database is created.
PAGE_SIZE = 16384
DIGEST_BYTES = 16

Key = tuple[str, str]
_Result = TypeVar("_Result")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Primary SQLite result codes that mean "this file is damaged", not "try again".
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    sha256 TEXT NOT NULL,
    recipe TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    digest BLOB NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sha256, recipe)
);
"""


class _ForeignDatabase(Exception):
    """A readable SQLite file that is not this namespace's cache (wrong format or namespace)."""


class CacheUnavailable(ValueError):
    """The cache's folder or database cannot be used (not damaged: unwritable, missing, locked, full).

    A ``ValueError``, so a stage that cannot go on without the cache reports it in one line.
    """


def namespace_fields(
    *,
    backbone: str,
    weights_identity: str,
    image_size: int | Sequence[int],
    engine: str,
    tap: str = "",
    model_sha256: str = "",
) -> dict[str, Any]:
    """The validated fields a namespace key is made of (also a good ``description``).

    Args:
        backbone: Backbone spec, e.g. ``mobilenet_v2`` or ``tflite:...``.
        weights_identity: sha256 of the weights file, the official file name, or
            ``random-init-seed<N>``.
        image_size: Input size in pixels: one int for a square input, or (height, width).
        engine: The engine that computes the arrays, e.g. ``keras`` or ``tflite``.
        tap: Layer whose output is cached; empty for the backbone's pooled embedding.
        model_sha256: sha256 of the exact model bytes the engine runs (a converted or given
            TFLite file, after any rewrite); empty for Keras, whose weights identity already
            names its numbers. Rows computed by a damaged model so land in another namespace
            than the good model's. Left out of the key when empty, so Keras keys never changed.

    Returns:
        A dict with the normalized fields and the cache format version.

    Raises:
        ValueError: If a field is empty or the image size is not one or two positive ints.
    """
    for name, value in (("backbone", backbone), ("weights_identity", weights_identity), ("engine", engine)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"Embedding cache namespace needs a non-empty {name}; got {value!r}.")
    if not isinstance(tap, str):
        raise ValueError(f"Embedding cache tap must be a layer name or ''; got {tap!r}.")
    if model_sha256 != "" and not (isinstance(model_sha256, str) and _SHA256.fullmatch(model_sha256)):
        raise ValueError(f"Embedding cache model_sha256 must be 64 lowercase hex digits or ''; got {model_sha256!r}.")
    fields = {
        "backbone": backbone,
        "weights_identity": weights_identity,
        "image_size": _normalize_image_size(image_size),
        "engine": engine,
        "tap": tap,
        "format": CACHE_FORMAT_VERSION,
    }
    if model_sha256:
        fields["model_sha256"] = model_sha256
    return fields


def namespace_key(
    *,
    backbone: str,
    weights_identity: str,
    image_size: int | Sequence[int],
    engine: str,
    tap: str = "",
    model_sha256: str = "",
) -> str:
    """The sha256 hex digest of the canonical JSON of :func:`namespace_fields`.

    ``image_size=224`` and ``image_size=(224, 224)`` give the same key.
    """
    fields = namespace_fields(
        backbone=backbone,
        weights_identity=weights_identity,
        image_size=image_size,
        engine=engine,
        tap=tap,
        model_sha256=model_sha256,
    )
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _normalize_image_size(image_size: int | Sequence[int]) -> list[int]:
    sizes = [image_size, image_size] if isinstance(image_size, (int, np.integer)) else list(image_size)
    if len(sizes) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"Embedding cache image_size must be an int or (height, width); got {image_size!r}.")
    if min(sizes) < 1:
        raise ValueError(f"Embedding cache image_size must be positive; got {image_size!r}.")
    return [int(s) for s in sizes]


def cache_directory(cache_dir: str | os.PathLike = "") -> Path:
    """The cache folder for ``extract_features.cache_dir``.

    Empty means ``$TRANSFERLAB_CACHE_DIR`` or the user's cache directory; a relative path is
    resolved against the main repository root (see :mod:`transferlab.core.paths`).
    """
    if not str(cache_dir).strip():
        return paths.default_cache_directory()
    return paths.resolve_param_path(cache_dir)


def unusable_reason(directory: str | os.PathLike) -> str | None:
    """Why no embedding cache can be kept in ``directory``, or None when one can.

    Creates the folder if needed, then a small file and a small SQLite database in WAL mode
    (removed again): a read-only mount, ``/proc``, a file in the folder's place or a file
    system SQLite cannot lock all fail here, in a few milliseconds, before any work.
    """
    reason = paths.unwritable_reason(directory)
    if reason is not None:
        return reason
    probe = Path(directory) / f".sqlite-probe-{os.getpid()}-{secrets.token_hex(4)}.sqlite"
    try:
        connection = sqlite3.connect(probe, timeout=1.0, isolation_level=None)
        try:
            connection.execute("PRAGMA synchronous = OFF")  # a throwaway file: 1 ms instead of 10-50 ms of fsyncs
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("CREATE TABLE probe (value INTEGER)")
            connection.execute("INSERT INTO probe VALUES (1)")
        finally:
            connection.close()
    except sqlite3.Error as error:
        return f"SQLite cannot keep a database there: {error}"
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(f"{probe}{suffix}")
    return None


def database_path(directory: str | os.PathLike, namespace: str) -> Path:
    """Where a namespace's database lives: ``<directory>/<namespace[:2]>/<namespace>.sqlite``."""
    if not isinstance(namespace, str) or not _SHA256.fullmatch(namespace):
        raise ValueError(
            f"Embedding cache namespace must be 64 lowercase hex digits (from namespace_key); got {namespace!r}."
        )
    return Path(directory) / namespace[:2] / f"{namespace}.sqlite"


def open_cache(
    *,
    enabled: bool,
    cache_dir: str | os.PathLike,
    backbone: str,
    weights_identity: str,
    image_size: int | Sequence[int],
    engine: str,
    tap: str = "",
    model_sha256: str = "",
    extra_description: Mapping[str, Any] | None = None,
) -> EmbeddingCache | DisabledCache:
    """Opens the cache for one backbone identity, or a :class:`DisabledCache` when disabled.

    Args:
        enabled: ``extract_features.cache``; False gives a cache that stores nothing.
        cache_dir: ``extract_features.cache_dir`` (see :func:`cache_directory`).
        backbone, weights_identity, image_size, engine, tap, model_sha256: The namespace fields
            (see :func:`namespace_fields`).
        extra_description: More facts to record in the database's meta table (e.g. versions).

    Raises:
        CacheUnavailable: the folder cannot hold the database (see :func:`unusable_reason`).
    """
    identity = {
        "backbone": backbone,
        "weights_identity": weights_identity,
        "image_size": image_size,
        "engine": engine,
        "tap": tap,
        "model_sha256": model_sha256,
    }
    fields = namespace_fields(**identity)
    if not enabled:
        return DisabledCache()
    namespace = namespace_key(**identity)
    description = {**dict(extra_description or {}), **fields}
    return EmbeddingCache(cache_directory(cache_dir), namespace, description=description)


def check_key(key: Any) -> Key:
    """Validates a cache key: ``(image sha256 as 64 lowercase hex digits, recipe string)``."""
    if not isinstance(key, (tuple, list)) or len(key) != 2:
        raise ValueError(f"Embedding cache key must be (image sha256, recipe); got {key!r}.")
    sha256, recipe = key
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(
            f"Embedding cache key {key!r}: the first item must be the image's content sha256 "
            "(64 lowercase hex digits, as in index.csv), never a path."
        )
    if not isinstance(recipe, str):
        raise ValueError(f"Embedding cache key {key!r}: the recipe must be a string ('' for the original).")
    return (sha256, recipe)


def _digest(key: Key, dtype: str, shape: str, data: bytes) -> bytes:
    # The digest binds the bytes to their key, dtype and shape: a row whose data, header or key
    # was changed on disk fails the check.
    hasher = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in (key[0], key[1], dtype, shape):
        hasher.update(part.encode("utf-8") + b"\x00")
    hasher.update(data)
    return hasher.digest()


def _encode(key: Key, value: Any) -> tuple[str, str, str, str, bytes, bytes]:
    array = np.asarray(value)
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise ValueError(
            f"Embedding cache entry {key!r}: dtype {array.dtype} cannot be stored; use a plain numeric array."
        )
    dtype = array.dtype.str
    shape = json.dumps(list(array.shape))
    data = array.tobytes(order="C")
    return (key[0], key[1], dtype, shape, _digest(key, dtype, shape, data), data)


def _decode(key: Key, dtype: Any, shape: Any, digest: Any, data: Any) -> np.ndarray | None:
    """The stored array (a read-only view of ``data``), or None when the row fails its check."""
    if not all(isinstance(part, str) for part in (dtype, shape)) or not isinstance(data, bytes):
        return None
    if _digest(key, dtype, shape, data) != digest:
        return None
    try:
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))
    except (TypeError, ValueError):
        return None


def _is_corruption(error: BaseException) -> bool:
    if isinstance(error, _ForeignDatabase):
        return True
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    message = str(error).lower()  # Python 3.10 has no error codes
    return "malformed" in message or "not a database" in message


def _unique(keys: Iterable[Any]) -> list[Key]:
    return list(dict.fromkeys(check_key(key) for key in keys))


def _chunks(items: Sequence[_Result], size: int) -> Iterator[Sequence[_Result]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _enable_wal(connection: sqlite3.Connection) -> None:
    # Switching to WAL takes an exclusive lock and SQLite does not call the busy handler for
    # it: when two processes create the same database at once, retry until the busy timeout.
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            connection.execute("PRAGMA synchronous = OFF")  # a throwaway file: 1 ms instead of 10-50 ms of fsyncs
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return (status.st_dev, status.st_ino)


class EmbeddingCache:
    """One namespace's arrays, keyed by (image sha256, recipe), in a SQLite database.

    Counters (``hits``, ``misses``, ``writes``, ``corrupt``) add up over the object's life;
    ``moved_aside`` lists database files found corrupt and renamed. Safe to share between
    threads of one process and between processes.

    Args:
        directory: The cache folder (see :func:`cache_directory`).
        namespace: The key from :func:`namespace_key`.
        description: JSON-serializable facts about what the database holds (backbone, weights,
            ...), written to its ``meta`` table when the database is created.
    """

    enabled = True

    def __init__(self, directory: str | os.PathLike, namespace: str, *, description: Mapping[str, Any]) -> None:
        self.path = database_path(directory, namespace)
        self.namespace = namespace
        try:
            self._description = json.dumps(dict(description), sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Embedding cache description must be JSON-serializable: {error}") from error
        self.hits = self.misses = self.writes = self.corrupt = 0
        self.moved_aside: list[Path] = []
        self._lock = threading.RLock()
        self._identity: tuple[int, int] | None = None
        self._connection: sqlite3.Connection | None = None
        self._open()

    # -- opening, and recovering from a damaged file ------------------------------------------

    def _open(self) -> None:
        try:
            try:
                self._connection = self._connect()
            except (sqlite3.DatabaseError, _ForeignDatabase) as error:
                if not _is_corruption(error):
                    raise
                self._move_aside(error)
                self._connection = self._connect()
        except (sqlite3.Error, OSError) as error:  # not damage: the folder cannot hold a database
            raise self._unavailable(error) from error

    def _unavailable(self, error: BaseException) -> CacheUnavailable:
        return CacheUnavailable(
            f"the embedding cache database {self.path} cannot be used ({type(error).__name__}: {error}); "
            "make its folder writable, or set extract_features.cache_dir to another folder "
            "(or extract_features.cache: false)"
        )

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so each put_many is exactly one transaction.
        connection = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        self._identity = _file_identity(self.path)
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            _enable_wal(connection)
            # In WAL mode NORMAL never corrupts the database; a power cut may drop the last commits.
            connection.execute("PRAGMA synchronous = NORMAL")
            self._initialize(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _initialize(self, connection: sqlite3.Connection) -> None:
        with self._transaction(connection):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.executemany(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                [
                    ("format", str(CACHE_FORMAT_VERSION)),
                    ("namespace", self.namespace),
                    ("description", self._description),
                    ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                ],
            )
            meta = dict(connection.execute("SELECT name, value FROM meta WHERE name IN ('format', 'namespace')"))
        if meta != {"format": str(CACHE_FORMAT_VERSION), "namespace": self.namespace}:
            raise _ForeignDatabase(f"it holds namespace {meta.get('namespace')!r}, format {meta.get('format')!r}")

    def _move_aside(self, error: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for number in range(1, 1000):
            if not aside.exists():
                break
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{number}")
        # Another process may already have moved the damaged file and started a fresh one here:
        # only move the file this object opened.
        if self._identity is not None and _file_identity(self.path) != self._identity:
            LOGGER.warning("Embedding cache %s was replaced by another process after an error (%s)", self.path, error)
            return
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, aside)
            self.moved_aside.append(aside)
        for suffix in ("-wal", "-shm"):  # the journal belongs to the damaged file, not to a fresh one
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        LOGGER.warning(
            "Embedding cache database %s is unreadable (%s); moved it aside to %s and started a fresh one. "
            "Its entries will be recomputed; delete the moved file once you no longer need it.",
            self.path,
            error,
            aside.name,
        )

    def _guarded(self, operation: Callable[[sqlite3.Connection], _Result]) -> _Result:
        """Runs ``operation``; if the file turns out damaged, moves it aside and runs it again."""
        with self._lock:
            try:
                return operation(self._require_connection())
            except sqlite3.DatabaseError as error:
                if not _is_corruption(error):
                    raise self._unavailable(error) from error  # read-only, full, locked for too long
                self._connection.close()
                self._connection = None
                self._move_aside(error)
                self._open()
                return operation(self._require_connection())

    def _require_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError(f"Embedding cache {self.path} is closed; open a new EmbeddingCache to use it.")
        return self._connection

    @staticmethod
    @contextlib.contextmanager
    def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
        # transaction never fails half-way trying to upgrade a read lock another writer holds.
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    # -- reading --------------------------------------------------------------------------------

    def _select(self, connection: sqlite3.Connection, keys: Sequence[Key], columns: str) -> list[tuple]:
        rows: list[tuple] = []
        for chunk in _chunks(keys, KEYS_PER_QUERY):
            # CROSS JOIN keeps the key list as the outer loop: one index search per key
            # (a row-value IN would scan the whole table).
            values = ",".join(["(?, ?)"] * len(chunk))
            rows.extend(
                connection.execute(
                    f"WITH wanted(sha256, recipe) AS (VALUES {values}) SELECT {columns} FROM wanted "
                    "CROSS JOIN entries ON entries.sha256 = wanted.sha256 AND entries.recipe = wanted.recipe",
                    [part for key in chunk for part in key],
                )
            )
        return rows

    def _fetch(self, connection: sqlite3.Connection, keys: Sequence[Key]) -> dict[Key, np.ndarray]:
        found: dict[Key, np.ndarray] = {}
        damaged: list[tuple[str, str, bytes]] = []
        columns = "entries.sha256, entries.recipe, dtype, shape, digest, data"
        for sha256, recipe, dtype, shape, digest, data in self._select(connection, keys, columns):
            array = _decode((sha256, recipe), dtype, shape, digest, data)
            if array is None:
                damaged.append((sha256, recipe, digest))
            else:
                found[(sha256, recipe)] = array
        if damaged:
            self._discard(connection, damaged)
        return found

    def _discard(self, connection: sqlite3.Connection, damaged: list[tuple[str, str, bytes]]) -> None:
        LOGGER.warning(
            "Embedding cache %s: %d entries failed their checksum (first: %s, recipe %r); "
            "deleted them, they will be recomputed",
            self.path,
            len(damaged),
            damaged[0][0],
            damaged[0][1],
        )
        with self._transaction(connection):
            # Matching the digest too leaves alone a row another process has rewritten meanwhile.
            connection.executemany("DELETE FROM entries WHERE sha256 = ? AND recipe = ? AND digest IS ?", damaged)
        self.corrupt += len(damaged)

    def get_many(self, keys: Iterable[Key]) -> dict[Key, np.ndarray]:
        """Returns the verified arrays for the keys that are cached; absent keys are misses.

        Rows that fail their checksum are deleted, counted in ``corrupt`` and reported as misses.

        Args:
            keys: (image sha256, recipe) pairs; duplicates are looked up once.

        Returns:
            A dict from key to a fresh, writable array with the stored dtype and shape.
        """
        wanted = _unique(keys)
        found = self._lookup(wanted)
        return {key: found[key].copy() for key in wanted if key in found}

    def _lookup(self, wanted: Sequence[Key]) -> dict[Key, np.ndarray]:
        with self._lock:
            found = self._guarded(lambda connection: self._fetch(connection, wanted))
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def missing(self, keys: Iterable[Key]) -> list[Key]:
        """The keys (unique, in order) without a row, found without reading any array bytes.

        A present but corrupt row counts as present here; ``get_many`` or ``read_batch`` catch it.
        """
        wanted = _unique(keys)
        rows = self._guarded(lambda connection: self._select(connection, wanted, "entries.sha256, entries.recipe"))
        present = set(rows)
        return [key for key in wanted if key not in present]

    def read_batch(self, keys: Sequence[Key]) -> np.ndarray:
        """Stacks the arrays of ``keys``, in order, into one array of shape (len(keys), *shape).

        Raises:
            KeyError: If any key is not cached (or its row was corrupt).
            ValueError: If the keys are empty or their arrays differ in dtype or shape.
        """
        ordered = [check_key(key) for key in keys]
        if not ordered:
            raise ValueError("Embedding cache read_batch needs at least one key.")
        wanted = _unique(ordered)
        found = self._lookup(wanted)
        absent = [key for key in wanted if key not in found]
        if absent:
            raise KeyError(
                f"{len(absent)} of {len(wanted)} entries are not in the embedding cache {self.path} "
                f"(first: sha256 {absent[0][0]}, recipe {absent[0][1]!r}); run extract_features to fill it"
            )
        return _stack(ordered, found, self.path)

    def read_batches(self, keys: Sequence[Key], batch_size: int) -> Iterator[np.ndarray]:
        """Yields ``read_batch`` of consecutive slices of ``keys``: streams a large set in order.

        Only one batch is in memory at a time, so a Keras ``PyDataset`` can serve maps far
        larger than memory.

        Raises:
            ValueError: If ``batch_size`` is not a positive int or a key is malformed.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"Embedding cache read_batches needs a positive batch_size; got {batch_size!r}.")
        ordered = [check_key(key) for key in keys]
        return (self.read_batch(chunk) for chunk in _chunks(ordered, int(batch_size)))

    def export_memmap(
        self, keys: Sequence[Key], path: str | os.PathLike, *, dtype: Any = None, batch_size: int = 256
    ) -> Path:
        """Writes the arrays of ``keys``, in order, to a ``.npy`` file, batch by batch.

        The file is written through a memory map and renamed into place when complete, so memory
        use stays at one batch however large the set. ``np.load(path, mmap_mode="r")`` reads it.

        Args:
            keys: The entries, in row order.
            path: The ``.npy`` file to write.
            dtype: Dtype of the file; defaults to the stored dtype.
            batch_size: Entries read per query.

        Returns:
            The path written.
        """
        ordered = [check_key(key) for key in keys]
        if not ordered:
            raise ValueError(f"Embedding cache export_memmap to {path} needs at least one key.")
        target = Path(path)
        batches = self.read_batches(ordered, batch_size)
        with atomic.atomic_path(target) as temporary:
            table = None
            for start, batch in zip(range(0, len(ordered), batch_size), batches):
                if table is None:
                    shape = (len(ordered), *batch.shape[1:])
                    file_dtype = batch.dtype if dtype is None else dtype
                    table = np.lib.format.open_memmap(temporary, mode="w+", dtype=file_dtype, shape=shape)
                elif batch.shape[1:] != table.shape[1:]:
                    raise ValueError(
                        f"Embedding cache export to {target}: entry shapes differ ({batch.shape[1:]} vs "
                        f"{table.shape[1:]}); export one tap at a time."
                    )
                table[start : start + len(batch)] = batch
            table.flush()
            del table  # close the map before the rename
        return target

    # -- writing --------------------------------------------------------------------------------

    def put_many(self, items: Mapping[Key, Any]) -> None:
        """Stores arrays under their keys, replacing existing entries, in ONE transaction.

        Either every item of the call is stored or none is, so a killed run loses at most the
        batch in flight.

        Raises:
            ValueError: If a key is malformed or a value is not a plain numeric array.
        """
        rows = [_encode(check_key(key), value) for key, value in items.items()]
        if not rows:
            return

        def write(connection: sqlite3.Connection) -> None:
            with self._transaction(connection):
                connection.executemany(
                    "INSERT OR REPLACE INTO entries (sha256, recipe, dtype, shape, digest, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )

        with self._lock:
            self._guarded(write)
            self.writes += len(rows)

    # -- facts ----------------------------------------------------------------------------------

    def __contains__(self, key: Any) -> bool:
        return not self.missing([key])

    def __len__(self) -> int:
        return self._guarded(lambda connection: connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def description(self) -> dict[str, Any]:
        """The description stored when the database was created."""
        row = self._guarded(
            lambda connection: connection.execute("SELECT value FROM meta WHERE name = 'description'").fetchone()
        )
        return json.loads(row[0]) if row else {}

    def disk_bytes(self) -> int:
        """Bytes on disk: the database file plus its write-ahead log."""
        return sum(
            Path(f"{self.path}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if Path(f"{self.path}{suffix}").exists()
        )

    def counters(self) -> dict[str, int]:
        """Hits, misses, writes and corrupt rows so far (for metrics/extract_features.json)."""
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "corrupt": self.corrupt}

    def record_speed(self, images: int, seconds: float) -> None:
        """Remembers the engine's measured speed, so a run served from the cache can still report it.

        The record carries a checksum (:func:`transferlab.features.cache_files.record_checksum`),
        checked by :meth:`measured_images_per_second`.
        """
        if images <= 0 or seconds <= 0:
            return
        speed = {"images": int(images), "seconds": float(seconds)}
        value = json.dumps({**speed, cache_files.CHECKSUM_FIELD: cache_files.record_checksum(speed)})

        def write(connection: sqlite3.Connection) -> None:
            with self._transaction(connection):
                connection.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('speed', ?)", (value,))

        self._guarded(write)

    def measured_images_per_second(self) -> float | None:
        """The engine speed recorded by the last run that embedded images here, if any.

        A record that is damaged (unparsable, no checksum or a wrong one, not positive) is
        deleted with a warning and reported as None; the next run that embeds images records it anew.
        """
        row = self._guarded(
            lambda connection: connection.execute("SELECT value FROM meta WHERE name = 'speed'").fetchone()
        )
        if not row:
            return None
        speed, problem = _parse_speed(row[0])
        if problem is None:
            return speed["images"] / speed["seconds"]
        LOGGER.warning(
            "Embedding cache %s: its remembered engine speed %s; ignoring it (the next run that embeds "
            "images here measures it again)",
            self.path,
            problem,
        )

        def forget(connection: sqlite3.Connection) -> None:
            with self._transaction(connection):
                connection.execute("DELETE FROM meta WHERE name = 'speed' AND value IS ?", (row[0],))

        self._guarded(forget)
        return None

    def close(self) -> None:
        """Closes the database (the last connection folds the write-ahead log into it)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r})"


def _parse_speed(value: Any) -> tuple[dict, str | None]:
    """The speed record and None, or ``({}, what is wrong with it)``."""
    try:
        speed = json.loads(value)
    except (TypeError, ValueError) as error:
        return {}, f"is not valid JSON ({error})"
    if not isinstance(speed, dict):
        return {}, "is not a JSON object"
    if cache_files.CHECKSUM_FIELD not in speed:
        return {}, "has no checksum (damaged, or written by an older transferlab)"
    if speed[cache_files.CHECKSUM_FIELD] != cache_files.record_checksum(speed):
        return {}, "does not match its checksum"
    images, seconds = speed.get("images"), speed.get("seconds")
    if not all(isinstance(number, (int, float)) and number > 0 for number in (images, seconds)):
        return {}, "holds no positive images and seconds"
    return speed, None


def _stack(keys: Sequence[Key], found: Mapping[Key, np.ndarray], path: Path) -> np.ndarray:
    first = found[keys[0]]
    stacked = np.empty((len(keys), *first.shape), dtype=first.dtype)
    for row, key in enumerate(keys):
        array = found[key]
        if array.shape != first.shape or array.dtype != first.dtype:
            raise ValueError(
                f"Embedding cache {path}: entries differ ({array.dtype}{array.shape} for {key[0]} vs "
                f"{first.dtype}{first.shape}); read arrays of one shape per batch."
            )
        stacked[row] = array
    return stacked


class DisabledCache:
    """The cache interface with nothing behind it (``extract_features.cache: false``).

    Every lookup is a miss and every write is dropped, so the caller computes everything.
    """

    enabled = False
    path = None

    def __init__(self) -> None:
        self.hits = self.misses = self.writes = self.corrupt = 0
        self.moved_aside: list[Path] = []

    def get_many(self, keys: Iterable[Key]) -> dict[Key, np.ndarray]:
        """Returns nothing; every key counts as a miss."""
        self.misses += len(_unique(keys))
        return {}

    def missing(self, keys: Iterable[Key]) -> list[Key]:
        """Every key."""
        return _unique(keys)

    def put_many(self, items: Mapping[Key, Any]) -> None:
        """Drops the items (after checking their keys, like the real cache)."""
        for key in items:
            check_key(key)

    def read_batch(self, keys: Sequence[Key]) -> np.ndarray:
        """Always raises: nothing is cached."""
        raise KeyError("the embedding cache is disabled (extract_features.cache: false); nothing can be read from it")

    def read_batches(self, keys: Sequence[Key], batch_size: int) -> Iterator[np.ndarray]:
        """Always raises: nothing is cached."""
        return self.read_batch(keys)

    def export_memmap(self, keys: Sequence[Key], path: str | os.PathLike, **kwargs: Any) -> Path:
        """Always raises: nothing is cached."""
        return self.read_batch(keys)

    def __contains__(self, key: Any) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def description(self) -> dict[str, Any]:
        """Empty: a disabled cache holds nothing."""
        return {}

    def record_speed(self, images: int, seconds: float) -> None:
        """Nothing to remember it in."""

    def measured_images_per_second(self) -> None:
        """Nothing was recorded."""
        return None

    def disk_bytes(self) -> int:
        """Zero: a disabled cache holds nothing."""
        return 0

    def counters(self) -> dict[str, int]:
        """Misses only."""
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "corrupt": self.corrupt}

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> DisabledCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_member_cache(directory: str | os.PathLike, member: Any, choice: Any, *, tap: str = "") -> EmbeddingCache:
    """Opens the namespace of one stack member run by one engine (cut at layer ``tap`` for taps).

    Args:
        directory: the cache folder.
        member: a :class:`transferlab.backbones.stack.Member` (spec, name, identity, weights, size).
        choice: the :class:`transferlab.features.engine_choice.ConvertedEngine` that computes the rows.
        tap: the layer whose activations are cached, or ``""`` for embeddings.

    Raises:
        CacheUnavailable: the folder cannot hold the database.
    """
    namespace = namespace_key(
        backbone=member.identity,
        weights_identity=member.weights_identity,
        image_size=member.image_size,
        engine=choice.name,
        tap=tap,
        model_sha256=choice.content_sha256,
    )
    description = {
        "spec": member.spec,
        "name": member.name,
        "weights": member.weights_identity,
        "image_size": member.image_size,
        "engine": choice.name,
        **({"tap": tap} if tap else {}),
        "model_sha256": choice.content_sha256,
    }
    return EmbeddingCache(directory, namespace, description=description)
