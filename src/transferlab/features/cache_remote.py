"""The shared embedding cache: immutable, content-addressed shards on S3-compatible storage.

The local SQLite cache (:mod:`transferlab.features.embedding_cache`) stays the fast layer; this
module fills it from a bucket before embedding and adds this run's rows to the bucket after, so
a teammate, a CI runner or a queued experiment on another machine never embeds again what
someone already paid for. Layout under ``s3://bucket/prefix`` (``extract_features.cache_remote``),
made for many writers and no coordination (no locks, no object is ever rewritten with other bytes):

- ``<namespace>/shards/<sha256>.shard``: rows of one namespace, named by the sha256 of the
  object's bytes. A shard is self-describing (magic line, header JSON with the namespace, dtype,
  per-row shape and the sorted keys, then the rows' raw bytes), and its bytes depend only on
  its rows: two writers pushing the same rows write the same object under the same name.
- ``<namespace>/manifests/<sha256>.json``: the shard's index (keys, rows, dtype, shape, size,
  the namespace's description), a checksummed record (:mod:`transferlab.features.cache_files`),
  written *after* its shard. Readers only look at shards that have a manifest, so a writer
  killed between the two leaves an orphan that nobody reads.

- ``converted/<key>/<sha256>.tflite`` and ``.json``: Keras backbones' TFLite conversions and
  their verdicts. Conversion is not byte-reproducible and a namespace holds the sha256 of the
  bytes run, so the oldest shared conversion is adopted by every machine (see
  :meth:`RunSync.adopt_conversions`); otherwise no two machines would share a row on ``engine: auto``.

A reader lists the manifests of a namespace only when its local cache misses rows (a warm run
makes no request at all), keeps a local copy of each manifest (they never change), fetches the
fewest shards that hold the missing keys, checks each shard's sha256 against its name and its
header against the manifest, and inserts the rows with ``EmbeddingCache.put_many`` (which digests
them again). A torn or tampered shard is skipped with a warning and its rows are computed here,
then pushed as a new shard. After embedding, the rows the remote lacks are pushed as a few
shards of at most :data:`SHARD_MAX_BYTES`.

The remote is an accelerator, never a requirement: endpoint and credentials come from the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), timeouts are short
and retries few, and the first failure (server down, wrong endpoint or key, missing bucket)
gives ONE warning naming the remote and why; the run goes on with the local cache only. s3fs is
imported only when a remote is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core import atomic
from transferlab.features import cache_files, embedding_cache, engine_choice

LOGGER = logging.getLogger(__name__)

# The remote of extract_features.cache_remote when that param is empty (CI sets it from a secret,
# so params.yaml stays the same for everyone).
ENVIRONMENT_VARIABLE = "TRANSFERLAB_CACHE_REMOTE"
SHARD_MAGIC = b"transferlab embedding shard 1\n"
MANIFEST_FORMAT = 1
# 64 MiB: about 13,000 pooled 1280-wide float32 rows; one GET each, few enough objects to list.
SHARD_MAX_BYTES = 64 * 2**20
# A dead or unreachable server costs seconds, not minutes: short connect timeout, two attempts.
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 60
ATTEMPTS = 2
# Rows per put_many transaction while importing a shard.
ROWS_PER_TRANSACTION = 2000
_HEADER_LENGTH_BYTES = 8
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?P<prefix>(/[^/\s]+)*)/?")

Key = embedding_cache.Key


class ShardError(ValueError):
    """A shard or manifest that must not be used: damaged, truncated, or not what its name says."""


# -- where ---------------------------------------------------------------------------------------


def remote_url(setting: str) -> str:
    """The remote to use: ``extract_features.cache_remote``, else ``$TRANSFERLAB_CACHE_REMOTE``, else "".

    Raises:
        ValueError: the value is not ``s3://bucket[/prefix]``.
    """
    url = (setting or os.environ.get(ENVIRONMENT_VARIABLE, "")).strip()
    if url:
        root_path(url)  # validates
    return url.rstrip("/")


def root_path(url: str) -> str:
    """``bucket/prefix`` (s3fs's path) of an ``s3://bucket[/prefix]`` URL.

    Raises:
        ValueError: not an S3 URL with a valid bucket name.
    """
    match = _URL.fullmatch(url.strip())
    if not match:
        raise ValueError(
            f"the shared embedding cache must be s3://BUCKET[/PREFIX] (a bucket name of 3-63 lowercase letters, "
            f"digits, dots and hyphens); got {url!r}. Set extract_features.cache_remote (or ${ENVIRONMENT_VARIABLE})"
        )
    return f"{match['bucket']}{match['prefix']}"


def shard_path(root: str, namespace: str, sha256: str) -> str:
    """The object holding a shard: ``<root>/<namespace>/shards/<sha256>.shard``."""
    return f"{root}/{namespace}/shards/{sha256}.shard"


def manifest_path(root: str, namespace: str, sha256: str) -> str:
    """The manifest of a shard: ``<root>/<namespace>/manifests/<sha256>.json``."""
    return f"{root}/{namespace}/manifests/{sha256}.json"


def local_manifest_directory(cache_directory: str | os.PathLike, url: str, namespace: str) -> Path:
    """Where the local copies of a remote namespace's manifests live, in the local cache folder.

    ``<cache>/remote/<sha256(url)[:16]>/<namespace>/``: per remote, since a manifest says that a
    shard exists *there*.
    """
    remote_id = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return Path(cache_directory) / "remote" / remote_id / namespace


# -- the shard format ------------------------------------------------------------------------------


def encode_shards(
    namespace: str, rows: Mapping[Key, Any], *, max_bytes: int = SHARD_MAX_BYTES
) -> list[tuple[bytes, list[Key]]]:
    """Packs rows into shards of at most ``max_bytes`` of row data each (at least one row each).

    Rows are sorted by key and grouped by dtype and shape, so the same rows always give the
    same bytes (and so the same object name).

    Returns:
        ``(shard bytes, its keys)`` per shard.
    """
    groups: dict[tuple[str, tuple[int, ...]], list[tuple[Key, np.ndarray]]] = {}
    for key in sorted(embedding_cache.check_key(key) for key in rows):
        array = np.ascontiguousarray(rows[key])
        groups.setdefault((array.dtype.str, array.shape), []).append((key, array))
    shards = []
    for (dtype, shape), items in sorted(groups.items()):
        row_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        per_shard = max(1, max_bytes // row_bytes)
        for start in range(0, len(items), per_shard):
            chunk = items[start : start + per_shard]
            keys = [key for key, _ in chunk]
            header = {"namespace": namespace, "dtype": dtype, "shape": list(shape), "keys": [list(k) for k in keys]}
            header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
            data = b"".join(array.tobytes(order="C") for _, array in chunk)
            content = SHARD_MAGIC + len(header_bytes).to_bytes(_HEADER_LENGTH_BYTES, "little") + header_bytes + data
            shards.append((content, keys))
    return shards


def decode_shard(content: bytes, *, sha256: str, namespace: str) -> dict[Key, np.ndarray]:
    """The rows of a shard, after checking its bytes against its name and its header.

    Raises:
        ShardError: the bytes' sha256 is not ``sha256`` (torn, truncated, tampered), or the shard
            is malformed or belongs to another namespace.
    """
    actual = cache_files.content_sha256(content)
    if actual != sha256:
        raise ShardError(f"the sha256 of its bytes is {actual[:16]}..., not its name (damaged or tampered)")
    if not content.startswith(SHARD_MAGIC):
        raise ShardError("it does not start with the shard format's magic line")
    start = len(SHARD_MAGIC) + _HEADER_LENGTH_BYTES
    length = int.from_bytes(content[len(SHARD_MAGIC) : start], "little")
    try:
        header = json.loads(content[start : start + length].decode("utf-8"))
        keys = [embedding_cache.check_key(tuple(key)) for key in header["keys"]]
        dtype, shape = np.dtype(header["dtype"]), tuple(int(size) for size in header["shape"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ShardError(f"its header is unreadable ({error})") from error
    if header.get("namespace") != namespace:
        raise ShardError(f"it belongs to namespace {str(header.get('namespace'))[:16]}..., not this one")
    if dtype.hasobject or dtype.fields is not None:
        raise ShardError(f"its dtype {dtype} is not a plain numeric type")
    data = content[start + length :]
    if len(data) != len(keys) * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ShardError(f"it holds {len(data)} bytes of rows, not {len(keys)} rows of {dtype}{list(shape)}")
    table = np.frombuffer(data, dtype=dtype).reshape((len(keys), *shape))
    return {key: table[row] for row, key in enumerate(keys)}


def make_manifest(content: bytes, keys: Sequence[Key], namespace: str, description: Mapping[str, Any]) -> dict:
    """The manifest of a shard (without its checksum: :func:`cache_files.write_record` adds it)."""
    start = len(SHARD_MAGIC) + _HEADER_LENGTH_BYTES
    header = json.loads(content[start : start + int.from_bytes(content[len(SHARD_MAGIC) : start], "little")])
    return {
        "format": MANIFEST_FORMAT,
        "namespace": namespace,
        "shard": cache_files.content_sha256(content),
        "bytes": len(content),
        "rows": len(keys),
        "dtype": header["dtype"],
        "shape": header["shape"],
        "keys": [list(key) for key in keys],
        "description": dict(description),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_manifest(record: Any, *, namespace: str, sha256: str) -> dict:
    """A parsed manifest if it is intact and describes shard ``sha256`` of ``namespace``.

    Raises:
        ShardError: damaged, or about another shard.
    """
    if not _intact(record):
        raise ShardError("it does not match its checksum")
    if record.get("format") != MANIFEST_FORMAT or record.get("namespace") != namespace or record.get("shard") != sha256:
        raise ShardError("it describes another shard, namespace or format")
    keys = record.get("keys")
    if not isinstance(keys, list) or record.get("rows") != len(keys):
        raise ShardError("its keys and row count disagree")
    return record


def _intact(record: Any) -> bool:
    """Whether a parsed record is a JSON object that matches its own checksum (:mod:`cache_files`)."""
    return isinstance(record, dict) and record.get(cache_files.CHECKSUM_FIELD) == cache_files.record_checksum(record)


def manifest_keys(record: Mapping[str, Any]) -> set[Key]:
    """The keys a (checked) manifest lists."""
    return {(key[0], key[1]) for key in record["keys"]}


# -- the connection ---------------------------------------------------------------------------------


def filesystem() -> Any:
    """An s3fs file system from the AWS environment, with short timeouts and few retries.

    No instance or listing caches: every listing sees what other writers added.
    """
    import s3fs  # an optional dependency's import costs ~0.3 s: only when a remote is set

    for name in ("aiobotocore.credentials", "botocore.credentials", "botocore.configprovider"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Found credentials in environment variables" per run
    config = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "read_timeout": READ_TIMEOUT_SECONDS,
        "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
    }
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, config_kwargs=config)
    fs.retries = ATTEMPTS  # s3fs's own retry loop around botocore's (default 5)
    return fs


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text[:300]}"


class Remote:
    """A shared cache at one URL: listing, fetching and pushing shards, with local manifest copies.

    Args:
        url: ``s3://bucket[/prefix]``.
        cache_directory: the local cache folder (manifest copies go under ``remote/``), or None.
        fs: an fsspec file system for S3 (default: :func:`filesystem`).
        shard_max_bytes: most row bytes per pushed shard.
    """

    def __init__(
        self,
        url: str,
        cache_directory: str | os.PathLike | None,
        *,
        fs: Any = None,
        shard_max_bytes: int = SHARD_MAX_BYTES,
    ) -> None:
        self.url = url.rstrip("/")
        self.root = root_path(self.url)
        self.cache_directory = None if cache_directory is None else Path(cache_directory)
        self.fs = fs if fs is not None else filesystem()
        self.shard_max_bytes = shard_max_bytes
        self.bytes_down = self.bytes_up = 0

    def namespaces(self) -> list[str]:
        """The namespaces the remote holds (folders named by a namespace key)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            self._require_bucket()
            return []
        return sorted(name for name in (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries) if _is_key(name))

    def manifests(self, namespace: str) -> dict[str, dict]:
        """The intact manifests of a namespace, by shard sha256 (new ones fetched, known ones read locally)."""
        try:
            listed = self.fs.ls(f"{self.root}/{namespace}/manifests", detail=False)
        except FileNotFoundError:
            self._require_bucket()
            return {}
        names = sorted({name[: -len(".json")] for name in (entry.rsplit("/", 1)[-1] for entry in listed)
                        if name.endswith(".json") and _is_key(name[: -len(".json")])})  # fmt: skip
        found = {name: record for name in names if (record := self._local_manifest(namespace, name)) is not None}
        new = [name for name in names if name not in found]
        if new:
            contents = self.fs.cat([manifest_path(self.root, namespace, name) for name in new], on_error="return")
            for name in new:
                record = self._accept_manifest(namespace, name, contents.get(manifest_path(self.root, namespace, name)))
                if record is not None:
                    found[name] = record
        return found

    def fetch(self, namespace: str, sha256: str) -> dict[Key, np.ndarray]:
        """The verified rows of one shard.

        Raises:
            ShardError: the shard is damaged (see :func:`decode_shard`) or missing.
        """
        try:
            content = self.fs.cat_file(shard_path(self.root, namespace, sha256))
        except FileNotFoundError as error:
            raise ShardError("its manifest exists but the shard object does not") from error
        self.bytes_down += len(content)
        return decode_shard(content, sha256=sha256, namespace=namespace)

    def push(self, namespace: str, rows: Mapping[Key, Any], description: Mapping[str, Any]) -> list[str]:
        """Uploads rows as new shards (each shard first, its manifest last); returns their sha256s."""
        names = []
        for content, keys in encode_shards(namespace, rows, max_bytes=self.shard_max_bytes):
            manifest = make_manifest(content, keys, namespace, description)
            record = {**manifest, cache_files.CHECKSUM_FIELD: cache_files.record_checksum(manifest)}
            sha256 = manifest["shard"]
            self.fs.pipe_file(shard_path(self.root, namespace, sha256), content)
            self.fs.pipe_file(manifest_path(self.root, namespace, sha256), json.dumps(record).encode("utf-8"))
            self.bytes_up += len(content)
            self._keep_manifest(namespace, sha256, manifest)
            names.append(sha256)
        return names

    def shard_sizes(self, namespace: str) -> dict[str, int]:
        """Bytes of each shard object of a namespace, by sha256 (for ``transferlab cache list``)."""
        try:
            listed = self.fs.ls(f"{self.root}/{namespace}/shards", detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        for entry in listed:
            name = entry["name"].rsplit("/", 1)[-1]
            if name.endswith(".shard") and _is_key(name[: -len(".shard")]):
                sizes[name[: -len(".shard")]] = int(entry.get("size") or 0)
        return sizes

    def conversions(self, key: str) -> list[str]:
        """The shared converted models of one Keras backbone (verdict names), oldest first: the first is the team's."""
        try:
            listed = self.fs.ls(f"{self.root}/converted/{key}", detail=True)
        except FileNotFoundError:
            return []
        verdicts = []
        for entry in listed:
            name = entry["name"].rsplit("/", 1)[-1]
            if name.endswith(".json") and _is_key(name[: -len(".json")]):
                verdicts.append((str(entry.get("LastModified") or ""), name[: -len(".json")]))
        return [name for _, name in sorted(verdicts)]

    def fetch_conversion(self, key: str, sha256: str, directory: Path) -> None:
        """Puts a shared converted model and its verdict into the local conversion folder (model first).

        Raises:
            ShardError: the verdict is damaged or not an agreeing one for this model, or the model's bytes
                are not ``sha256``.
        """
        verdict_text = self.fs.cat_file(f"{self.root}/converted/{key}/{sha256}.json")
        try:
            verdict = json.loads(verdict_text)
        except ValueError as error:
            raise ShardError(f"its verdict is not JSON ({error})") from error
        if not _intact(verdict):
            raise ShardError("its verdict does not match its checksum")
        if not verdict.get("agrees") or verdict.get("tflite_sha256") != sha256:
            raise ShardError("its verdict does not vouch for this model")
        content = self.fs.cat_file(f"{self.root}/converted/{key}/{sha256}.tflite")
        if cache_files.content_sha256(content) != sha256:
            raise ShardError("the sha256 of the model's bytes is not its name (damaged or tampered)")
        self.bytes_down += len(content)
        verdict_path = directory / f"{key}.json"
        with atomic.atomic_path(engine_choice.converted_model_path(verdict_path, sha256)) as temporary:
            temporary.write_bytes(content)
        atomic.write_text(verdict_path, verdict_text.decode("utf-8"))  # after the model: it vouches for it

    def push_conversion(self, key: str, verdict: dict, model: bytes) -> None:
        """Shares a converted model and its verdict: ``converted/<key>/<sha256>.tflite``, then ``.json``."""
        sha256 = verdict["tflite_sha256"]
        self.fs.pipe_file(f"{self.root}/converted/{key}/{sha256}.tflite", model)
        self.fs.pipe_file(f"{self.root}/converted/{key}/{sha256}.json", json.dumps(verdict).encode("utf-8"))
        self.bytes_up += len(model)

    def _require_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        if not self.fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist (create it, or fix the URL)")

    def _local_manifest(self, namespace: str, sha256: str) -> dict | None:
        if self.cache_directory is None:
            return None
        path = local_manifest_directory(self.cache_directory, self.url, namespace) / f"{sha256}.json"
        record = cache_files.read_record(path, consequence="fetching it again")
        try:
            return None if record is None else check_manifest(record, namespace=namespace, sha256=sha256)
        except ShardError:
            return None

    def _accept_manifest(self, namespace: str, sha256: str, content: Any) -> dict | None:
        if isinstance(content, FileNotFoundError):
            return None  # listed, then gone: nothing to read
        if isinstance(content, BaseException):
            raise content
        try:
            record = check_manifest(json.loads(content), namespace=namespace, sha256=sha256)
        except (ShardError, ValueError, UnicodeDecodeError) as error:
            LOGGER.warning(
                "Shared embedding cache %s: manifest %s is unusable (%s); its shard is not read",
                self.url,
                manifest_path(self.root, namespace, sha256),
                error,
            )
            return None
        self._keep_manifest(namespace, sha256, {k: v for k, v in record.items() if k != cache_files.CHECKSUM_FIELD})
        return record

    def _keep_manifest(self, namespace: str, sha256: str, manifest: dict) -> None:
        if self.cache_directory is None:
            return
        path = local_manifest_directory(self.cache_directory, self.url, namespace) / f"{sha256}.json"
        with contextlib.suppress(OSError):  # only a copy: fetched again if it cannot be kept
            cache_files.write_record(path, manifest)


def _is_key(name: str) -> bool:
    return bool(_SHA256.fullmatch(name))


# -- one run of extract_features ------------------------------------------------------------------


@dataclasses.dataclass
class _Member:
    namespace: str
    description: dict
    needed: list[Key]
    listed: bool = False
    remote_keys: set[Key] = dataclasses.field(default_factory=set)
    remote_hits: int = 0
    pushed: int = 0
    shards_fetched: int = 0
    shards_rejected: int = 0
    shards_pushed: int = 0


class RunSync:
    """What one extract_features run pulls from and pushes to the shared cache, per member.

    Use :meth:`pull` right after a member's local cache is opened (before its lookups), and
    :meth:`push` with the member's embeddings once it is done. The first failure to reach the
    remote disables it for the rest of the run, with one warning.

    Args:
        url: ``s3://bucket[/prefix]``.
        cache_directory: the local cache folder (the remote fills it, and keeps manifest copies there).
        fs: an fsspec file system for S3 (default: from the AWS environment).
        shard_max_bytes: most row bytes per pushed shard.
    """

    def __init__(
        self, url: str, cache_directory: Path, *, fs: Any = None, shard_max_bytes: int = SHARD_MAX_BYTES
    ) -> None:
        self.url = url
        self.problem: str | None = None
        self._members: dict[str, _Member] = {}
        self.seconds = 0.0
        try:
            self.remote: Remote | None = Remote(url, cache_directory, fs=fs, shard_max_bytes=shard_max_bytes)
        except Exception as error:  # noqa: BLE001 - e.g. an AWS config file s3fs cannot parse
            self.remote = None
            self._give_up("connecting", error)

    @property
    def usable(self) -> bool:
        """False once the remote failed (or was never reachable) in this run."""
        return self.problem is None and self.remote is not None

    def pull(self, cache: Any, keys: Iterable[Key], *, label: str) -> int:
        """Fetches the rows of ``keys`` the local cache lacks and the remote has; returns how many.

        Makes no request when the local cache has every key. A damaged shard is skipped with a
        warning (its rows stay missing: the run computes them). A local cache that is disabled
        or unusable gets nothing.
        """
        if not getattr(cache, "enabled", False):
            return 0
        member = _Member(cache.namespace, _description(cache), list(dict.fromkeys(keys)))
        self._members[label] = member
        if not self.usable:
            return 0
        started = time.perf_counter()
        try:
            missing = cache.missing(member.needed)
            if missing:
                self._fill(cache, member, set(missing), label)
        except embedding_cache.CacheUnavailable as error:  # the local cache's trouble, not the remote's
            LOGGER.warning("%s: the local cache cannot take the shared rows (%s); embedding them instead", label, error)
        except Exception as error:  # noqa: BLE001 - the remote only ever saves work: any failure means "without it"
            self._give_up(f"fetching rows of {label}", error)
        self.seconds += time.perf_counter() - started
        return member.remote_hits

    def _fill(self, cache: Any, member: _Member, missing: set[Key], label: str) -> None:
        manifests = self.remote.manifests(member.namespace)
        member.listed = True
        candidates = {name: manifest_keys(record) for name, record in manifests.items()}
        rejected: set[str] = set()
        # The shards holding most missing keys first; one that overlaps those fetched is skipped
        # once it adds nothing (linear in shards x keys, where a strict greedy cover is quadratic).
        for best in sorted(candidates, key=lambda name: (-len(candidates[name] & missing), name)):
            if not missing:
                break
            if not candidates[best] & missing:
                continue
            try:
                rows = self.remote.fetch(member.namespace, best)
            except ShardError as error:
                rejected.add(best)
                LOGGER.warning(
                    "Shared embedding cache %s: shard %s of %s is not used (%s); its rows are computed here "
                    "and pushed again",
                    self.url,
                    f"s3://{shard_path(self.remote.root, member.namespace, best)}",
                    label,
                    error,
                )
                continue
            items = list(rows.items())
            for start in range(0, len(items), ROWS_PER_TRANSACTION):
                cache.put_many(dict(items[start : start + ROWS_PER_TRANSACTION]))
            member.remote_hits += len(missing & rows.keys())
            member.shards_fetched += 1
            missing -= rows.keys()
        member.shards_rejected = len(rejected)
        for name, record in manifests.items():
            if name not in rejected:
                member.remote_keys |= manifest_keys(record)

    def push(self, label: str, read: Callable[[Sequence[Key]], np.ndarray]) -> int:
        """Pushes the member's rows the remote lacks (only when its manifests were listed); returns how many.

        ``read`` gives the rows' embeddings by key; they are read and pushed one shard's worth at
        a time, so a push never holds more than one shard. A run whose local cache had every row
        made no request and computed nothing, so it pushes nothing either.
        """
        member = self._members.get(label)
        if member is None or not member.listed or not self.usable:
            return 0
        keys = [key for key in member.needed if key not in member.remote_keys]
        if not keys:
            return 0
        started = time.perf_counter()
        try:
            per_shard = max(1, self.remote.shard_max_bytes // max(1, read(keys[:1])[0].nbytes))
            for start in range(0, len(keys), per_shard):
                part = keys[start : start + per_shard]
                rows = dict(zip(part, read(part), strict=True))
                member.shards_pushed += len(self.remote.push(member.namespace, rows, member.description))
                member.pushed += len(rows)
                member.remote_keys |= rows.keys()
        except Exception as error:  # noqa: BLE001 - see pull
            self._give_up(f"pushing rows of {label}", error)
        self.seconds += time.perf_counter() - started
        return member.pushed

    def adopt_conversions(self, members: Sequence[Any], directory: Path, engine: str) -> None:
        """Before engines are chosen: each Keras member runs the team's converted model, if one was shared.

        Converting a Keras backbone to TFLite is not byte-for-byte reproducible, and the namespace
        holds the sha256 of the bytes run, so two machines converting on their own would never
        share a row. The oldest shared conversion (``converted/<key>/<sha256>.{tflite,json}``)
        is the team's: it replaces a different local one. A local marker remembers the agreement,
        so a later run with the same model makes no request.
        """
        for member, key in self._converted_members(members, engine):
            local = local_conversion(directory, key)
            if local is not None and self._marker(key) == local["tflite_sha256"]:
                continue
            started = time.perf_counter()
            try:
                for candidate in self.remote.conversions(key):
                    if local is not None and candidate == local["tflite_sha256"]:
                        self._mark(key, candidate)
                        break
                    try:
                        self.remote.fetch_conversion(key, candidate, directory)
                    except ShardError as error:
                        LOGGER.warning(
                            "Shared converted model %s of %s is not used (%s)", candidate, member.name, error
                        )
                        continue
                    LOGGER.info("%s runs the team's converted model %s", member.name, candidate[:16])
                    self._mark(key, candidate)
                    break
            except Exception as error:  # noqa: BLE001 - see pull
                self._give_up(f"fetching the converted model of {member.name}", error)
            self.seconds += time.perf_counter() - started

    def push_conversions(self, members: Sequence[Any], directory: Path, engine: str) -> None:
        """After the run: shares each Keras member's converted model if the remote has none yet."""
        for member, key in self._converted_members(members, engine):
            local = local_conversion(directory, key)
            if local is None or self._marker(key) == local["tflite_sha256"]:
                continue
            started = time.perf_counter()
            try:
                sha256 = local["tflite_sha256"]
                if not self.remote.conversions(key):
                    model = engine_choice.converted_model_path(directory / f"{key}.json", sha256).read_bytes()
                    if cache_files.content_sha256(model) == sha256:
                        self.remote.push_conversion(key, local, model)
                shared = self.remote.conversions(key)  # again: a concurrent first push may have won
                if shared and shared[0] == sha256:
                    self._mark(key, sha256)
            except Exception as error:  # noqa: BLE001 - see pull
                self._give_up(f"pushing the converted model of {member.name}", error)
            self.seconds += time.perf_counter() - started

    def _converted_members(self, members: Sequence[Any], engine: str) -> list[tuple[Any, str]]:
        if not self.usable or engine == "keras":
            return []
        return [(member, conversion_key(member)) for member in members if member.kind == "keras"]

    def _marker_path(self, key: str) -> Path:
        return local_manifest_directory(self.remote.cache_directory, self.url, "converted") / f"{key}.json"

    def _marker(self, key: str) -> str | None:
        record = cache_files.read_record(self._marker_path(key), consequence="asking the remote again")
        return None if record is None else record.get("tflite_sha256")

    def _mark(self, key: str, sha256: str) -> None:
        with contextlib.suppress(OSError):
            cache_files.write_record(self._marker_path(key), {"tflite_sha256": sha256})

    def _give_up(self, action: str, error: BaseException) -> None:
        if self.problem is None:
            self.problem = _reason(error)
            LOGGER.warning(
                "The shared embedding cache %s cannot be used (%s while %s); this run goes on with the local "
                "cache only, fetching and pushing nothing more. Check AWS_ENDPOINT_URL and the AWS credentials, "
                'or set extract_features.cache_remote to "" (and unset $%s)',
                self.url,
                self.problem,
                action,
                ENVIRONMENT_VARIABLE,
            )

    def member_report(self, label: str) -> dict:
        """The member's remote figures for metrics/extract_features.json."""
        member = self._members.get(label)
        if member is None:
            return {"remote_hits": 0, "pushed": 0}
        return {
            "remote_hits": member.remote_hits,
            "pushed": member.pushed,
            "remote_shards_fetched": member.shards_fetched,
            "remote_shards_rejected": member.shards_rejected,
            "remote_shards_pushed": member.shards_pushed,
        }

    def add_to_report(self, report: dict) -> dict:
        """Adds local/remote hits and pushes per member, and the remote's summary, to a run's report."""
        for label, entry in report.get("backbones", {}).items():
            figures = self.member_report(label)
            entry.update(figures, local_hits=entry.get("cache_hits", 0) - figures["remote_hits"])
        members = list(self._members.values())
        report["remote_hits"] = sum(member.remote_hits for member in members)
        report["local_hits"] = report.get("cache_hits", 0) - report["remote_hits"]
        report["pushed"] = sum(member.pushed for member in members)
        report["cache_remote"] = {
            "url": self.url,
            "status": "used" if self.problem is None else f"unusable: {self.problem}",
            "bytes_fetched": self.remote.bytes_down if self.remote else 0,
            "bytes_pushed": self.remote.bytes_up if self.remote else 0,
            "seconds": round(self.seconds, 3),
        }
        LOGGER.info(
            "shared cache %s: %d rows fetched (%.1f MB), %d pushed (%.1f MB), %.1f s%s",
            self.url,
            report["remote_hits"],
            report["cache_remote"]["bytes_fetched"] / 1e6,
            report["pushed"],
            report["cache_remote"]["bytes_pushed"] / 1e6,
            self.seconds,
            "" if self.problem is None else f" (unusable: {self.problem})",
        )
        return report


def conversion_key(member: Any) -> str:
    """The name :func:`engine_choice.choose_keras_engine` files a Keras member's conversion under."""
    return hashlib.sha256(engine_choice.conversion_identity(member).encode()).hexdigest()


def local_conversion(directory: Path, key: str) -> dict | None:
    """The local verdict of a Keras member's conversion if it agrees with Keras and names its model."""
    verdict = cache_files.read_record(directory / f"{key}.json", consequence="converting the backbone again")
    if verdict is None or not verdict.get("agrees") or not _is_key(str(verdict.get("tflite_sha256"))):
        return None
    return verdict


def _description(cache: Any) -> dict:
    try:
        return dict(cache.description())
    except (embedding_cache.CacheUnavailable, ValueError):
        return {}


def add_local_only(report: dict) -> dict:
    """Marks a run's report as one without a shared cache (same keys as :meth:`RunSync.add_to_report`)."""
    for entry in report.get("backbones", {}).values():
        entry.update(remote_hits=0, pushed=0, local_hits=entry.get("cache_hits", 0))
    report.update(remote_hits=0, pushed=0, local_hits=report.get("cache_hits", 0))
    report["cache_remote"] = {"url": "", "status": "off", "bytes_fetched": 0, "bytes_pushed": 0, "seconds": 0.0}
    return report


def open_sync(setting: str, cache_directory: Path | None, *, fs: Any = None) -> RunSync | None:
    """The run's link to the shared cache, or None when there is none (or no local cache to fill).

    Args:
        setting: ``extract_features.cache_remote`` (empty: ``$TRANSFERLAB_CACHE_REMOTE``, else none).
        cache_directory: the usable local cache folder, or None when the run has no local cache.
        fs: an fsspec file system for S3 (default: from the AWS environment).

    Raises:
        ValueError: the URL is not ``s3://bucket[/prefix]``.
    """
    url = remote_url(setting)
    if not url:
        return None
    if cache_directory is None:
        LOGGER.warning(
            "The shared embedding cache %s is not used: it fills the local cache, and this run has none "
            "(extract_features.cache: false, or an unusable cache folder)",
            url,
        )
        return None
    return RunSync(url, cache_directory, fs=fs)
