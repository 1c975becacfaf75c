"""Engines (pooling, cosine) and engine choice: the fallback to Keras, and checking what the conversion folder holds."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from transferlab.features import cpu, engine_choice, engines


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
    def convert(model):
        if failure == "conversion":
            raise RuntimeError("op not supported")
        return b"model"

    monkeypatch.setattr(engines, "converted_content", convert)
    monkeypatch.setattr(engines, "TFLiteEngine", lambda path, **options: FakeEngine(1.0))
    monkeypatch.setattr(engines, "KerasEngine", lambda model: FakeEngine(1.0) if model == "same" else FakeEngine(-1.0))

    def sample():
        return np.random.default_rng(0).uniform(0, 255, (4, 2, 2, 3))

    with caplog.at_level(logging.WARNING):
        choice = engine_choice.choose_keras_engine(
            requested="auto",
            build_model=lambda: "different",
            conversion_directory=tmp_path,
            identity="x",
            sample_pixels=sample,
        )
    assert choice.name == "keras" and not choice.verdict["agrees"]
    assert "falling back to Keras" in caplog.text
    with pytest.raises(ValueError, match="engine: keras"):
        engine_choice.choose_keras_engine(
            requested="tflite",
            build_model=lambda: "different",
            conversion_directory=tmp_path,
            identity="x",
            sample_pixels=sample,
        )
    agreeing = engine_choice.choose_keras_engine(
        requested="auto", build_model=lambda: "same", conversion_directory=tmp_path, identity="z", sample_pixels=sample
    )
    assert agreeing.name == "tflite" if failure == "disagreement" else agreeing.name == "keras"


# ---------------------------------------------------------------- what the conversion folder holds is checked


class RecordingEngine:
    """Stands in for LiteRT; remembers the model bytes it was given."""

    def __init__(self, path, *, content=None, **options):
        self.content = content

    def run(self, pixels):
        return pixels.reshape(len(pixels), -1)


MODEL_BYTES = bytes(range(256)) * 64  # 16 KB "converted model"


@pytest.fixture()
def converter(monkeypatch):
    """A deterministic fake converter that counts its calls; Keras and LiteRT agree exactly."""
    calls = []

    def convert(model):
        calls.append(model)
        return MODEL_BYTES

    monkeypatch.setattr(engines, "converted_content", convert)
    monkeypatch.setattr(engines, "TFLiteEngine", RecordingEngine)
    monkeypatch.setattr(engines, "KerasEngine", lambda model: FakeEngine(1.0))
    return calls


def choose(folder, identity="mobilenet|w|224"):
    def sample():
        return np.random.default_rng(0).uniform(0, 255, (4, 2, 2, 3))

    return engine_choice.choose_keras_engine(
        requested="auto",
        build_model=lambda: "model",
        conversion_directory=folder,
        identity=identity,
        sample_pixels=sample,
    )


def flip_4_kb(path):
    content = bytearray(path.read_bytes())
    content[4096:8192] = bytes(byte ^ 0xFF for byte in content[4096:8192])
    path.write_bytes(bytes(content))


def test_a_damaged_converted_model_is_reconverted_never_used(tmp_path, converter, caplog):
    first = choose(tmp_path)
    assert first.name == "tflite" and len(converter) == 1
    assert first.content_sha256 == hashlib.sha256(MODEL_BYTES).hexdigest()
    assert choose(tmp_path).content_sha256 == first.content_sha256 and len(converter) == 1, "an intact one is reused"
    (model,) = tmp_path.glob("*.tflite")
    flip_4_kb(model)
    with caplog.at_level(logging.WARNING):
        again = choose(tmp_path)
    assert len(converter) == 2, "the damaged file was used instead of reconverted"
    assert f"Cache file {model} does not match the sha256 recorded in" in caplog.text and "reconverting" in caplog.text
    assert again.content_sha256 == first.content_sha256 and model.read_bytes() == MODEL_BYTES
    assert again.build().content == MODEL_BYTES, "the engine runs exactly the checked bytes"


@pytest.mark.parametrize(
    ("verdict", "problem"),
    [
        ("Expecting nothing }", "is not valid JSON"),
        (
            '{"agrees": true, "reason": "written by transferlab 0.x", "cosine": 1.0, "identity": "mobilenet|w|224"}',
            "has no checksum",
        ),
    ],
)
def test_a_garbage_or_unrecorded_verdict_is_named_and_recomputed(tmp_path, converter, caplog, verdict, problem):
    choose(tmp_path)
    (verdict_path,) = tmp_path.glob("*.json")
    verdict_path.write_text(verdict)
    with caplog.at_level(logging.WARNING):
        choice = choose(tmp_path)
    assert (
        f"Cache file {verdict_path} {problem}" in caplog.text
        and "converting and checking the backbone again" in caplog.text
    )
    assert len(converter) == 2 and choice.name == "tflite"
    assert json.loads(verdict_path.read_text())["checksum"], "the recomputed verdict is recorded again"


def test_a_model_changed_after_the_choice_is_never_run(tmp_path, converter):
    choice = choose(tmp_path)  # a warm run chooses (and keys the cache) without loading the model
    (model,) = tmp_path.glob("*.tflite")
    flip_4_kb(model)
    with pytest.raises(ValueError, match="no longer have the sha256"):
        choice.build()
    assert not list(tmp_path.glob("*.json")), "the verdict is dropped, so the next run converts afresh"


def test_a_garbage_tflite_verdict_is_named_and_measured_again(tmp_path, monkeypatch, caplog):
    model = tmp_path / "extractor.tflite"
    model.write_bytes(MODEL_BYTES)
    sha256 = hashlib.sha256(MODEL_BYTES).hexdigest()
    measured = []

    def measure(content, pixels, **options):
        measured.append(content)
        return {"version": engine_choice.TFLITE_VERDICT_VERSION, "rewrite": "", "content_sha256": sha256, "reason": ""}

    monkeypatch.setattr(engine_choice, "measure", measure)
    monkeypatch.setattr(engines, "TFLiteEngine", RecordingEngine)
    folder = tmp_path / "converted"
    options = dict(
        requested="auto", path=model, tensor="", sha256=sha256, conversion_directory=folder, sample_pixels=lambda: None
    )
    assert engine_choice.choose_tflite_engine(**options).content_sha256 == sha256 and len(measured) == 1
    assert engine_choice.choose_tflite_engine(**options).build().content == MODEL_BYTES and len(measured) == 1
    verdict_path = engine_choice.tflite_verdict_path(folder, sha256, cpu.current())
    verdict_path.write_text("")
    with caplog.at_level(logging.WARNING):
        engine_choice.choose_tflite_engine(**options)
    assert (
        f"Cache file {verdict_path} is not valid JSON" in caplog.text and "measuring the rewrites again" in caplog.text
    )
    assert len(measured) == 2
