"""The logistic head out of core (train_head.logistic.max_memory_gb): the same standardization and head."""

from __future__ import annotations

import numpy as np
import pytest
from test_heads import blob_splits, train_logistic

from transferlab.features import files
from transferlab.heads import base, logistic_streaming

OUT_OF_CORE = {"max_memory_gb": 1e-9}  # every matrix is larger: always out of core


def test_the_streaming_standardizer_equals_the_in_memory_one(monkeypatch):
    monkeypatch.setattr(logistic_streaming, "CHUNK_ROWS", 7)  # many uneven chunks, merged
    rng = np.random.default_rng(0)
    widths = (3, 5)
    features = np.hstack([rng.normal(5.0, 0.01, size=(100, 3)), rng.normal(-2.0, 40.0, size=(100, 5))])
    features[:, 1] = 4.0  # a constant column
    streamed = logistic_streaming.streaming_standardizer(features.astype(np.float32), widths)
    in_memory = base.BlockStandardizer(widths=widths).fit(features.astype(np.float32))
    np.testing.assert_allclose(streamed.mean_, in_memory.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.scale_, in_memory.scale_, rtol=1e-9)


def test_chunked_probabilities_equal_one_pass_probabilities(monkeypatch):
    train_split, val_split, _ = blob_splits(1)
    head = train_logistic(train_split, val_split, c_grid=[1.0]).head
    whole = head.predict_proba(train_split.features)
    monkeypatch.setattr(logistic_streaming, "CHUNK_ROWS", 13)
    np.testing.assert_allclose(head.predict_proba(train_split.features), whole, rtol=1e-12)


@pytest.mark.parametrize("classes", [2, 4])
def test_out_of_core_agrees_with_in_memory(monkeypatch, classes):
    """Tolerance: the same C, probabilities within 0.01 and the same prediction on 99% of test rows.

    Both minimize the same objective with L-BFGS to scikit-learn's gradient tolerance (1e-4); they
    differ in float summation order (chunks of rows) and in where the line searches stop.
    """
    monkeypatch.setattr(logistic_streaming, "CHUNK_ROWS", 256)
    train_split, val_split, test_split = blob_splits(
        4, classes=classes, widths=(16, 48), separation=0.35, per_class=(1500, 300, 300)
    )
    in_memory = train_logistic(train_split, val_split)
    out_of_core = train_logistic(train_split, val_split, **OUT_OF_CORE)

    assert in_memory.report["solver"] == "lbfgs" and out_of_core.report["solver"] == "lbfgs-streaming"
    assert out_of_core.report["c"] == in_memory.report["c"] and out_of_core.report["converged"]
    expected = in_memory.head.predict_proba(test_split.features)
    got = out_of_core.head.predict_proba(test_split.features)
    accuracy = float(np.mean(expected.argmax(axis=1) == test_split.labels))
    assert 1.0 / classes + 0.1 < accuracy < 0.99  # neither trivial nor saturated
    assert np.mean(expected.argmax(axis=1) == got.argmax(axis=1)) >= 0.99
    assert np.abs(expected - got).max() < 0.01


def test_memory_mapped_features_train_the_same_head(monkeypatch, tmp_path):
    """Features as load_features gives them (a read-only memory map, pages released chunk by chunk): same head."""
    import dataclasses

    monkeypatch.setattr(logistic_streaming, "CHUNK_ROWS", 50)
    train_split, val_split, _ = blob_splits(2)
    np.save(tmp_path / "train.npy", train_split.features)
    mapped = dataclasses.replace(train_split, features=np.load(tmp_path / "train.npy", mmap_mode="r"))
    assert files.is_memory_mapped(mapped.features)
    in_ram = train_logistic(train_split, val_split, **OUT_OF_CORE)
    from_file = train_logistic(mapped, val_split, **OUT_OF_CORE)
    np.testing.assert_array_equal(from_file.head.coef, in_ram.head.coef)
    np.testing.assert_array_equal(
        from_file.head.predict_proba(mapped.features), in_ram.head.predict_proba(train_split.features)
    )
