"""Engines (pooling, cosine) and engine choice (the fallback to Keras when conversion fails or disagrees)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from transferlab.features import engine_choice, engines


def test_pool_and_flatten_average_pools_spatial_outputs():
    output = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    np.testing.assert_allclose(engines.pool_and_flatten(output), output.mean(axis=(1, 2)))
    assert engines.pool_and_flatten(np.ones((2, 1, 1, 5))).shape == (2, 5)
    assert engines.pool_and_flatten(np.ones((2, 7))).shape == (2, 7)


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(engines.cosine_similarity(a, b), [1.0, 1.0, -1.0])


class FakeEngine:
    name = "fake"

    def __init__(self, scale=1.0):
        self.scale = scale

    def run(self, pixels):
        return pixels.reshape(len(pixels), -1) * self.scale


@pytest.mark.parametrize("failure", ["conversion", "disagreement"])
def test_auto_falls_back_to_keras_with_a_warning(failure, tmp_path, monkeypatch, caplog):
    def convert(model, destination):
        if failure == "conversion":
            raise RuntimeError("op not supported")
        destination.write_bytes(b"model")
        return destination

    monkeypatch.setattr(engines, "convert_to_tflite", convert)
    monkeypatch.setattr(engines, "TFLiteEngine", lambda path: FakeEngine(1.0))
    monkeypatch.setattr(engines, "KerasEngine", lambda model: FakeEngine(1.0) if model == "same" else FakeEngine(-1.0))
    sample = lambda: np.random.default_rng(0).uniform(0, 255, (4, 2, 2, 3))
    with caplog.at_level(logging.WARNING):
        choice = engine_choice.choose_keras_engine(requested="auto", build_model=lambda: "different", conversion_directory=tmp_path, identity="x", sample_pixels=sample)
    assert choice.name == "keras" and not choice.verdict["agrees"]
    assert "falling back to Keras" in caplog.text
    with pytest.raises(ValueError, match="engine: keras"):
        engine_choice.choose_keras_engine(requested="tflite", build_model=lambda: "different", conversion_directory=tmp_path, identity="x", sample_pixels=sample)
    agreeing = engine_choice.choose_keras_engine(requested="auto", build_model=lambda: "same", conversion_directory=tmp_path, identity="z", sample_pixels=sample)
    assert agreeing.name == "tflite" if failure == "disagreement" else agreeing.name == "keras"
