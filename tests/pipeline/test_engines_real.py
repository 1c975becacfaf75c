"""Every engine gives the same features as Keras, on real photos with the real shared weights."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from conftest import FLOWERS_ARCHIVE, WEIGHTS, require_mirror
from transferlab.backbones import registry
from transferlab.data import augment, images
from transferlab.features import engine_choice, engines

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
SHARED_KERAS_WEIGHTS = {
    ("mobilenet", 0.25): "mobilenet_v1_0.25_224_imagenet_no_top.h5",
    ("mobilenet_v2", 1.0): "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5",
}


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory):
    """16 flower photos from the mirror (a few per class), decoded and resized as the pipeline does."""
    archive = require_mirror(FLOWERS_ARCHIVE)
    folder = tmp_path_factory.mktemp("photos")
    taken = {}
    with tarfile.open(archive) as handle:
        for member in handle:
            label = member.name.split("/")[1] if member.name.count("/") == 2 else None
            if member.isfile() and member.name.endswith(".jpg") and taken.get(label, 0) < 4:
                taken[label] = taken.get(label, 0) + 1
                handle.extract(member, folder, filter="data")
            if len(taken) == 5 and all(count == 4 for count in taken.values()):
                break
    paths = sorted(folder.rglob("*.jpg"))[:16]
    return [images.open_rgb(path, max_image_pixels=10**8) for path in paths]


@pytest.mark.parametrize("name,alpha", sorted(SHARED_KERAS_WEIGHTS))
def test_tflite_engine_agrees_with_keras_on_real_photos(name, alpha, real_photos, tmp_path):
    weights = require_mirror(WEIGHTS / SHARED_KERAS_WEIGHTS[(name, alpha)])
    model = registry.build(name, alpha=alpha, weights=str(weights), image_size=224)
    pixels = np.stack([augment.render_view(image, "", 224) for image in real_photos])
    keras_features = engines.KerasEngine(model).run(pixels)
    tflite_features = engines.TFLiteEngine(engines.convert_to_tflite(model, tmp_path / "model.tflite")).run(pixels)
    assert keras_features.shape == (16, registry.feature_dim(name, alpha))
    assert engines.cosine_similarity(keras_features, tflite_features).min() >= engine_choice.MINIMUM_COSINE
    # Real weights give informative features: photos are not all alike.
    assert engines.cosine_similarity(keras_features[:1].repeat(16, 0), keras_features).min() < 0.95
    # keras.applications' own preprocessing outside the model gives the same features.
    import keras

    preprocess = getattr(keras.applications, registry.get(name).preprocess_module).preprocess_input
    plain = getattr(keras.applications, registry.get(name).constructor)(
        include_top=False, pooling="avg", alpha=alpha, weights=str(weights), input_shape=(224, 224, 3)
    )
    reference = plain.predict(preprocess(pixels.astype(np.float32)), verbose=0)
    assert engines.cosine_similarity(keras_features, reference).min() >= 0.99999


def test_choose_engine_remembers_its_verdict(real_photos, tmp_path):
    weights = require_mirror(WEIGHTS / SHARED_KERAS_WEIGHTS[("mobilenet", 0.25)])
    pixels = np.stack([augment.render_view(image, "", 128) for image in real_photos])
    builds = []

    def build():
        builds.append(1)
        return registry.build("mobilenet", alpha=0.25, weights=str(weights), image_size=128)

    choice = engine_choice.choose_keras_engine(
        requested="auto",
        build_model=build,
        conversion_directory=tmp_path,
        identity="mobilenet@0.25|x|128",
        sample_pixels=lambda: pixels,
    )
    assert choice.name == "tflite" and choice.verdict["cosine"] >= engine_choice.MINIMUM_COSINE and len(builds) == 1
    again = engine_choice.choose_keras_engine(
        requested="auto",
        build_model=build,
        conversion_directory=tmp_path,
        identity="mobilenet@0.25|x|128",
        sample_pixels=lambda: pixels,
    )
    assert again.name == "tflite" and len(builds) == 1, "a remembered verdict must not rebuild or reconvert"
    assert (
        engine_choice.choose_keras_engine(
            requested="keras",
            build_model=build,
            conversion_directory=tmp_path,
            identity="y",
            sample_pixels=lambda: pixels,
        ).name
        == "keras"
    )
