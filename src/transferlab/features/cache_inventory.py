"""What the embedding caches hold, per namespace, and pruning the local one (``transferlab cache``).

A namespace is one backbone identity (backbone, weights, input size, engine, tap): one SQLite
database locally (:mod:`transferlab.features.embedding_cache`), a folder of shards in the
shared cache (:mod:`transferlab.features.cache_remote`). Listing reads each local database
read-only (its row count and the description stored when it was created) and each remote
namespace's manifests (copies kept locally, so a second listing downloads nothing new).

Pruning removes whole namespaces, each atomically: the database is switched out of WAL mode
(which SQLite only allows when no other connection has it open, so a database in use by a
running extract_features is refused, never pulled from under it), locked exclusively, renamed
away in one step and only then deleted. At every instant the namespace's database is either
complete or absent, and a run that opens it afterwards starts an empty one. Converted models
(``converted/``) are not touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transferlab.features import cache_files, cache_remote, embedding_cache, engine_choice

LOGGER = logging.getLogger(__name__)
SECONDS_PER_DAY = 86400
_LOCK_TIMEOUT_SECONDS = 2.0


def local_namespaces(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """One entry per namespace database in the local cache folder, sorted by namespace.

    Each entry: ``namespace``, ``path``, ``rows``, ``bytes`` (database plus write-ahead log),
    ``modified`` (last write, epoch seconds), ``description``, and ``problem`` (None, or why the
    database could not be read).
    """
    entries = []
    for path in sorted(Path(directory).glob("??/*.sqlite")):
        namespace = path.stem
        if not embedding_cache._SHA256.fullmatch(namespace) or path.parent.name != namespace[:2]:
            continue
        files = [candidate for candidate in (path, Path(f"{path}-wal")) if candidate.exists()]
        entry = {
            "namespace": namespace,
            "path": str(path),
            "bytes": sum(candidate.stat().st_size for candidate in files),
            "modified": max(candidate.stat().st_mtime for candidate in files),
            "rows": None,
            "description": {},
            "problem": None,
        }
        try:
            entry["rows"], entry["description"] = _read_database(path)
        except (sqlite3.Error, ValueError) as error:
            entry["problem"] = f"{type(error).__name__}: {error}"
        entries.append(entry)
    return entries


def _read_database(path: Path) -> tuple[int, dict]:
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=_LOCK_TIMEOUT_SECONDS)
    try:
        rows = connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        found = connection.execute("SELECT value FROM meta WHERE name = 'description'").fetchone()
    finally:
        connection.close()
    return rows, json.loads(found[0]) if found else {}


def remote_namespaces(url: str, cache_directory: str | os.PathLike | None, *, fs: Any = None) -> list[dict[str, Any]]:
    """One entry per namespace of the shared cache at ``url``, sorted by namespace.

    Each entry: ``namespace``, ``rows`` (distinct keys over its shards), ``bytes`` (its shard
    objects), ``shards`` (with a manifest), ``description`` (from a manifest).

    Raises:
        ValueError: the remote cannot be listed (unreachable, wrong credentials, no bucket).
    """
    try:
        remote = cache_remote.Remote(url, cache_directory, fs=fs)
        entries = []
        for namespace in remote.namespaces():
            manifests = remote.manifests(namespace)
            sizes = remote.shard_sizes(namespace)
            present = {name: record for name, record in manifests.items() if name in sizes}
            keys = set().union(*(cache_remote.manifest_keys(record) for record in present.values()))
            description = next((record.get("description", {}) for record in present.values()), {})
            entries.append(
                {
                    "namespace": namespace,
                    "rows": len(keys),
                    "bytes": sum(sizes[name] for name in present),
                    "shards": len(present),
                    "description": description,
                }
            )
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - one line for anything the S3 stack raises
        raise ValueError(
            f"the shared embedding cache {url} cannot be listed ({cache_remote._reason(error)}); check "
            "AWS_ENDPOINT_URL and the AWS credentials"
        ) from error
    return entries


def inventory(local: list[dict], remote: list[dict] | None) -> list[dict[str, Any]]:
    """Local and remote entries side by side, one row per namespace found in either."""
    by_namespace: dict[str, dict[str, Any]] = {}
    for side, entries in (("local", local), ("remote", remote or [])):
        for entry in entries:
            row = by_namespace.setdefault(entry["namespace"], {"namespace": entry["namespace"], "description": {}})
            row[side] = entry
            row["description"] = row["description"] or entry.get("description") or {}
    return [by_namespace[namespace] for namespace in sorted(by_namespace)]


def describe(description: dict) -> str:
    """A namespace's description in one short line: backbone, weights, size, engine (and tap)."""
    if not description:
        return "(no description)"
    name = description.get("name") or description.get("backbone") or description.get("spec") or "?"
    weights = str(description.get("weights") or description.get("weights_identity") or "?")
    if embedding_cache._SHA256.fullmatch(weights):
        weights = f"sha256:{weights[:12]}"
    size = description.get("image_size", "?")
    size = f"{size[0]}x{size[1]}" if isinstance(size, list) and len(size) == 2 else str(size)
    parts = [name, weights, f"{size}px", str(description.get("engine", "?"))]
    if description.get("tap"):
        parts.append(f"tap {description['tap']}")
    return " ".join(parts)


def table(rows: list[dict[str, Any]], *, remote: bool) -> str:
    """The inventory as an aligned text table, with totals."""
    header = ["namespace", "local rows", "local MB"] + (["remote rows", "remote MB", "shards"] if remote else [])
    lines = [header + ["description"]]
    totals = [0, 0, 0, 0, 0]
    for row in rows:
        local, shared = row.get("local"), row.get("remote")
        cells = [row["namespace"][:12]]
        cells += _figures(local, ("rows", "bytes"), totals, 0)
        if remote:
            cells += _figures(shared, ("rows", "bytes", "shards"), totals, 2)
        note = f"  [{local['problem']}]" if local and local.get("problem") else ""
        lines.append(cells + [describe(row["description"]) + note])
    total = ["total", str(totals[0]), f"{totals[1] / 1e6:.1f}"]
    total += [str(totals[2]), f"{totals[3] / 1e6:.1f}", str(totals[4])] if remote else []
    lines.append(total + [f"{len(rows)} namespaces"])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header) + 1)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def _figures(entry: dict | None, names: tuple[str, ...], totals: list[int], offset: int) -> list[str]:
    if entry is None:
        return ["-"] * len(names)
    cells = []
    for index, name in enumerate(names):
        value = entry.get(name)
        totals[offset + index] += value or 0
        cells.append("?" if value is None else f"{value / 1e6:.1f}" if name == "bytes" else str(value))
    return cells


# -- seeding the shared cache ----------------------------------------------------------------------

ROWS_PER_PUSH = 10_000  # rows read and pushed at a time: about 50 MB of pooled float32 embeddings


def push_local(
    directory: str | os.PathLike, url: str, entries: list[dict[str, Any]], *, fs: Any = None
) -> list[dict[str, Any]]:
    """Pushes the rows of local namespaces that the shared cache lacks, and conversions it has none of.

    A run pushes only when its local cache missed rows; this seeds the shared cache from a local
    one filled before it existed (or by runs without it). Tap namespaces are left out: runs share
    pooled embeddings only.

    Returns:
        One entry per namespace: ``namespace``, ``pushed`` rows, ``bytes`` uploaded.

    Raises:
        ValueError: the remote cannot be used.
    """
    directory = Path(directory)
    results = []
    try:
        remote = cache_remote.Remote(url, directory, fs=fs)
        _push_conversions(remote, directory / "converted")
        for entry in entries:
            if entry["problem"] or entry["description"].get("tap"):
                continue
            namespace, before = entry["namespace"], remote.bytes_up
            shared = set().union(
                *(cache_remote.manifest_keys(record) for record in remote.manifests(namespace).values())
            )
            missing = [key for key in _local_keys(Path(entry["path"])) if key not in shared]
            with embedding_cache.EmbeddingCache(directory, namespace, description=entry["description"]) as cache:
                description = cache.description()
                for start in range(0, len(missing), ROWS_PER_PUSH):
                    rows = cache.get_many(missing[start : start + ROWS_PER_PUSH])
                    remote.push(namespace, rows, description)
            results.append({"namespace": namespace, "pushed": len(missing), "bytes": remote.bytes_up - before})
    except (ValueError, embedding_cache.CacheUnavailable):
        raise
    except Exception as error:  # noqa: BLE001 - one line for anything the S3 stack raises
        raise ValueError(f"the shared embedding cache {url} cannot be used ({cache_remote._reason(error)})") from error
    return results


def _local_keys(path: Path) -> list[tuple[str, str]]:
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=_LOCK_TIMEOUT_SECONDS)
    try:
        return [(sha256, recipe) for sha256, recipe in connection.execute("SELECT sha256, recipe FROM entries")]
    finally:
        connection.close()


def _push_conversions(remote: cache_remote.Remote, converted: Path) -> None:
    for verdict_path in sorted(converted.glob("*.json")):
        key = verdict_path.stem
        verdict = cache_remote.local_conversion(converted, key) if embedding_cache._SHA256.fullmatch(key) else None
        if verdict is None or remote.conversions(key):
            continue
        model = engine_choice.converted_model_path(verdict_path, verdict["tflite_sha256"]).read_bytes()
        if cache_files.content_sha256(model) == verdict["tflite_sha256"]:
            remote.push_conversion(key, verdict, model)


# -- pruning ----------------------------------------------------------------------------------------


def select(
    entries: list[dict[str, Any]],
    *,
    namespaces: Iterable[str] = (),
    older_than_days: float | None = None,
    everything: bool = False,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """The local entries to prune: named ones (full key or a unique prefix), those not written for N days, or all.

    Raises:
        ValueError: no criterion, more than one, a negative age, or a name that matches no namespace or several.
    """
    criteria = [bool(list(namespaces)), older_than_days is not None, everything]
    if sum(criteria) != 1:
        raise ValueError("say what to prune: --namespace NS [NS ...], --older-than DAYS or --all (one of them)")
    if everything:
        return list(entries)
    if older_than_days is not None:
        if older_than_days < 0:
            raise ValueError(f"--older-than must be a number of days >= 0; got {older_than_days}")
        cutoff = (time.time() if now is None else now) - older_than_days * SECONDS_PER_DAY
        return [entry for entry in entries if entry["modified"] < cutoff]
    chosen = []
    for prefix in namespaces:
        matches = [entry for entry in entries if entry["namespace"].startswith(prefix.strip().lower())]
        if len(matches) != 1:
            known = ", ".join(entry["namespace"][:12] for entry in entries) or "none"
            what = "no namespace" if not matches else f"{len(matches)} namespaces"
            raise ValueError(f"--namespace {prefix!r} matches {what} of the local cache (it holds: {known})")
        chosen.append(matches[0])
    return list({entry["namespace"]: entry for entry in chosen}.values())


def remove_database(path: str | os.PathLike) -> str | None:
    """Removes one namespace's database, atomically; returns None, or why it was left as it was.

    The database is switched to rollback-journal mode (SQLite refuses while another connection
    has it open: then nothing changes), locked exclusively, renamed to a hidden name in one step
    and deleted.
    """
    path = Path(path)
    aside = path.with_name(f".{path.name}.pruned-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        connection = sqlite3.connect(path, timeout=_LOCK_TIMEOUT_SECONDS, isolation_level=None)
    except sqlite3.Error as error:
        return f"it cannot be opened ({error})"
    try:
        mode = connection.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        connection.execute("BEGIN EXCLUSIVE")
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]  # still ours: nobody switched it back
        if str(mode).lower() != "delete":
            connection.execute("ROLLBACK")
            return "it is open in another process (a running extract_features?); prune it once that ends"
        os.replace(path, aside)
        connection.execute("ROLLBACK")
    except sqlite3.OperationalError as error:
        return f"it is in use by another process ({error}); prune it once that ends"
    except sqlite3.DatabaseError as error:  # damaged: nothing in it can be served anyway
        LOGGER.warning("Embedding cache database %s is damaged (%s); removing it as it is", path, error)
        os.replace(path, aside)
    finally:
        connection.close()
    # Only the renamed file's own leftovers: a -wal or -shm now beside `path` would belong to a
    # database a run started after the rename.
    for leftover in (aside, Path(f"{aside}-journal"), Path(f"{aside}-wal"), Path(f"{aside}-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    return None


def prune(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Removes the given namespaces' databases; returns (removed, [(refused, why)])."""
    removed, refused = [], []
    for entry in entries:
        reason = remove_database(entry["path"])
        if reason is None:
            removed.append(entry)
        else:
            refused.append((entry, reason))
    return removed, refused
