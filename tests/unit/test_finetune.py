"""The finetune head on a tiny hand-made backbone: cutting, equivalence, training, saving, export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from transferlab.backbones import taps
from transferlab.features import files
from transferlab.heads import base

pytestmark = pytest.mark.slow  # builds and trains Keras models (about 30 s in all)

keras = pytest.importorskip("keras")
CLASSES = ("a", "b", "c")
SIZE = 16
CUT = "block_expand"  # the first layer of the residual block: the only tensor crossing is its input


def tiny_backbone(seed: int = 0):
    """pixels -> rescale -> stem conv -> one inverted residual block -> 1x1 conv -> pooled embedding.

    Batch-norm layers get random statistics, so that running them in training mode (batch
    statistics) would give visibly different outputs than inference mode.
    """
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    pixels = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = layers.Rescaling(1 / 127.5, offset=-1, name="rescale")(pixels)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    shortcut = x
    y = layers.Conv2D(16, 1, use_bias=False, name="block_expand")(x)
    y = layers.BatchNormalization(name="block_expand_bn")(y)
    y = layers.ReLU(6.0, name="block_expand_relu")(y)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="block_depthwise")(y)
    y = layers.BatchNormalization(name="block_depthwise_bn")(y)
    y = layers.ReLU(6.0, name="block_depthwise_relu")(y)
    y = layers.Conv2D(8, 1, use_bias=False, name="block_project")(y)
    y = layers.BatchNormalization(name="block_project_bn")(y)
    x = layers.Add(name="block_add")([shortcut, y])
    x = layers.Conv2D(24, 1, use_bias=False, name="last_conv")(x)
    x = layers.BatchNormalization(name="last_bn")(x)
    x = layers.ReLU(6.0, name="last_relu")(x)
    outputs = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(pixels, outputs, name="tiny")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.3, beta.shape),
                    rng.normal(0, 0.3, mean.shape),
                    rng.uniform(0.5, 2.0, variance.shape),
                ]
            )
    return model


def coloured_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is their dominant colour, plus noise: learnable by a tiny network."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220]], dtype=np.float32)
    pixels = colours[labels][:, None, None, :] + rng.normal(0, 30, (len(labels), SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.float32), labels


def split_with_taps(backbone, backbone_file, *, per_class: int, seed: int, layer: str = CUT) -> files.Features:
    pixels, labels = coloured_images(per_class, seed)
    activations = taps.bottom_model(backbone, layer).predict(pixels, verbose=0).astype(np.float16)
    width = int(backbone.output_shape[-1])
    block = files.Block(spec="tiny", weights="tiny-weights", width=width, offset=0, name="tiny")
    tapped = files.Taps(activations=activations, layer=layer, block="tiny", backbone_file=backbone_file)
    return files.Features(
        features=np.zeros((len(labels), width), np.float32),
        labels=labels,
        class_names=CLASSES,
        blocks=(block,),
        taps={"tiny": tapped},
        source=f"<{seed}>",
    )


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone):
    """A finetune head trained on the tiny backbone's taps, saved, plus what it was trained on."""
    from transferlab.heads import finetune, train_head

    folder = tmp_path_factory.mktemp("finetune")
    backbone_file = folder / "backbone.keras"
    backbone.save(backbone_file)
    splits = {
        "train": split_with_taps(backbone, backbone_file, per_class=20, seed=1),
        "val": split_with_taps(backbone, backbone_file, per_class=8, seed=2),
    }
    curves = []
    outcome = finetune.train(
        train=splits["train"],
        val=splits["val"],
        seed=3,
        class_weight="none",
        from_layer=CUT,
        epochs=6,
        learning_rate=0.03,
        schedule="constant",
        batch_size=8,
        dropout=0.1,
        flip=True,
        patience=6,
        log_step=curves.append,
    )
    train_head.save_head(outcome.head, folder / "head")
    return {
        "head": outcome.head,
        "report": outcome.report,
        "splits": splits,
        "folder": folder / "head",
        "curves": curves,
    }


def test_cut_points_exclude_layers_inside_the_residual_block(backbone):
    points = taps.cut_points(backbone)
    assert {"stem", "block_expand", "last_conv", "pool"} <= set(points)
    assert not {"block_depthwise", "block_project", "block_add", "block_expand_bn"} & set(points)
    assert taps.tap_shape(backbone, CUT) == (8, 8, 8)


@pytest.mark.parametrize("layer,reason", [("block_depthwise", "cannot be cut"), ("no_such_layer", "has no layer")])
def test_a_bad_from_layer_lists_the_cut_points(backbone, layer, reason):
    with pytest.raises(ValueError, match=reason) as error:
        taps.top_model(backbone, layer)
    message = str(error.value)
    assert "train_head.finetune.from_layer" in message
    listed = message.split("cut points:")[1]
    assert "block_expand" in listed and "last_conv" in listed and "block_depthwise" not in listed


def test_from_layer_auto_is_the_registry_default():
    assert taps.resolve_from_layer("mobilenet_v2", "auto") == "block_13_expand"
    assert taps.resolve_from_layer("mobilenet_v2", "block_15_expand") == "block_15_expand"


def test_the_top_run_on_cached_taps_gives_the_whole_network_output(backbone):
    pixels, _ = coloured_images(4, seed=5)
    whole = backbone.predict(pixels, verbose=0)
    for layer in ("stem", CUT, "last_conv"):
        tap = taps.bottom_model(backbone, layer).predict(pixels, verbose=0)
        top = taps.top_model(backbone, layer)
        np.testing.assert_allclose(top.predict(tap, verbose=0), whole, rtol=1e-5, atol=1e-5)
        from_float16 = top.predict(tap.astype(np.float16).astype(np.float32), verbose=0)
        np.testing.assert_allclose(from_float16, whole, rtol=2e-2, atol=2e-2 * np.abs(whole).max())
    flat = taps.bottom_model(backbone, CUT, flatten=True).predict(pixels, verbose=0)
    assert flat.shape == (len(pixels), 8 * 8 * 8)


def test_the_top_is_a_copy_with_batch_norm_frozen(backbone):
    top = taps.top_model(backbone, CUT)
    assert [layer.name for layer in top.layers][1:4] == ["block_expand", "block_expand_bn", "block_expand_relu"]
    assert top.get_layer("block_expand") is not backbone.get_layer("block_expand")
    for layer in top.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable and not layer.trainable_weights
    # Inference mode even when called for training: batch statistics would change the output.
    tap = taps.bottom_model(backbone, CUT).predict(coloured_images(4, seed=6)[0], verbose=0)
    np.testing.assert_allclose(top(tap, training=True).numpy(), top(tap, training=False).numpy(), rtol=1e-6, atol=1e-6)


def test_training_changes_only_the_layers_from_from_layer_up(trained, backbone):
    from transferlab.heads import finetune

    model = trained["head"].model
    for layer in model.layers:
        if not layer.weights or layer.name.startswith("head_"):
            continue
        original = backbone.get_layer(layer.name).get_weights()
        changed = [not np.array_equal(before, after) for before, after in zip(original, layer.get_weights())]
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not any(changed), f"{layer.name} changed: batch norm must stay frozen"
        else:
            assert all(changed), f"{layer.name} was not trained"
    bottom_names = {layer.name for layer in taps.bottom_model(backbone, CUT).layers}
    assert not bottom_names & {layer.name for layer in model.layers if layer.weights}
    # The frozen bottom in the exported model is the backbone's, unchanged.
    bottom = finetune.full_model(trained["folder"]).get_layer(f"tiny_to_{CUT}")
    for name in ("stem", "stem_bn"):
        for exported, original in zip(bottom.get_layer(name).get_weights(), backbone.get_layer(name).get_weights()):
            np.testing.assert_array_equal(exported, original)


def test_training_learns_and_reports(trained):
    report, curves = trained["report"], trained["curves"]
    assert report["from_layer"] == CUT and 1 <= report["kept_epoch"] <= report["epochs_run"] == len(curves) == 6
    assert len(report["epoch_seconds"]) == 6 and report["trainable_parameters"] > 0
    assert set(curves[0]) == {"train/loss", "train/accuracy", "val/loss", "val/accuracy"}
    val = trained["splits"]["val"]
    probabilities = base.predict_split(trained["head"], val)
    assert probabilities.shape == (len(val), 3) and np.allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == val.labels).mean() >= 0.8


def test_saved_head_and_full_model_reproduce_the_predictions(trained, backbone):
    from transferlab import heads
    from transferlab.heads import finetune

    loaded = heads.load_head(trained["folder"])
    val = trained["splits"]["val"]
    expected = base.predict_split(trained["head"], val)
    np.testing.assert_allclose(base.predict_split(loaded, val), expected, rtol=1e-5, atol=1e-6)
    description = json.loads((trained["folder"] / "head.json").read_text())
    assert description["head"] == "finetune" and description["settings"]["from_layer"] == CUT
    assert description["settings"]["tap_shape"] == [8, 8, 8]

    pixels, labels = coloured_images(8, seed=2)  # the very images behind the val taps
    model = finetune.full_model(trained["folder"])
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 3)
    from_pixels = model.predict(pixels, verbose=0)
    assert (from_pixels.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.99
    np.testing.assert_allclose(from_pixels, expected, atol=2e-2)


def test_a_split_without_taps_or_with_other_taps_is_refused(trained):
    val = trained["splits"]["val"]
    bare = files.Features(
        features=val.features,
        labels=val.labels,
        class_names=val.class_names,
        blocks=val.blocks,
        source="data/features/val.npz",
    )
    with pytest.raises(ValueError, match="train_head.head is finetune or fusion"):
        base.predict_split(trained["head"], bare)
    tiny = val.taps["tiny"]
    other = files.Features(
        features=val.features,
        labels=val.labels,
        class_names=val.class_names,
        blocks=val.blocks,
        taps={"tiny": files.Taps(tiny.activations, "last_conv", "tiny", tiny.backbone_file)},
    )
    with pytest.raises(ValueError, match="re-run extract_taps"):
        base.predict_split(trained["head"], other)
    elsewhere = dataclasses.replace(val, taps={"other": tiny})
    with pytest.raises(ValueError, match="not of tiny"):
        base.predict_split(trained["head"], elsewhere)


def test_in_a_stack_the_head_reads_its_members_taps(trained):
    """A stack (here with a TFLite member first) is fine: the head classifies its member's taps alone."""
    val = trained["splits"]["val"]
    tflite = files.Block(spec="tflite:x.tflite", weights="sha", width=4, offset=0, name="x")
    tiny = dataclasses.replace(val.blocks[0], offset=4)
    stacked = dataclasses.replace(val, blocks=(tflite, tiny), features=np.zeros((len(val), 4 + tiny.width), np.float32))
    from transferlab.heads import finetune

    assert finetune.check_taps(stacked) is val.taps["tiny"]
    np.testing.assert_array_equal(
        base.predict_split(trained["head"], stacked), base.predict_split(trained["head"], val)
    )


def test_tap_batches_shuffle_every_epoch_and_flip_reproducibly():
    from transferlab.heads import finetune

    activations = np.arange(10 * 2 * 3 * 1, dtype=np.float16).reshape(10, 2, 3, 1)
    labels = np.arange(10)

    def epoch_rows(batches):
        return np.concatenate([batches[index][1] for index in range(len(batches))])

    batches = finetune.TapBatches(activations, labels, batch_size=4, seed=0, shuffle=True, flip=True)
    assert len(batches) == 3
    first = epoch_rows(batches)
    maps, rows = batches[0]
    assert maps.dtype == np.float32 and sorted(first) == list(range(10))
    epochs = finetune.TapBatches(activations, labels, batch_size=4, seed=0, shuffle=True, flip=True)
    mirrored = []  # over four epochs: each map is its row's map, mirrored left-right or not, about half of each
    for _ in range(4):
        for index in range(len(epochs)):
            for map_, row in zip(*epochs[index]):
                original = activations[row].astype(np.float32)
                mirrored.append(np.array_equal(map_, original[:, ::-1]))
                assert mirrored[-1] or np.array_equal(map_, original)
        epochs.on_epoch_end()
    assert 0.25 <= np.mean(mirrored) <= 0.75, mirrored
    again = finetune.TapBatches(activations, labels, batch_size=4, seed=0, shuffle=True, flip=True)
    assert np.array_equal(again[0][0], maps)
    batches.on_epoch_end()
    assert sorted(epoch_rows(batches)) == list(range(10)) and not np.array_equal(epoch_rows(batches), first)
    plain = finetune.TapBatches(activations, labels, batch_size=4, seed=0)
    assert np.array_equal(epoch_rows(plain), labels) and np.array_equal(plain[0][0], activations[:4].astype(np.float32))
