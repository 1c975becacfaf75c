"""extract_features.storage_dtype: float16 features files, read back and trained on; overflow and truncation refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from transferlab.features import extract_features, files
from transferlab.heads import logistic

CLASSES = ["a", "b"]


def member_run(vectors: dict) -> extract_features.MemberRun:
    member = SimpleNamespace(spec="mobilenet", name="mobilenet", weights_identity="random-init-seed0")
    return extract_features.MemberRun.of_vectors(member, "tflite", vectors)


def rows_and_runs(values: np.ndarray):
    rows = [
        {
            "sha256": f"{index:064x}",
            "recipe": "",
            "path": f"{CLASSES[index % 2]}/{index}.jpg",
            "label": CLASSES[index % 2],
        }
        for index in range(len(values))
    ]
    vectors = {(row["sha256"], ""): value for row, value in zip(rows, values, strict=True)}
    return rows, [member_run(vectors)]


def test_float16_files_hold_the_rounded_features_and_train_a_head(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    values = (rng.normal(size=(60, 8)) + 2.0 * labels[:, None]).astype(np.float32)
    rows, runs = rows_and_runs(values)
    feature_set = extract_features.assemble(rows, runs, CLASSES, storage_dtype="float16")
    files.write_feature_files(tmp_path, {"train": feature_set, "val": feature_set})

    loaded = files.load_splits(tmp_path, ("train", "val"))
    assert loaded["train"].features.dtype == np.float16
    np.testing.assert_array_equal(loaded["train"].features, values.astype(np.float16))
    outcome = logistic.train(
        train=loaded["train"],
        val=loaded["val"],
        seed=0,
        class_weight="none",
        c_grid=[1.0],
        max_iter=100,
        select_by="accuracy",
    )
    assert np.mean(outcome.head.predict_proba(loaded["val"].features).argmax(axis=1) == labels) > 0.9


def test_float16_refuses_values_it_cannot_hold():
    rows, runs = rows_and_runs(np.array([[1.0, 70000.0], [0.5, 2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="exceeds float16's range; set extract_features.storage_dtype: float32"):
        extract_features.assemble(rows, runs, CLASSES, storage_dtype="float16")
    assert extract_features.assemble(rows, runs, CLASSES).arrays["features"].dtype == np.float32


@pytest.mark.parametrize("kept", [0.5, 0.98])
def test_a_truncated_features_file_is_refused_with_its_name(tmp_path, kept):
    rows, runs = rows_and_runs(np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32))
    files.write_feature_files(
        tmp_path, {"train": extract_features.assemble(rows, runs, CLASSES, storage_dtype="float16")}
    )
    path = tmp_path / "train.npz"
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * kept)])
    with pytest.raises(ValueError, match=r"train\.npz is not a readable features file .*re-run extract_features"):
        files.load_features(path)


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_assemble_streams_the_matrix_in_chunks_with_the_same_file(tmp_path, storage_dtype):
    """extract_features never builds the whole matrix: chunks of 7 rows give the file of one chunk."""
    values = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    rows, runs = rows_and_runs(values)
    chunked = extract_features.assemble(rows, runs, CLASSES, storage_dtype=storage_dtype, chunk_rows=7)
    assert "features" not in dict(chunked.arrays) and chunked.matrix.shape == (50, 8)
    assert [len(chunk) for chunk in chunked.matrix.chunks()] == [7] * 7 + [1]
    files.write_feature_files(tmp_path / "chunked", {"train": chunked})
    whole = extract_features.assemble(rows, runs, CLASSES, storage_dtype=storage_dtype, chunk_rows=1000)
    files.write_feature_files(tmp_path / "whole", {"train": whole})

    loaded = files.load_features(tmp_path / "chunked" / "train.npz")
    assert files.is_memory_mapped(loaded.features) and loaded.features.dtype == np.dtype(storage_dtype)
    np.testing.assert_array_equal(loaded.features, values.astype(storage_dtype))
    np.testing.assert_array_equal(loaded.features, files.load_features(tmp_path / "whole" / "train.npz").features)
    np.testing.assert_array_equal(chunked.arrays["features"], values.astype(storage_dtype))  # built on demand
