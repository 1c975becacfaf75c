"""The features files contract (transferlab.features.files): writer and readers, the failure cases included."""

from __future__ import annotations

import os

import numpy as np
import pytest

from transferlab.features import files

CLASSES = ("daisy", "rose", "tulip")
LABELS = np.array([0, 0, 1, 1, 2, 2])


def write_features(path, **changes):
    rows, widths = 6, np.array([2, 1])
    arrays = {
        "features": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3),
        "labels": LABELS.astype(np.int32),
        "class_names": np.array(CLASSES),
        "paths": np.array([f"p{i}.jpg" for i in range(rows)]),
        "sha256": np.array([f"{i:064x}" for i in range(rows)]),
        "recipes": np.array([""] * rows),
        "block_specs": np.array(["mobilenet_v2", "tflite:x.tflite"]),
        "block_names": np.array(["mobilenet_v2", "x"]),
        "block_weights": np.array(["w.h5", "random-init-seed0"]),
        "block_engines": np.array(["keras", "tflite"]),
        "block_widths": widths,
        "block_offsets": np.array([0, 2]),
    }
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def test_load_features_reads_the_contract(tmp_path):
    loaded = files.load_features(write_features(tmp_path / "test.npz"))
    assert loaded.features.shape == (6, 3) and loaded.class_names == CLASSES and loaded.engine == ["keras", "tflite"]
    assert [(b.spec, b.name, b.width, b.offset, b.random_init) for b in loaded.blocks] == [
        ("mobilenet_v2", "mobilenet_v2", 2, 0, False),
        ("tflite:x.tflite", "x", 1, 2, True),
    ]
    assert loaded.paths[0] == "p0.jpg" and loaded.source.endswith("test.npz")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": None}, "lacks key.*labels"),
        ({"block_offsets": np.array([0, 1])}, "do not tile"),
        ({"labels": np.array([0, 0, 1, 1, 2, 3], dtype=np.int32)}, r"labels must lie in 0\.\.2"),
        ({"features": np.full((6, 3), np.nan, dtype=np.float32)}, "6 feature row"),
        ({"features": np.zeros((6, 4), dtype=np.float32)}, r"float \(N, 3\)"),
        ({"paths": np.array(["a"])}, "'paths' has 1 entries"),
        ({"class_names": np.array(["a", "a", "b"])}, "unique"),
        ({"recipes": np.array([None] * 6, dtype=object)}, "not a readable features file"),
    ],
)
def test_load_features_errors_name_the_file_and_problem(tmp_path, changes, message):
    path = write_features(tmp_path / "broken.npz", **changes)
    with pytest.raises(ValueError, match=message) as error:
        files.load_features(path)
    assert "broken.npz" in str(error.value)


def test_missing_features_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(ValueError, match="run the extract_features stage"):
        files.load_features(tmp_path / "train.npz")


def test_splits_from_different_extractions_are_refused(tmp_path):
    write_features(tmp_path / "val.npz")
    write_features(tmp_path / "test.npz", block_weights=np.array(["other.h5", "random-init-seed0"]))
    with pytest.raises(ValueError, match="different extractions"):
        files.load_splits(tmp_path, ("val", "test"))
    assert len(files.load_splits(tmp_path, ("val",))["val"]) == 6


def test_written_feature_files_read_back_with_the_images_folder_and_limit(tmp_path):
    arrays = dict(np.load(write_features(tmp_path / "source.npz")))
    feature_sets = {"val": files.FeatureSet(arrays), "test": files.FeatureSet(arrays)}
    files.write_feature_files(tmp_path / "features", feature_sets)
    assert sorted(path.name for path in (tmp_path / "features").iterdir()) == ["test.npz", "val.npz"]
    splits = files.load_splits(
        tmp_path / "features", ("val", "test"), images_directory=tmp_path / "images", max_image_pixels=1234
    )
    for split in splits.values():
        np.testing.assert_array_equal(split.features, arrays["features"])
        assert split.labels.tolist() == LABELS.tolist() and split.class_names == CLASSES
        assert split.images_directory == tmp_path / "images" and split.max_image_pixels == 1234
        assert split.block_engines == ("keras", "tflite") and split.taps == {}
    assert files.stack_name(splits["val"].blocks) == "mobilenet_v2+x"


def test_the_writer_refuses_a_set_the_readers_would_refuse(tmp_path):
    arrays = dict(np.load(write_features(tmp_path / "source.npz")))
    del arrays["block_widths"]
    with pytest.raises(ValueError, match="test features lack key.*block_widths"):
        files.write_feature_files(tmp_path / "features", {"test": files.FeatureSet(arrays)})
    assert not (tmp_path / "features").exists()


def test_block_engines_one_per_block_whatever_the_file_records(tmp_path):
    one = files.load_features(
        write_features(
            tmp_path / "one.npz",
            block_engines=np.array(["keras"]),
            block_specs=np.array(["a"]),
            block_names=np.array(["a"]),
            block_weights=np.array(["w"]),
            block_widths=np.array([3]),
            block_offsets=np.array([0]),
        )
    )
    assert one.engine == "keras" and one.block_engines == ("keras",)
    legacy = files.load_features(write_features(tmp_path / "legacy.npz", block_engines=None))
    assert legacy.engine is None and legacy.block_engines == (None, None)


# --- memory-mapped features files (issue 19: bounded memory) ---------------------------------------


def written(tmp_path, matrix, *, rows=None, name="train.npz"):
    """``matrix`` written by files.write_features_file, streamed ``rows`` rows at a time, with valid small arrays."""
    arrays = dict(np.load(write_features(tmp_path / "source.npz")))
    count = len(matrix)
    arrays.update(
        labels=np.arange(count, dtype=np.int32) % 3,
        paths=np.array([f"p{i}.jpg" for i in range(count)]),
        sha256=np.array([f"{i:064x}" for i in range(count)]),
        recipes=np.array([""] * count),
        block_widths=np.array([matrix.shape[1] - 1, 1]),
        block_offsets=np.array([0, matrix.shape[1] - 1]),
    )
    del arrays["features"]
    path = tmp_path / name
    files.write_features_file(path, files.FeatureSet(arrays, files.RowChunks.of(matrix, rows)))
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_features_are_streamed_in_and_memory_mapped_out(tmp_path, dtype):
    matrix = np.random.default_rng(0).normal(size=(1001, 5)).astype(dtype)
    path = written(tmp_path, matrix, rows=64)  # 16 chunks, the last one short

    loaded = files.load_features(path)
    assert files.is_memory_mapped(loaded.features) and isinstance(loaded.features, np.memmap)
    assert loaded.features.offset % 64 == 0 and not loaded.features.flags.writeable
    assert loaded.features.dtype == dtype
    np.testing.assert_array_equal(loaded.features, matrix)
    with np.load(path) as plain:  # still an .npz that numpy reads
        np.testing.assert_array_equal(plain["features"], matrix)
        assert plain["paths"][-1] == "p1000.jpg"


def test_an_empty_split_reads_back(tmp_path):
    loaded = files.load_features(written(tmp_path, np.zeros((0, 3), np.float32)))
    assert loaded.features.shape == (0, 3) and len(loaded) == 0


def test_a_compressed_features_file_is_read_whole(tmp_path):
    arrays = dict(np.load(write_features(tmp_path / "source.npz")))
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    loaded = files.load_features(tmp_path / "old.npz")
    assert not files.is_memory_mapped(loaded.features)
    np.testing.assert_array_equal(loaded.features, arrays["features"])


def test_a_features_matrix_cut_short_is_refused_with_its_size(tmp_path):
    """A zip whose ``features.npy`` holds fewer rows than its header says (a copy cut short inside the member)."""
    import zipfile

    path = written(tmp_path, np.ones((100, 3), np.float32))
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["features.npy"] = members["features.npy"][: -50 * 3 * 4]  # 50 of 100 rows
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(
        files.TruncatedFile,
        match=r"train\.npz is truncated \(\d+ of \d+ bytes of its features matrix\); re-run extract_features",
    ):
        files.load_features(path)


def test_a_truncated_taps_file_is_refused_with_its_size(tmp_path):
    import json

    folder = tmp_path / "member"
    folder.mkdir()
    (folder / "taps.json").write_text(json.dumps({"layer": "l", "member": "m", "rows": {"train": 4}}))
    np.save(folder / "train.npy", np.ones((4, 2, 2, 3), np.float16))
    assert files.load_member_taps(folder, "train").activations.shape == (4, 2, 2, 3)
    content = (folder / "train.npy").read_bytes()
    (folder / "train.npy").write_bytes(content[:-10])
    with pytest.raises(files.TruncatedFile, match=r"train\.npy is truncated \(\d+ of \d+ bytes\); re-run extract_taps"):
        files.load_member_taps(folder, "train")


def mapped_resident_kib(path) -> int:
    """The resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps", encoding="utf-8"):  # noqa: SIM115
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip("\n").endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_a_pass_over_row_chunks_leaves_about_one_chunk_resident(tmp_path):
    matrix = np.random.default_rng(1).normal(size=(8192, 256)).astype(np.float32)  # 8 MiB
    loaded = files.load_features(written(tmp_path, matrix)).features  # the NaN check was one pass
    assert mapped_resident_kib(tmp_path / "train.npz") < 2048
    total = sum(float(chunk.sum(dtype=np.float64)) for _, chunk in files.row_chunks(loaded, 512))  # 512 KiB chunks
    assert total == pytest.approx(float(matrix.sum(dtype=np.float64)))
    assert mapped_resident_kib(tmp_path / "train.npz") < 2048
    float(np.asarray(loaded).sum())  # a plain pass maps every page: what row_chunks avoids
    assert mapped_resident_kib(tmp_path / "train.npz") > 7 * 1024


def test_rewriting_a_features_file_leaves_its_memory_maps_reading_the_old_rows(tmp_path):
    """The writer renames a new file onto the path: a map of the old one never sees a truncated file (SIGBUS)."""
    old = files.load_features(written(tmp_path, np.ones((4096, 8), np.float32))).features
    new = files.load_features(written(tmp_path, np.full((10, 8), 2.0, np.float32))).features
    assert float(old.sum()) == 4096 * 8 and float(new.sum()) == 10 * 8 * 2.0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source.npz", "train.npz"]


def test_per_row_strings_are_read_only_when_used(tmp_path):
    """train_head never reads paths, sha256 or recipes: at 10^6 rows they would cost 0.6 GB as Python strings."""
    path = write_features(tmp_path / "train.npz")
    loaded = files.load_features(path)
    assert all(column._values is None for column in (loaded.paths, loaded.sha256, loaded.recipes))
    assert len(loaded.paths) == 6 and loaded.sha256[0] == f"{0:064x}"
    assert loaded.paths == tuple(f"p{i}.jpg" for i in range(6)) and list(loaded.recipes) == [""] * 6
    assert loaded.paths._values is not None and loaded.recipes._values is not None


def test_a_per_row_column_of_the_wrong_length_is_refused_from_its_header(tmp_path):
    path = write_features(tmp_path / "train.npz", sha256=np.array(["a" * 64] * 5))
    with pytest.raises(ValueError, match="'sha256' has 5 entries for 6 feature rows; re-run extract_features"):
        files.load_features(path)


def test_a_taps_folder_without_members_leaves_the_per_row_strings_unread(tmp_path):
    write_features(tmp_path / "train.npz")
    files.write_taps_index(tmp_path / "taps", {})  # a logistic head: extract_taps wrote no member
    (train,) = files.load_splits(tmp_path, ("train",), taps_directory=tmp_path / "taps").values()
    assert train.taps == {} and train.sha256._values is None and train.recipes._values is None
