"""The registry's contract, checked by building every backbone (slow: imports TensorFlow).

timm's tests/test_models.py style: one test parametrized over the whole registry with random
weights at a small input size; the stored widths, parameters and fine-tune layers must match
what Keras builds, and the stored GFLOPs too (at the default size, one member per family).
Plus: preprocessing inside the model equals Keras'
``preprocess_input`` outside it, and the two real weights files in ../shared load.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import WEIGHTS, require_mirror
from transferlab.backbones import flops, registry

pytestmark = pytest.mark.slow

MOBILENET_025 = "mobilenet_v1_0.25_224_imagenet_no_top.h5"
MOBILENET_V2_DEQUANT = "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"
SHA256 = {
    MOBILENET_025: "5583bfd0b6572d11fbb377a907299dc02bd1f6b461cdc93d2283f298146c7e46",
    MOBILENET_V2_DEQUANT: "5b5d58382f3ec655a6925069665eabac17955ed5783f9a3dd2653d84343e901f",
}


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    import keras

    keras.backend.clear_session()


def _pixels(size: int, count: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 255.0, (count, size, size, 3)).astype("float32")


@pytest.mark.parametrize("name", registry.names())
def test_every_backbone_keeps_its_contract(name):
    entry = registry.get(name)
    size = max(entry.min_size, 64)  # the smallest sizes exercise the declared minimum (71, 75)
    model = registry.build(entry, weights="none", image_size=size, seed=0)
    assert tuple(model.input.shape) == (None, size, size, 3) and model.input.dtype == "float32"

    features = np.asarray(model(_pixels(size), training=False))
    assert features.shape == (1, entry.feature_dim)
    assert np.isfinite(features).all() and np.ptp(features) > 0
    # Weights and layer names do not depend on the input size (average pooling, no top): one build checks them.
    assert model.count_params() == flops.count_parameters(model) == entry.parameters
    assert entry.finetune_from in {layer.name for layer in model.layers}


# The smallest member of each family: FLOPs need a build at the default size (EfficientNet's padding
# depends on it), and building costs as much as at 64 px (the weights are created either way), up to
# 15 s for B7. The larger members share their family's layers and counting; benchmarks/registry_numbers.py
# re-measures every row.
FAMILY_REPRESENTATIVES = sorted(
    {registry.get(name).family: name for name in reversed(registry.names())}.values(),
    key=registry.names().index,
)


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_stored_gflops_are_what_keras_builds_at_the_default_size(name):
    entry = registry.get(name)
    model = registry.build(entry, weights="none", image_size=entry.default_size)
    assert flops.count_flops(model) / 1e9 == pytest.approx(entry.gflops, rel=0.01)


ALPHA_CASES = [(name, alpha) for name in registry.names() for alpha in registry.get(name).alphas if alpha != 1.0]


@pytest.mark.parametrize(("name", "alpha"), ALPHA_CASES)
def test_feature_width_at_every_alpha(name, alpha):
    model = registry.build(name, alpha=alpha, weights="none", image_size=32)
    assert model.output.shape[-1] == registry.feature_dim(name, alpha)


@pytest.mark.parametrize("name", ["vgg16", "resnet50_v2", "mobilenet_v3_small"])  # caffe, tf, in-model
def test_preprocessing_inside_equals_keras_preprocess_input_outside(name):
    import keras

    entry = registry.get(name)
    model = registry.build(entry, weights="none", image_size=64, seed=1)
    reference = getattr(keras.applications, entry.constructor)(
        include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg"
    )
    reference.set_weights(model.get_weights())
    pixels = _pixels(64, count=2)
    preprocess = getattr(keras.applications, entry.preprocess_module).preprocess_input
    expected = np.asarray(reference(preprocess(pixels.copy()), training=False))
    np.testing.assert_allclose(
        np.asarray(model(pixels, training=False)), expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max())
    )


def test_random_init_is_seeded():
    first = registry.build("mobilenet", alpha=0.25, weights="none", image_size=32, seed=5).get_weights()
    again = registry.build("mobilenet", alpha=0.25, weights="none", image_size=32, seed=5).get_weights()
    other = registry.build("mobilenet", alpha=0.25, weights="none", image_size=32, seed=6).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("name", "alpha", "file_name"), [("mobilenet", 0.25, MOBILENET_025), ("mobilenet_v2", 1.0, MOBILENET_V2_DEQUANT)]
)
def test_real_weights_load_and_preprocessing_matches(name, alpha, file_name):
    import keras

    path = require_mirror(WEIGHTS / file_name)
    entry = registry.get(name)
    assert registry.weights_identity(entry, str(path), alpha=alpha, image_size=160) == SHA256[file_name]
    model = registry.build(entry, alpha=alpha, weights=str(path), image_size=160)
    reference = getattr(keras.applications, entry.constructor)(
        alpha=alpha, include_top=False, weights=str(path), input_shape=(160, 160, 3), pooling="avg"
    )
    pixels = _pixels(160, count=2, seed=3)
    preprocess = getattr(keras.applications, entry.preprocess_module).preprocess_input
    features = np.asarray(model(pixels, training=False))
    expected = np.asarray(reference(preprocess(pixels.copy()), training=False))
    assert features.shape == (2, registry.feature_dim(entry, alpha))
    assert np.abs(features - expected).max() < 1e-4
    untrained = np.asarray(registry.build(entry, alpha=alpha, weights="none", image_size=160)(pixels, training=False))
    assert np.abs(features - untrained).max() > 0.1  # the file's weights were really loaded


@pytest.mark.real_data
def test_weights_that_do_not_fit_name_the_file():
    no_top = require_mirror(WEIGHTS / MOBILENET_025)
    with_top = require_mirror(WEIGHTS / "mobilenet_v1_0.25_224_imagenet.h5")
    with pytest.raises(ValueError, match=f"could not load weights file {no_top} into mobilenet \\(alpha 1.0"):
        registry.build("mobilenet", alpha=1.0, weights=str(no_top), image_size=96)
    with pytest.raises(ValueError, match="no-top weights"):
        registry.build("mobilenet", alpha=0.25, weights=str(with_top), image_size=96)


def test_count_flops_and_parameters_by_hand():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*4 * 3*3*3 = 6912 MACs
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4*4 * 9 = 576
    x = keras.layers.SeparableConv2D(6, 3, padding="same", depth_multiplier=2)(x)  # 4*4*8*9 + 4*4*8*6 = 1920
    x = keras.layers.Conv2D(6, 1, groups=2)(x)  # 4*4*6 * 6/2 = 288
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 6*5 = 30
    model = keras.Model(inputs, outputs)
    assert flops.count_flops(model) == flops.count_flops(model, 8) == 2 * (6912 + 576 + 1920 + 288 + 30)
    with pytest.raises(ValueError, match="built for 8x8 inputs, not 16x16"):
        flops.count_flops(model, 16)
    # The course's (F_H x F_W x C + 1) x N_F per convolution, and Keras' own count.
    conv = (3 * 3 * 3 + 1) * 4
    depthwise = (3 * 3 * 1 + 1) * 4
    separable = 3 * 3 * 4 * 2 + (1 * 1 * 8) * 6 + 6
    grouped = (1 * 1 * 3 + 1) * 6
    dense = (6 + 1) * 5
    assert flops.count_parameters(model) == model.count_params() == conv + depthwise + separable + grouped + dense


def test_count_flops_needs_a_size_for_flexible_models():
    import keras

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    with pytest.raises(ValueError, match="pass image_size"):
        flops.count_flops(model)
    assert flops.count_flops(model, 10) == 2 * 10 * 10 * 2 * 3
    assert flops.count_flops(model, 20) == 4 * flops.count_flops(model, 10)


@pytest.mark.real_data
def test_weights_identity_of_real_file_is_its_sha256():
    path = require_mirror(WEIGHTS / MOBILENET_025)
    assert registry.weights_identity("mobilenet", str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
