"""The shared embedding cache against a real S3 server (SeaweedFS on 127.0.0.1): two workspaces, damage, races, outages.

Workspaces are local cache folders; extraction runs through the library (the stage script in the
outage test), on a small generated dataset with a random-init MobileNetV2 at 32 px on the Keras engine.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import s3_server as s3

import support
from transferlab import cli
from transferlab.backbones import stack
from transferlab.core import params
from transferlab.features import cache_files, cache_remote, embedding_cache, extract_features

pytestmark = pytest.mark.slow
SETTINGS = {**support.SMALL_PARAMS["extract_features"], "engine": "keras"}
MEMBER = "mobilenet_v2"


@pytest.fixture()
def remote(s3_server, s3_bucket, monkeypatch):
    """The URL of a shared cache in a fresh bucket, with this process's AWS environment pointing at the server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_bucket}/team-cache"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = support.write_dataset(tmp_path_factory.mktemp("photos") / "photos", per_class=6)
    return folder, support.rows_for(folder)


def extract(dataset, cache: Path, url: str, rows: list[dict] | None = None, engine: str = "keras"):
    folder, all_rows = dataset
    rows = all_rows if rows is None else rows
    members = stack.resolve_members(params.parse_section("extract_features", {**SETTINGS, "engine": engine}), seed=0)
    return extract_features.extract_features(
        members=members,
        rows_by_split={"train": rows[::2], "val": rows[1::4], "test": rows[3::4]},
        images_directory=folder,
        cache_directory=cache,
        engine=engine,
        batch_size=8,
        threads=2,
        seed=0,
        max_image_pixels=10**8,
        cache_remote_url=url,
    )


def counters(report: dict) -> dict:
    member = report["backbones"][MEMBER]
    return {name: member[name] for name in ("local_hits", "remote_hits", "embedded", "pushed")}


def shard_objects(s3_server, url: str) -> list[str]:
    fs = cache_remote.filesystem()
    return sorted(path for path in fs.find(cache_remote.root_path(url)) if path.endswith(".shard"))


def test_workspace_b_embeds_nothing_workspace_a_pushed_and_a_warm_run_asks_nothing(dataset, remote, tmp_path):
    """On engine auto: b runs a's converted model (conversions are not byte-reproducible, rows are keyed by them)."""
    _, rows = dataset
    first, first_rows = rows[: len(rows) - 3], len(rows) - 3
    features_a, report_a = extract(dataset, tmp_path / "a", remote, first, engine="auto")
    assert counters(report_a) == {"local_hits": 0, "remote_hits": 0, "embedded": first_rows, "pushed": first_rows}
    assert report_a["backbones"][MEMBER]["engine"] == "tflite" and report_a["cache_remote"]["status"] == "used"

    features_b, report_b = extract(dataset, tmp_path / "b", remote, first, engine="auto")
    assert counters(report_b) == {"local_hits": 0, "remote_hits": first_rows, "embedded": 0, "pushed": 0}
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(features_a[split].arrays["features"], features_b[split].arrays["features"])
    assert list((tmp_path / "b").glob("??/*.sqlite"))[0].name == list((tmp_path / "a").glob("??/*.sqlite"))[0].name

    _, warm = extract(dataset, tmp_path / "b", remote, first, engine="auto")
    assert counters(warm) == {"local_hits": first_rows, "remote_hits": 0, "embedded": 0, "pushed": 0}
    assert warm["cache_remote"]["bytes_fetched"] == 0 and warm["cache_remote"]["seconds"] < 0.05  # no request

    _, grown = extract(dataset, tmp_path / "b", remote, engine="auto")  # three new images: only they are embedded
    assert counters(grown) == {"local_hits": first_rows, "remote_hits": 0, "embedded": 3, "pushed": 3}
    _, third = extract(dataset, tmp_path / "c", remote, engine="auto")
    assert counters(third) == {"local_hits": 0, "remote_hits": len(rows), "embedded": 0, "pushed": 0}
    assert third["backbones"][MEMBER]["remote_shards_fetched"] == 2


def test_a_corrupted_shard_is_skipped_its_rows_recomputed_and_pushed_intact_again(
    dataset, remote, tmp_path, s3_server, caplog
):
    _, rows = dataset
    clean, _ = extract(dataset, tmp_path / "a", remote)
    (shard,) = shard_objects(s3_server, remote)
    fs = cache_remote.filesystem()
    content = bytearray(fs.cat_file(shard))
    content[len(content) // 2] ^= 0xFF  # one flipped byte in the rows
    fs.pipe_file(shard, bytes(content))

    with caplog.at_level(logging.WARNING, logger="transferlab.features.cache_remote"):
        again, report = extract(dataset, tmp_path / "b", remote)
    assert counters(report) == {"local_hits": 0, "remote_hits": 0, "embedded": len(rows), "pushed": len(rows)}
    assert report["backbones"][MEMBER]["remote_shards_rejected"] == 1
    assert f"s3://{shard}" in caplog.text and "not its name" in caplog.text
    np.testing.assert_array_equal(clean["train"].arrays["features"], again["train"].arrays["features"])

    # The same rows make the same bytes: the push rewrote the damaged object intact.
    assert shard_objects(s3_server, remote) == [shard]
    _, healed = extract(dataset, tmp_path / "c", remote)
    assert counters(healed)["remote_hits"] == len(rows) and healed["backbones"][MEMBER]["remote_shards_rejected"] == 0


PUSHER = """
import sys
import numpy as np
from transferlab.features import cache_remote
url, first, last, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
remote = cache_remote.Remote(url, None, shard_max_bytes=4096)  # several shards per push
rows = {(f"{number:064x}", ""): np.full(64, number, np.float32) for number in range(first, last)}
for round in range(3):
    order = np.random.default_rng(seed + round).permutation(len(rows))
    subset = dict(list(rows.items())[index] for index in order[: len(rows) * 3 // 4])
    remote.push("%s", subset, {"name": "test"})
"""


def test_concurrent_pushes_of_overlapping_rows_leave_a_cache_both_can_read(remote, tmp_path):
    namespace = "ab" * 32
    script = PUSHER % namespace
    writers = [
        subprocess.Popen([sys.executable, "-c", script, remote, "0", "300", "1"]),
        subprocess.Popen([sys.executable, "-c", script, remote, "100", "400", "2"]),
    ]
    assert [writer.wait(timeout=300) for writer in writers] == [0, 0]

    wanted = [(f"{number:064x}", "") for number in range(400)]
    for reader in ("a", "b"):
        sync = cache_remote.RunSync(remote, tmp_path / reader)
        with embedding_cache.EmbeddingCache(tmp_path / reader, namespace, description={}) as cache:
            fetched = sync.pull(cache, wanted, label="reader")
            found = cache.get_many(wanted)
        assert sync.problem is None and fetched == len(found) > 300  # each writer pushed 3/4 of its rows 3 times
        for (digits, _), array in found.items():
            np.testing.assert_array_equal(array, np.full(64, int(digits, 16), np.float32))
        assert sync.member_report("reader")["remote_shards_rejected"] == 0


def test_cache_list_shows_local_and_remote_rows_per_namespace(remote, tmp_path, s3_server):
    description = {"name": MEMBER, "weights": "random-init-seed0", "image_size": 32, "engine": "keras"}
    rows = {(f"{number:064x}", ""): np.full(8, number, np.float32) for number in range(30)}
    with embedding_cache.EmbeddingCache(tmp_path / "a", "ab" * 32, description=description) as cache:
        cache.put_many(dict(list(rows.items())[:20]))
    cache_remote.Remote(remote, None, shard_max_bytes=320).push("ab" * 32, rows, description)  # 10 rows a shard
    result = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "cache", "list", "--cache-dir", str(tmp_path / "a")]
        + ["--remote", remote, "--json"],
        capture_output=True,
        text=True,
        env=support.Project(tmp_path).environment | s3_server.env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (namespace,) = json.loads(result.stdout)["namespaces"]
    assert (namespace["local"]["rows"], namespace["remote"]["rows"], namespace["remote"]["shards"]) == (20, 30, 3)
    assert namespace["description"]["name"] == MEMBER and namespace["remote"]["bytes"] > 30 * 8 * 4


# One workspace's extraction in a child process: argv = tests/pipeline, photos, cache folder, url, row count, .npy out.
CHILD = """
import json, pathlib, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import support
from test_shared_cache_s3 import extract
folder = pathlib.Path(sys.argv[2])
rows = support.rows_for(folder)
features, report = extract((folder, rows), pathlib.Path(sys.argv[3]), sys.argv[4], rows[: int(sys.argv[5])])
np.save(sys.argv[6], features["train"].arrays["features"])
print(json.dumps(report))
"""


def test_with_the_server_stopped_mid_run_the_run_completes_locally_with_one_warning(dataset, tmp_path, monkeypatch):
    folder, rows = dataset
    here = str(Path(__file__).parent)
    with s3.S3Server(tmp_path / "own-server") as server:  # this test stops it: not the session's server
        url = f"s3://{server.make_bucket()}/team-cache"
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        half = len(rows) // 2
        extract(dataset, tmp_path / "a", url, rows[:half])  # workspace a pushes half the rows
        environment = support.Project(tmp_path).environment | server.env()
        environment["PYTHONPATH"] = str(Path(here).parent)

        # Workspace b fetches a's half, then the server goes away while b embeds the other half.
        second = [sys.executable, "-c", CHILD, here, str(folder), str(tmp_path / "b"), url, str(len(rows)), "b.npy"]
        child = subprocess.Popen(second, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        stderr, embedding = bytearray(), threading.Event()

        def read_stderr():  # tqdm redraws with carriage returns: read chunks, not lines
            for chunk in iter(lambda: child.stderr.read1(4096), b""):
                stderr.extend(chunk)
                if b"embedding mobilenet_v2" in stderr:
                    embedding.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        assert embedding.wait(timeout=300), stderr.decode(errors="replace")[-3000:]
        server.stop()
        stdout = child.stdout.read()
        assert child.wait(timeout=300) == 0, stderr.decode(errors="replace")[-3000:]
        reader.join(timeout=10)

    report = json.loads(stdout.decode().strip().splitlines()[-1])
    member = report["backbones"][MEMBER]
    assert (member["remote_hits"], member["embedded"], member["pushed"]) == (half, len(rows) - half, 0)
    assert report["cache_remote"]["status"].startswith("unusable: ")
    assert report["cache_remote"]["seconds"] < 60  # bounded timeouts: seconds, not minutes
    log = stderr.decode(errors="replace")
    assert log.count("cannot be used") == 1 and f"The shared embedding cache {url} cannot be used" in log
    reference, _ = extract(dataset, tmp_path / "local-only", "")
    # Workspace b embedded its half in smaller batches than the local-only run: on an AVX2-only CPU
    # XNNPACK's float32 results then differ in the last bits (seen: 1e-17 on values of 1e-11),
    # so the features are compared to float32 precision, not bit for bit.
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), reference["train"].arrays["features"], rtol=1e-5, atol=1e-7)


def test_through_dvc_a_teammate_with_an_empty_cache_embeds_nothing_and_the_url_reruns_nothing(
    dvc_project, remote, s3_server, tmp_path
):
    project = dvc_project
    project.environment.update(s3_server.env())
    project.set_params(extract_features={"cache_remote": remote})
    project.commit("shared cache")
    project.dvc("repro", "extract_features")
    metrics = project.root / "metrics" / "extract_features.json"
    first = json.loads(metrics.read_text())
    assert first["pushed"] == first["embedded"] > 0 and first["remote_hits"] == 0

    project.set_params(extract_features={"cache_remote": ""})  # where shared rows come from changes no feature
    assert "up to date" in project.dvc("status", "extract_features").stdout

    shutil.rmtree(tmp_path / "embedding-cache")  # a teammate's machine: an empty local cache
    project.environment["TRANSFERLAB_CACHE_REMOTE"] = remote  # as CI sets it from a secret
    project.dvc("repro", "--force", "--single-item", "extract_features")
    second = json.loads(metrics.read_text())
    assert (second["embedded"], second["remote_hits"], second["pushed"]) == (0, first["embedded"], 0)
    assert "up to date" in project.dvc("status", "extract_features").stdout


def test_a_tampered_shared_conversion_is_skipped_and_the_next_intact_one_adopted(remote, tmp_path, caplog):
    member = SimpleNamespace(
        kind="keras", name=MEMBER, identity="mobilenet_v2@0.35", weights_identity="random-init-seed0", image_size=32
    )
    key = cache_remote.conversion_key(member)
    shared = cache_remote.Remote(remote, None)
    models = [b"the first conversion's bytes" * 50, b"the second conversion's bytes" * 50]
    for model in models:  # written in this order: the first is the oldest, the team's
        verdict = {"agrees": True, "tflite_sha256": cache_files.content_sha256(model), "identity": "x", "version": 1}
        shared.push_conversion(key, {**verdict, "checksum": cache_files.record_checksum(verdict)}, model)
        time.sleep(1.1)  # S3 times objects to the second
    first = cache_files.content_sha256(models[0])
    shared.fs.pipe_file(f"{shared.root}/converted/{key}/{first}.tflite", b"tampered")
    directory = tmp_path / "cache" / "converted"

    sync = cache_remote.RunSync(remote, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="transferlab.features.cache_remote"):
        sync.adopt_conversions([member], directory, "auto")
    assert f"Shared converted model {first} of {MEMBER} is not used" in caplog.text
    adopted = json.loads((directory / f"{key}.json").read_text())
    second = cache_files.content_sha256(models[1])
    assert adopted["tflite_sha256"] == second and sync.problem is None
    assert (directory / f"{key}-{second[:16]}.tflite").read_bytes() == models[1]


def test_cache_push_seeds_the_shared_cache_with_what_it_lacks(remote, tmp_path, capsys):
    namespace, description = "cd" * 32, {"name": MEMBER, "engine": "tflite"}
    rows = {(f"{number:064x}", ""): np.full(8, number, np.float32) for number in range(30)}
    with embedding_cache.EmbeddingCache(tmp_path / "a", namespace, description=description) as cache:
        cache.put_many(rows)
    cache_remote.Remote(remote, None).push(namespace, dict(list(rows.items())[:10]), description)
    model = b"a converted model's bytes" * 40
    verdict = {"agrees": True, "tflite_sha256": cache_files.content_sha256(model), "identity": "x", "version": 1}
    converted = tmp_path / "a" / "converted"
    key = "ef" * 32
    cache_files.write_record(converted / f"{key}.json", verdict)
    (converted / f"{key}-{verdict['tflite_sha256'][:16]}.tflite").write_bytes(model)

    arguments = ["cache", "push", "--cache-dir", str(tmp_path / "a"), "--remote", remote]
    assert cli.main(arguments) == 0 and "20 rows pushed" in capsys.readouterr().out
    assert cli.main(arguments) == 0 and "0 rows pushed" in capsys.readouterr().out
    assert cache_remote.Remote(remote, None).conversions(key) == [verdict["tflite_sha256"]]
    sync = cache_remote.RunSync(remote, tmp_path / "b")
    with embedding_cache.EmbeddingCache(tmp_path / "b", namespace, description={}) as reader:
        assert sync.pull(reader, list(rows), label="reader") == 30
