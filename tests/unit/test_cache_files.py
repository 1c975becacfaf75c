"""Files in the cache folder are checked before use; an unusable cache folder is named, not a traceback."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from transferlab.backbones.stack import Member
from transferlab.core import paths
from transferlab.features import cache_files, decode, embedding_cache, engine_choice, extract_features


def test_a_record_comes_back_as_written(tmp_path, caplog):
    path = tmp_path / "verdict.json"
    written = cache_files.write_record(path, {"agrees": True, "cosine": 0.99999, "reason": "été"})
    with caplog.at_level(logging.WARNING):
        assert cache_files.read_record(path, consequence="recomputing") == written
        assert cache_files.read_record(tmp_path / "absent.json", consequence="recomputing") is None
    assert caplog.text == "", "an intact or absent record is no news"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("garbage{", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "does not hold a JSON object"),
        ('{"agrees": true, "reason": "old format"}', "has no checksum"),
        (None, "does not match its checksum"),  # a field changed after writing
    ],
)
def test_a_damaged_record_is_named_with_what_happens_and_not_used(tmp_path, caplog, content, problem):
    path = tmp_path / "ab12.json"
    if content is None:
        cache_files.write_record(path, {"agrees": True, "tflite_sha256": "a" * 64})
        record = json.loads(path.read_text())
        record["agrees"] = False
        path.write_text(json.dumps(record))
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert cache_files.read_record(path, consequence="converting again") is None
    assert f"Cache file {path} {problem}" in caplog.text and "converting again" in caplog.text


def test_a_recorded_file_is_checked_against_its_sha256(tmp_path, caplog):
    path = tmp_path / "backbone.keras"
    path.write_bytes(b"x" * 10_000)
    assert cache_files.intact_file_sha256(path, consequence="saving again") is None  # no record: not trusted
    assert "has no sha256 record" in caplog.text
    caplog.clear()
    sha256 = cache_files.record_file(path)
    with caplog.at_level(logging.WARNING):
        assert cache_files.intact_file_sha256(path, consequence="saving again") == sha256
    assert caplog.text == ""
    damaged = bytearray(path.read_bytes())
    damaged[4096:8192] = bytes(byte ^ 0xFF for byte in damaged[4096:8192])
    path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        assert cache_files.intact_file_sha256(path, consequence="saving again") is None
    assert f"Cache file {path} does not match the sha256 recorded in backbone.keras.sha256.json" in caplog.text
    assert cache_files.intact_file_sha256(tmp_path / "absent.keras", consequence="saving again") is None


# ---------------------------------------------------------------- unusable cache folders


def _immutable_folder(path: Path) -> Path:
    """A folder nothing can be created in, even by root: permissions for users, chattr +i for root."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"root cannot make a read-only folder here (chattr +i: {result.stderr.strip()})")
    return path


@pytest.fixture()
def read_only_folder(tmp_path):
    folder = _immutable_folder(tmp_path / "read-only")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def test_the_probe_names_why_a_folder_is_unusable(tmp_path, read_only_folder):
    (tmp_path / "a-file").write_text("not a folder")
    assert paths.unwritable_reason(tmp_path / "a-file") == "it is a file, not a folder"
    assert paths.unwritable_reason(tmp_path / "a-file" / "cache") == "a part of its path is a file, not a folder"
    assert paths.unwritable_reason("/proc/self").startswith("cannot create files there: [Errno")
    assert paths.unwritable_reason(read_only_folder).startswith("cannot create files there: [Errno")
    assert paths.unwritable_reason(tmp_path / "new" / "cache") is None and (tmp_path / "new" / "cache").is_dir()
    assert list((tmp_path / "new" / "cache").iterdir()) == [], "the probe leaves nothing behind"
    assert embedding_cache.unusable_reason(tmp_path / "new" / "cache") is None
    assert list((tmp_path / "new" / "cache").iterdir()) == []
    assert embedding_cache.unusable_reason("/proc/self") is not None
    assert embedding_cache.unusable_reason(read_only_folder) is not None


@pytest.mark.parametrize("where", ["proc", "file", "read-only"])
def test_an_unusable_folder_raises_one_line_naming_the_database(tmp_path, request, where):
    if where == "proc":
        directory = Path("/proc/self")
    elif where == "file":
        directory = tmp_path / "cache"
        directory.write_text("a file where the cache folder should be")
    else:
        directory = request.getfixturevalue("read_only_folder")
    namespace = embedding_cache.namespace_key(backbone="b", weights_identity="w", image_size=8, engine="keras")
    with pytest.raises(embedding_cache.CacheUnavailable) as raised:
        embedding_cache.EmbeddingCache(directory, namespace, description={})
    message = str(raised.value)
    assert isinstance(raised.value, ValueError) and "\n" not in message
    assert str(directory) in message and "extract_features.cache_dir" in message


# ---------------------------------------------------------------- embedding with fake engines


class ScaledEngine:
    """Embeds pixels as their per-channel means times a factor: a damaged model is another factor."""

    def __init__(self, factor: float):
        self.factor = factor

    def run(self, pixels):
        means = np.asarray(pixels, dtype=np.float32).mean(axis=(1, 2)) * self.factor
        return np.repeat(means, 2000, axis=1)  # 24 KB a row: more than one database page


MEMBER = Member(
    spec="fake", name="fake", kind="tflite", identity="tflite:fake#", weights_identity="f" * 64, image_size=4
)
ITEMS = [decode.Item(f"{index:064x}", "", f"image-{index}.png") for index in range(10)]


def _embed(cache_directory, content_sha256: str, factor: float, open_cache=None):
    choice = engine_choice.ConvertedEngine("tflite", lambda: ScaledEngine(factor), {}, content_sha256=content_sha256)
    (run,) = extract_features.embed(
        [MEMBER],
        ITEMS,
        open_cache=open_cache or (lambda member, chosen: extract_features._open_cache(cache_directory, member, chosen)),
        choose_engine=lambda member, sample: choice,
        render_one=lambda item, size: np.full((size, size, 3), int(item.sha256, 16), dtype=np.uint8),
        batch_size=4,
        threads=1,
    )
    return run


def test_rows_made_by_a_damaged_model_land_in_another_namespace(tmp_path):
    good, damaged = "a" * 64, "b" * 64
    first = _embed(tmp_path, good, factor=1.0)
    assert first.computed == len(ITEMS)
    slipped = _embed(tmp_path, damaged, factor=-3.0)  # a damaged model that got past every check
    assert slipped.hits == 0 and slipped.computed == len(ITEMS), "the good model's rows are never served to it"
    again = _embed(tmp_path, good, factor=1.0)
    assert again.hits == len(ITEMS) and again.computed == 0
    keys = [item.key for item in ITEMS]
    # the damaged run wrote nothing under the good key
    np.testing.assert_array_equal(again.read(keys), np.stack([np.full(6000, float(i)) for i in range(10)]))
    assert len(list(tmp_path.glob("*/*.sqlite"))) == 2


def test_the_namespace_names_the_model_bytes_and_keras_keys_are_unchanged():
    fields = {"backbone": "mobilenet_v2", "weights_identity": "a" * 64, "image_size": 224, "engine": "tflite"}
    keys = {embedding_cache.namespace_key(**fields, model_sha256=sha) for sha in ("", "1" * 64, "2" * 64)}
    assert len(keys) == 3
    keras = {**fields, "engine": "keras"}
    assert embedding_cache.namespace_key(**keras) == embedding_cache.namespace_key(**keras, model_sha256="")
    with pytest.raises(ValueError, match="model_sha256"):
        embedding_cache.namespace_key(**fields, model_sha256="not-a-hash")


def test_a_run_holds_no_embeddings_and_its_files_are_assembled_from_the_cache_a_chunk_at_a_time(tmp_path):
    run = _embed(tmp_path, "a" * 64, factor=1.0)
    assert run.computed == len(ITEMS) and run.rows.held == {}, "every embedding went to the cache, none is held"
    rows = [{"sha256": item.sha256, "recipe": "", "path": item.path, "label": "x"} for item in reversed(ITEMS)]
    feature_set = extract_features.assemble(rows, [run], ["x"], chunk_rows=3)
    chunks = list(feature_set.rows().chunks())
    assert [chunk.shape for chunk in chunks] == [(3, 6000), (3, 6000), (3, 6000), (1, 6000)]
    np.testing.assert_array_equal(np.vstack(chunks)[:, 0], np.arange(len(ITEMS))[::-1])  # in the rows' order
    with sqlite3.connect(run.rows.cache.path) as other:  # another process prunes the cache under the run
        other.execute("DELETE FROM entries")
    with pytest.raises(ValueError, match="no longer in its cache.*Run extract_features again"):
        next(feature_set.rows().chunks())  # a clear error, not a KeyError


def test_a_cache_that_fails_mid_run_is_left_with_one_warning_and_the_run_completes(tmp_path, caplog):
    namespace = embedding_cache.namespace_key(backbone="b", weights_identity="w", image_size=4, engine="tflite")
    cache = embedding_cache.EmbeddingCache(tmp_path, namespace, description={})
    used = cache._connection.execute("PRAGMA page_count").fetchone()[0]
    cache._connection.execute(f"PRAGMA max_page_count = {used}")  # the disk is full from now on
    with caplog.at_level(logging.WARNING):
        run = _embed(tmp_path, "a" * 64, factor=1.0, open_cache=lambda member, chosen: cache)
    assert run.computed == len(ITEMS) and len(run.rows.held) == len(ITEMS), "what the cache could not take is held"
    np.testing.assert_array_equal(run.read([item.key for item in ITEMS])[:, 0], np.arange(len(ITEMS)))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert (
        str(cache.path) in warnings[0]
        and "full" in warnings[0]
        and "goes on without the embedding cache" in warnings[0]
    )


def test_a_damaged_saved_backbone_is_saved_again_and_its_copy_checked(tmp_path, caplog):
    from transferlab.features import tap_jobs

    saves = []

    class Backbone:
        def save(self, path):
            saves.append(path)
            Path(path).write_bytes(b"keras zip " * 1000)

    keras_member = Member(spec="m", name="m", kind="keras", identity="m", weights_identity="w", image_size=32)
    job = tap_jobs.TapJob(member=keras_member, layer="l", cache=None, choice=None, build_backbone=Backbone)
    converted, destination = tmp_path / "converted", tmp_path / "backbone.keras"
    tap_jobs._copy_backbone(job, converted, destination)
    tap_jobs._copy_backbone(job, converted, destination)
    assert len(saves) == 1, "an intact saved backbone is reused"
    (saved,) = converted.glob("*.keras")
    damaged = bytearray(saved.read_bytes())
    damaged[100:200] = bytes(200 - 100)
    saved.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        tap_jobs._copy_backbone(job, converted, destination)
    assert len(saves) == 2 and f"Cache file {saved} does not match the sha256" in caplog.text
    assert destination.read_bytes() == b"keras zip " * 1000


def test_without_a_cache_folder_the_run_stores_its_embeddings_in_a_temporary_one_removed_after(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with extract_features.embedding_store(None) as store:
        run = _embed(store, "a" * 64, factor=1.0)
        assert run.rows.held == {} and list(store.glob("*/*.sqlite")), "the rows are on disk, not in memory"
        np.testing.assert_array_equal(run.read([ITEMS[3].key])[0, :2], [3.0, 3.0])
        run.rows.cache.close()
    assert list(tmp_path.iterdir()) == [], "nothing is remembered"
    with extract_features.embedding_store(tmp_path / "cache") as store:
        assert store == tmp_path / "cache"


def test_split_rows_are_columns_with_the_original_recipe_when_none_is_given():
    rows = extract_features.SplitRows.of(
        [
            {"path": "a/1.jpg", "label": "a", "sha256": "1" * 64},
            {"path": "b/2.jpg", "label": "b", "sha256": "2" * 64, "recipe": "flip"},
        ]
    )
    assert len(rows) == 2 and rows.recipes == ["", "flip"] and rows.labels == ["a", "b"]
    assert rows.keys(1) == [("2" * 64, "flip")] and extract_features.SplitRows.of(rows) is rows


def test_unique_items_take_columns_or_row_mappings_alike_and_keep_each_view_once_in_split_order():
    """extract_features passes SplitRows, extract_taps the rows as mappings: both give the same views."""
    rows = {
        "val": [{"path": "b/2.jpg", "label": "b", "sha256": "2" * 64, "recipe": ""}],
        "train": [
            {"path": "a/1.jpg", "label": "a", "sha256": "1" * 64, "recipe": ""},
            {"path": "a/1.jpg", "label": "a", "sha256": "1" * 64, "recipe": "flip"},
            {"path": "b/2.jpg", "label": "b", "sha256": "2" * 64, "recipe": ""},
        ],
        "test": [{"path": "c/1.jpg", "label": "a", "sha256": "1" * 64, "recipe": ""}],
    }
    from_mappings = extract_features.unique_items(rows)
    from_columns = extract_features.unique_items({split: extract_features.SplitRows.of(r) for split, r in rows.items()})
    expected = [("1" * 64, ""), ("1" * 64, "flip"), ("2" * 64, "")]
    assert [item.key for item in from_mappings] == [item.key for item in from_columns] == expected
    assert [item.path for item in from_mappings] == ["a/1.jpg", "a/1.jpg", "b/2.jpg"]
