"""`transferlab cache list/prune` on a local cache: sizes per namespace; atomic pruning that spares databases in use.

The remote side of `cache list` is tested against a real S3 server in tests/pipeline/test_shared_cache_s3.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest

from transferlab import cli
from transferlab.features import cache_inventory, embedding_cache

DESCRIPTION = {"name": "mobilenet_v2", "weights": "f" * 64, "image_size": 32, "engine": "keras", "spec": "x"}


def fill(directory, namespace: str, count: int) -> embedding_cache.EmbeddingCache:
    cache = embedding_cache.EmbeddingCache(directory, namespace, description=DESCRIPTION)
    cache.put_many({(hashlib.sha256(str(n).encode()).hexdigest(), ""): np.full(4, n, np.float32) for n in range(count)})
    return cache


@pytest.fixture()
def cache_folder(tmp_path):
    for namespace, count in (("ab" * 32, 3), ("cd" * 32, 5)):
        fill(tmp_path, namespace, count).close()
    return tmp_path


def test_local_namespaces_have_rows_bytes_and_their_description(cache_folder):
    (first, second) = cache_inventory.local_namespaces(cache_folder)
    assert (first["namespace"], first["rows"], second["rows"]) == ("ab" * 32, 3, 5)
    assert first["bytes"] > 0 and first["problem"] is None
    assert cache_inventory.describe(first["description"]) == "mobilenet_v2 sha256:ffffffffffff 32px keras"
    text = cache_inventory.table(cache_inventory.inventory([first, second], None), remote=False)
    assert "abababababab  3" in text and text.splitlines()[-1].split()[:2] == ["total", "8"]


def test_an_unreadable_database_is_listed_with_its_problem(cache_folder):
    (cache_folder / "ef").mkdir()
    (cache_folder / "ef" / f"{'ef' * 32}.sqlite").write_bytes(b"not a database at all" * 100)
    entries = {entry["namespace"]: entry for entry in cache_inventory.local_namespaces(cache_folder)}
    assert entries["ef" * 32]["rows"] is None and "DatabaseError" in entries["ef" * 32]["problem"]


def test_select_by_prefix_age_or_all_and_refuse_ambiguity(cache_folder):
    entries = cache_inventory.local_namespaces(cache_folder)
    assert [e["namespace"] for e in cache_inventory.select(entries, namespaces=["abab"])] == ["ab" * 32]
    assert cache_inventory.select(entries, older_than_days=1) == []
    later = time.time() + 2 * cache_inventory.SECONDS_PER_DAY
    assert len(cache_inventory.select(entries, older_than_days=1, now=later)) == 2
    assert len(cache_inventory.select(entries, everything=True)) == 2
    with pytest.raises(ValueError, match="matches no namespace"):
        cache_inventory.select(entries, namespaces=["99"])
    with pytest.raises(ValueError, match="one of them"):
        cache_inventory.select(entries, namespaces=["ab"], everything=True)


def test_prune_removes_a_whole_database_and_spares_one_in_use_by_another_process(cache_folder):
    in_use = cache_folder / "cd" / f"{'cd' * 32}.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sqlite3, sys; c = sqlite3.connect({str(in_use)!r}); "
         "c.execute('SELECT COUNT(*) FROM entries').fetchone(); print('open', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        removed, refused = cache_inventory.prune(cache_inventory.local_namespaces(cache_folder))
    finally:
        holder.communicate("")
    assert [entry["namespace"] for entry in removed] == ["ab" * 32]
    assert [entry["namespace"] for entry, _ in refused] == ["cd" * 32] and "another process" in refused[0][1]
    assert not any(path.name.startswith(f"{'ab' * 32}.sqlite") for path in (cache_folder / "ab").iterdir())
    assert not list(cache_folder.glob("*/.*pruned*"))
    with embedding_cache.EmbeddingCache(cache_folder, "cd" * 32, description=DESCRIPTION) as kept:
        assert len(kept) == 5  # untouched, still readable
    with embedding_cache.EmbeddingCache(cache_folder, "ab" * 32, description=DESCRIPTION) as fresh:
        assert len(fresh) == 0  # a run after the prune starts an empty namespace


def test_the_command_lists_and_prunes(cache_folder, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults
    monkeypatch.delenv("TRANSFERLAB_CACHE_REMOTE", raising=False)
    assert cli.main(["cache", "list", "--cache-dir", str(cache_folder)]) == 0
    listing = capsys.readouterr().out
    assert f"local cache: {cache_folder}" in listing and "cdcdcdcdcdcd  5" in listing
    assert cli.main(["cache", "prune", "--cache-dir", str(cache_folder), "--all", "--dry-run"]) == 0
    assert (
        capsys.readouterr().out.count("would remove") == 2 and len(cache_inventory.local_namespaces(cache_folder)) == 2
    )
    assert cli.main(["cache", "prune", "--cache-dir", str(cache_folder), "--namespace", "cdcd"]) == 0
    assert "1 namespace(s) removed" in capsys.readouterr().out
    assert [entry["namespace"] for entry in cache_inventory.local_namespaces(cache_folder)] == ["ab" * 32]
    assert cli.main(["cache", "prune", "--cache-dir", str(cache_folder)]) == 2
    assert "say what to prune" in capsys.readouterr().err
