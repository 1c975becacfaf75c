"""The shared embedding cache's formats (shards, manifests, URLs), its unreachable case, and dvc.yaml's params.

The round trips through a real S3 server are in tests/pipeline/test_shared_cache_s3.py.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time

import numpy as np
import pytest
import yaml

from conftest import REPOSITORY_ROOT
from transferlab.core import params
from transferlab.features import cache_files, cache_remote, embedding_cache

NAMESPACE = "ab" * 32
# Keys of ExtractFeaturesParams left out of the extract_features stage's params in dvc.yaml, because
# they change no output: where shared rows are fetched from.
NOT_IN_STAGE_PARAMS = {"cache_remote"}


def key(number: int, recipe: str = "") -> tuple[str, str]:
    return (hashlib.sha256(str(number).encode()).hexdigest(), recipe)


def rows(count: int, width: int = 6, dtype=np.float32) -> dict:
    rng = np.random.default_rng(count)
    return {key(number): rng.normal(size=width).astype(dtype) for number in range(count)}


def test_a_shard_round_trips_and_its_bytes_depend_only_on_its_rows():
    values = rows(7)
    ((content, keys),) = cache_remote.encode_shards(NAMESPACE, values)
    shuffled = dict(reversed(list(values.items())))
    ((again, _),) = cache_remote.encode_shards(NAMESPACE, shuffled)

    assert content == again and keys == sorted(values)
    decoded = cache_remote.decode_shard(content, sha256=cache_files.content_sha256(content), namespace=NAMESPACE)
    assert decoded.keys() == values.keys()
    for each, array in values.items():
        np.testing.assert_array_equal(decoded[each], array)
        assert decoded[each].dtype == np.float32


def test_shards_are_bounded_in_size_and_one_dtype_and_shape_each():
    values = rows(10, width=8)  # 32 bytes a row
    values[key(99, "flip")] = np.zeros((2, 2), dtype=np.float16)
    shards = cache_remote.encode_shards(NAMESPACE, values, max_bytes=100)  # 3 rows of 32 bytes per shard

    assert [len(keys) for _, keys in shards] == [1, 3, 3, 3, 1]
    assert sorted(each for _, keys in shards for each in keys) == sorted(values)
    for content, keys in shards:
        decoded = cache_remote.decode_shard(content, sha256=cache_files.content_sha256(content), namespace=NAMESPACE)
        assert len({(array.dtype, array.shape) for array in decoded.values()}) == 1 and list(decoded) == keys


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda content: content[:-1] + bytes([content[-1] ^ 1]), "not its name"),
        (lambda content: content[: len(content) // 2], "not its name"),
    ],
)
def test_a_damaged_shard_is_refused(damage, expected):
    ((content, _),) = cache_remote.encode_shards(NAMESPACE, rows(3))
    with pytest.raises(cache_remote.ShardError, match=expected):
        cache_remote.decode_shard(damage(content), sha256=cache_files.content_sha256(content), namespace=NAMESPACE)


def test_a_shard_with_a_matching_name_is_still_checked_for_its_namespace_and_length():
    ((content, _),) = cache_remote.encode_shards(NAMESPACE, rows(3))
    with pytest.raises(cache_remote.ShardError, match="belongs to namespace"):
        cache_remote.decode_shard(content, sha256=cache_files.content_sha256(content), namespace="cd" * 32)
    short = content[:-4]
    with pytest.raises(cache_remote.ShardError, match="bytes of rows, not 3 rows"):
        cache_remote.decode_shard(short, sha256=cache_files.content_sha256(short), namespace=NAMESPACE)
    foreign = b"PK\x03\x04" + content[4:]
    with pytest.raises(cache_remote.ShardError, match="magic"):
        cache_remote.decode_shard(foreign, sha256=cache_files.content_sha256(foreign), namespace=NAMESPACE)


def test_a_manifest_is_checked_against_its_checksum_and_its_shard():
    ((content, keys),) = cache_remote.encode_shards(NAMESPACE, rows(4))
    manifest = cache_remote.make_manifest(content, keys, NAMESPACE, {"name": "mobilenet_v2"})
    record = {**manifest, "checksum": cache_files.record_checksum(manifest)}
    sha256 = cache_files.content_sha256(content)

    checked = cache_remote.check_manifest(record, namespace=NAMESPACE, sha256=sha256)
    assert cache_remote.manifest_keys(checked) == set(keys) and checked["bytes"] == len(content)
    with pytest.raises(cache_remote.ShardError, match="checksum"):
        cache_remote.check_manifest({**record, "rows": 5}, namespace=NAMESPACE, sha256=sha256)
    with pytest.raises(cache_remote.ShardError, match="another shard"):
        cache_remote.check_manifest(record, namespace=NAMESPACE, sha256="0" * 64)


def test_urls_and_the_environment_fallback(monkeypatch, tmp_path):
    assert cache_remote.root_path("s3://team-cache/embeddings/v1/") == "team-cache/embeddings/v1"
    with pytest.raises(ValueError, match=r"s3://BUCKET\[/PREFIX\]"):
        cache_remote.root_path("gs://team-cache")
    monkeypatch.delenv(cache_remote.ENVIRONMENT_VARIABLE, raising=False)
    assert cache_remote.remote_url("") == "" and cache_remote.open_sync("", tmp_path) is None
    monkeypatch.setenv(cache_remote.ENVIRONMENT_VARIABLE, "s3://ci-cache/x/")
    assert cache_remote.remote_url("") == "s3://ci-cache/x"
    assert cache_remote.remote_url("s3://mine") == "s3://mine"  # the param wins
    path = cache_remote.local_manifest_directory(tmp_path, "s3://ci-cache/x", NAMESPACE)
    assert path.parent.parent == tmp_path / "remote" and path.name == NAMESPACE


def test_an_unreachable_remote_costs_seconds_and_warns_once(monkeypatch, tmp_path, caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    values = rows(5)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        sync = cache_remote.open_sync("s3://team-cache/embeddings", tmp_path)
        caches = [embedding_cache.EmbeddingCache(tmp_path, name * 32, description={}) for name in ("ab", "cd")]
        for label, cache in zip(("first", "second"), caches):
            assert sync.pull(cache, list(values), label=label) == 0
            assert sync.push(label, lambda keys: np.stack([values[key] for key in keys])) == 0
    assert time.perf_counter() - started < 20
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "s3://team-cache/embeddings cannot be used" in warnings[0] and "EndpointConnectionError" in warnings[0]
    report = sync.add_to_report({"backbones": {"first": {"cache_hits": 0}}, "cache_hits": 0})
    assert report["cache_remote"]["status"].startswith("unusable: EndpointConnectionError")
    assert report["backbones"]["first"]["remote_hits"] == 0 and report["pushed"] == 0


def test_a_run_without_a_local_cache_does_not_use_the_remote(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert cache_remote.open_sync("s3://team-cache", None) is None
    assert "has none" in caplog.text


def test_the_stage_params_in_dvc_yaml_list_every_extract_features_key_that_can_change_an_output():
    stage = yaml.safe_load((REPOSITORY_ROOT / "dvc.yaml").read_text())["stages"]["extract_features"]
    listed = {entry.split(".", 1)[1] for entry in stage["params"] if entry.startswith("extract_features.")}
    assert "extract_features" not in stage["params"], "the whole section would put cache_remote in the hash"
    expected = set(params.ExtractFeaturesParams.model_fields) - NOT_IN_STAGE_PARAMS
    assert listed == expected, (
        f"dvc.yaml, stage extract_features: add `- extract_features.<key>` for {sorted(expected - listed)} "
        f"(or, if a key changes no output, add it to NOT_IN_STAGE_PARAMS here); remove {sorted(listed - expected)}"
    )
