"""export and predict library functions on tiny in-memory inputs, the failure cases included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab import cli
from transferlab.core import params
from transferlab.data import tables
from transferlab.export import build, check, predict
from transferlab.cli import imagenet
from transferlab.heads import base, logistic
from transferlab.backbones.stack import Member
from transferlab.features import files

CLASSES = ("daisy", "roses", "tulips")


def logistic_head(widths=(4, 3), seed=0) -> logistic.LogisticHead:
    rng = np.random.default_rng(seed)
    width = sum(widths)
    blocks = tuple(
        files.Block(spec=f"spec{i}", weights=f"w{i}", width=w, offset=sum(widths[:i]), name=f"b{i}") for i, w in enumerate(widths)
    )
    description = base.HeadDescription(head="logistic", class_names=CLASSES, blocks=blocks)
    standardizer = base.BlockStandardizer.from_arrays(widths, rng.normal(size=width), rng.uniform(1e-12, 3.0, size=width))
    return logistic.LogisticHead(description, standardizer, rng.normal(size=(3, width)), rng.normal(size=3))


def members_for(head: logistic.LogisticHead) -> list[Member]:
    return [
        Member(spec=block.spec, name=block.name, kind="keras", identity=block.spec, weights_identity=block.weights, image_size=32)
        for block in head.description.blocks
    ]


def features_for(head: logistic.LogisticHead) -> files.Features:
    return files.Features(features=np.zeros((1, head.description.feature_dim), np.float32), labels=np.zeros(1, np.int32),
                         class_names=CLASSES, blocks=head.description.blocks)


# ---------------------------------------------------------------- export


def test_folded_logistic_head_gives_the_heads_probabilities_even_for_tiny_scales():
    head = logistic_head()
    features = np.random.default_rng(1).normal(size=(20, 7)) * head.standardizer.scale_ + head.standardizer.mean_
    kernel, bias = build.fold_logistic(coef=head.coef, intercept=head.intercept, mean=head.standardizer.mean_,
                                        scale=head.standardizer.scale_)
    np.testing.assert_allclose(base.softmax(features @ kernel + bias), head.predict_proba(features), atol=1e-9)


def test_consistency_check_names_what_changed():
    head = logistic_head()
    build.check_consistency(members=members_for(head), head=head, test=features_for(head))
    changed = members_for(head)
    changed[1] = Member(spec="spec1", name="b1", kind="keras", identity="spec1", weights_identity="other", image_size=32)
    with pytest.raises(ValueError, match=r"weights other.*dvc repro"):
        build.check_consistency(members=changed, head=head, test=features_for(head))
    with pytest.raises(ValueError, match="differ from the head"):
        build.check_consistency(members=members_for(head), head=head, test=features_for(logistic_head(widths=(4, 2))))


def test_a_head_export_does_not_know_is_refused_by_name():
    head = logistic_head()
    other = logistic.LogisticHead(
        base.HeadDescription(head="knn", class_names=CLASSES, blocks=head.description.blocks),
        head.standardizer, head.coef, head.intercept,
    )
    with pytest.raises(ValueError, match="supports the logistic, dense, finetune, scratch heads; models/head is a 'knn' head"):
        build.check_consistency(members=members_for(head), head=other, test=features_for(head))


def write_predictions(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "sha256", "actual", "predicted", "confidence"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_test_predictions_are_read_and_sampled_reproducibly(tmp_path):
    rows = [{"path": f"daisy/{i}.jpg", "sha256": f"{i:064x}", "actual": "daisy", "predicted": "daisy", "confidence": "0.9"}
            for i in range(50)]
    read = tables.read_predictions(write_predictions(tmp_path / "p.csv", rows))
    assert read == rows
    sample = check.select_rows(read, count=10, seed=3)
    assert len(sample) == 10 and sample == check.select_rows(read, count=10, seed=3)
    assert sample != check.select_rows(read, count=10, seed=4)
    assert [row["path"] for row in sample] == [row["path"] for row in read if row in sample]  # file order kept
    assert check.select_rows(read, count=0, seed=3) == read
    assert check.select_rows(read, count=500, seed=3) == read


@pytest.mark.parametrize("content, message", [
    (None, "run the evaluate stage"),
    ("path,sha256\n", "lacks column"),
    ("path,sha256,actual,predicted,confidence\n", "no rows"),
])
def test_bad_test_predictions_say_what_to_do(tmp_path, content, message):
    path = tmp_path / "test_predictions.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        tables.read_predictions(path)


def test_agreement_below_the_minimum_stops_with_the_disagreeing_images():
    tally = check._Tally()
    rows = [{"path": f"{i}.jpg", "predicted": "daisy", "confidence": "0.8"} for i in range(100)]
    probabilities = np.tile([0.8, 0.1, 0.1], (100, 1))
    probabilities[7] = [0.2, 0.7, 0.1]
    tally.add(rows, probabilities, CLASSES)
    report = {"keras": tally.summary()}
    assert report["keras"]["top1_agreement"] == 0.99
    assert report["keras"]["max_confidence_difference"] == pytest.approx(0.6)
    check._require_agreement(report, {"keras": tally}, 0.99)  # exactly the minimum passes
    probabilities[8] = [0.1, 0.1, 0.8]
    tally = check._Tally()
    tally.add(rows, probabilities, CLASSES)
    with pytest.raises(ValueError, match=r"keras: top-1 agreement 98\.00% \(2 of 100 differ, e\.g\. 7\.jpg \(daisy -> roses\)"):
        check._require_agreement({"keras": tally.summary()}, {"keras": tally}, 0.99)


def test_export_params_defaults_and_validation():
    settings = params.parse_section("export", None)
    assert settings.tflite is True and settings.check_images == 200
    with pytest.raises(ValueError, match="export.check_images"):
        params.parse_section("export", {"check_images": -1})
    with pytest.raises(ValueError, match="unknown key"):
        params.parse_section("export", {"tflite_only": True})


# ---------------------------------------------------------------- predict: the folder


def write_manifest(folder: Path, **changes) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    (folder / "model.tflite").write_bytes(b"not really a model")
    manifest = {
        "format": predict.EXPORT_FORMAT, "version": predict.EXPORT_VERSION, "layout": "classifier",
        "keras_model": "model.keras", "tflite_model": "model.tflite", "class_names": list(CLASSES), "members": [],
        "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": predict.images.sha256_file(folder / name)}
                  for name in ("labels.txt", "model.tflite")},
        **changes,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_missing_or_foreign_folder_says_to_run_dvc_repro_export(tmp_path):
    with pytest.raises(ValueError, match="no exported model at .*dvc repro export"):
        predict.read_manifest(tmp_path / "absent")
    with pytest.raises(ValueError, match="holds no manifest.json.*dvc repro export"):
        predict.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        predict.read_manifest(tmp_path)
    write_manifest(tmp_path, version=99)
    with pytest.raises(ValueError, match="version 99"):
        predict.read_manifest(tmp_path)


def test_formats_prefer_tflite_and_an_absent_one_is_an_error(tmp_path):
    manifest = write_manifest(tmp_path)
    assert predict.available_formats(manifest) == ("tflite", "keras")
    assert predict.choose_format(manifest, "auto") == "tflite"
    assert predict.choose_format(manifest, "keras") == "keras"
    without = write_manifest(tmp_path, tflite_model="")
    assert predict.choose_format(without, "auto") == "keras"
    with pytest.raises(ValueError, match="no tflite model.*export.tflite: true"):
        predict.choose_format(without, "tflite")
    with pytest.raises(ValueError, match="choose one of: auto, keras, tflite"):
        predict.choose_format(manifest, "onnx")
    assert predict.available_formats({**manifest, "layout": "stack"}) == ("tflite",)


def test_a_changed_or_missing_file_is_detected(tmp_path):
    manifest = write_manifest(tmp_path)
    predict.verify_files(tmp_path, manifest)
    (tmp_path / "model.tflite").write_bytes(b"not really a modeL")  # same size, other bytes
    with pytest.raises(ValueError, match="model.tflite differs"):
        predict.verify_files(tmp_path, manifest)
    (tmp_path / "model.tflite").unlink()
    with pytest.raises(ValueError, match="model.tflite is missing"):
        predict.load(tmp_path)


def test_predict_command_without_an_export_exits_with_the_hint(tmp_path, capsys):
    code = cli.main(["predict", str(tmp_path), "--model", str(tmp_path / "models" / "export")])
    assert code == 2
    assert "dvc repro export" in capsys.readouterr().err


# ---------------------------------------------------------------- predict: the files


def photo_folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "b.jpg")
    Image.new("L", (30, 40), 60).save(root / "sub" / "deeper" / "a.png")
    Image.new("RGB", (40, 30)).save(root / ".hidden" / "skip.jpg")
    (root / "sub" / "notes.txt").write_text("not an image")
    (root / "sub" / "broken.jpg").write_bytes((root / "b.jpg").read_bytes()[:200])
    return root


def test_folders_expand_recursively_and_missing_paths_become_errors(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    files, missing = predict.collect_files([folder, folder / "b.jpg", tmp_path / "nothing.jpg"])
    relative = [path.relative_to(folder).as_posix() for path in files]
    assert relative == ["b.jpg", "sub/broken.jpg", "sub/deeper/a.png", "sub/notes.txt", "b.jpg"]
    assert [(result.path, result.error) for result in missing] == [(str(tmp_path / "nothing.jpg"), "no such file or folder")]


def test_unreadable_files_get_a_clear_reason(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    picture, error = predict.open_image(folder / "sub" / "deeper" / "a.png", max_image_pixels=10**6)
    assert error == "" and picture.mode == "RGB" and picture.size == (30, 40)
    assert predict.open_image(folder / "sub" / "notes.txt", max_image_pixels=10**6)[1].startswith("not an image")
    assert predict.open_image(folder / "sub" / "broken.jpg", max_image_pixels=10**6)[1].startswith("corrupt or unreadable image")
    assert predict.open_image(folder / "b.jpg", max_image_pixels=100)[1].startswith("too large")


class FixedModel:
    """Stands in for a loaded export: probabilities from each image's mean red value."""

    class_names = CLASSES
    max_image_pixels = 10**6

    def __init__(self):
        self.batches = []

    def predict(self, pictures):
        self.batches.append(len(pictures))
        red = np.array([np.asarray(p)[..., 0].mean() / 255 for p in pictures])
        return np.stack([red, 1 - red, np.full_like(red, 0.0)], axis=1)


def test_classify_files_goes_on_after_failures_and_keeps_the_order(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    files, _ = predict.collect_files([folder])
    model = FixedModel()
    done = []
    results = predict.classify_files(model, files, top=2, batch_size=3, progress=done.append)
    assert [Path(result.path).name for result in results] == ["b.jpg", "broken.jpg", "a.png", "notes.txt"]
    assert [bool(result.error) for result in results] == [False, True, False, True]
    assert results[0].top[0][0] == "daisy" and results[0].top[0][1] == pytest.approx(200 / 255)
    assert results[2].top == (("roses", pytest.approx(1 - 60 / 255)), ("daisy", pytest.approx(60 / 255)))
    assert model.batches == [2] and done == [3, 1]  # no call for a batch without images
    assert results[1].to_json() == {"path": results[1].path, "error": results[1].error}


def test_classify_files_opens_images_with_the_limit_the_model_was_trained_with(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    files, _ = predict.collect_files([folder / "b.jpg"])  # 40x30 = 1200 pixels
    model = FixedModel()
    model.max_image_pixels = 1199  # as ExportedModel reads it from manifest.json
    assert predict.classify_files(model, files)[0].error.startswith("too large")
    assert predict.classify_files(model, files, max_image_pixels=1200)[0].error == ""
    model.max_image_pixels = 1200
    assert predict.classify_files(model, files)[0].error == ""


def test_the_manifest_records_the_image_size_limit_and_old_ones_get_the_params_default(tmp_path):
    assert predict.max_image_pixels_of(write_manifest(tmp_path / "new", max_image_pixels=1000)) == 1000
    old = write_manifest(tmp_path / "old")
    assert predict.max_image_pixels_of(old) == params.parse_section("download", None).max_image_pixels
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer.*dvc repro export"):
        predict.max_image_pixels_of({**old, "max_image_pixels": "many"})


def test_the_export_report_and_its_log_line():
    head = logistic_head()
    member = {"name": "b0", "spec": "spec0", "kind": "keras", "image_size": 32, "alpha": None, "weights": "w0",
              "random_init": False, "width": 4, "offset": 0}
    manifest = {"backbone": "b0", "layout": "classifier", "members": [member],
                "files": {"model.keras": {"bytes": 10}, "labels.txt": {"bytes": 2}}}
    agreement = {"formats": {"tflite": {"top1_agreement": 1.0, "latency_ms": 3.25},
                             "keras": {"top1_agreement": 0.995, "latency_ms": 20.0}}, "checked_images": 200, "resize": {}}
    report = build.export_report(manifest, head, agreement)
    assert list(report) == ["formats", "checked_images", "resize", "files", "provenance"]
    assert report["files"] == {"model.keras": 10, "labels.txt": 2, "total": 12}
    assert report["provenance"]["head"] == "logistic" and report["provenance"]["random_init"] is False
    assert "offset" not in report["provenance"]["members"][0]
    assert check.describe(agreement) == (
        "top-1 agreement with evaluate on 200 test images: tflite 100.00% (3.2 ms per image), "
        "keras 99.50% (20.0 ms per image)"
    )


def test_top_classes_are_most_probable_first():
    assert predict.top_classes(np.array([0.2, 0.5, 0.3]), CLASSES, 2) == (("roses", 0.5), ("tulips", 0.3))
    assert len(predict.top_classes(np.array([0.2, 0.5, 0.3]), CLASSES, 10)) == 3


# ---------------------------------------------------------------- imagenet command helpers


def class_index(count=1000) -> dict:
    return {str(i): [f"n{i:08d}", f"class_{i}"] for i in range(count)}


@pytest.mark.parametrize("content, message", [
    (None, "class index not found"),
    ("[1, 2", "not valid JSON"),
    (json.dumps(class_index(999)), "1000 class numbers"),
    (json.dumps({**class_index(), "5": ["n5"]}), "class 5 is not a"),
])
def test_bad_class_index_files_are_refused(tmp_path, content, message):
    path = tmp_path / "imagenet_class_index.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        imagenet.read_class_index(path)


def test_decoding_with_a_class_index_is_decode_predictions_order():
    index = {key: tuple(value) for key, value in class_index().items()}
    probabilities = np.zeros((2, 1000))
    probabilities[0, [3, 999, 500]] = [0.5, 0.3, 0.2]
    probabilities[1, 7] = 1.0
    decoded = imagenet.decode(probabilities, top=2, class_index=index, keras_decode=None)
    assert decoded[0] == [("n00000003", "class_3", 0.5), ("n00000999", "class_999", 0.3)]
    assert decoded[1][0] == ("n00000007", "class_7", 1.0)


def test_top_less_or_missing_weights_are_refused_before_building(tmp_path):
    import h5py

    with pytest.raises(ValueError, match="weights file not found"):
        imagenet.check_top_weights(str(tmp_path / "absent.h5"))
    path = tmp_path / "no_top.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"Conv1", b"Conv_1_bn", b"out_relu"]
    with pytest.raises(ValueError, match="holds no 1000-class top.*out_relu"):
        imagenet.check_top_weights(str(path))
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"Conv1", b"global_average_pooling2d", b"predictions"]
    assert imagenet.check_top_weights(str(path)) == str(path)
    assert imagenet.check_top_weights("ImageNet") == "imagenet"


def test_centre_square_keeps_the_middle():
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100] = 255  # a white left third, cut away by the centre crop
    pixels[:, 100:200] = (0, 120, 0)
    square = imagenet.centre_square(Image.fromarray(pixels), 50)
    assert square.shape == (50, 50, 3) and square.dtype == np.float32
    assert np.all(square == np.array([0, 120, 0], np.float32))


# ---------------------------------------------------------------- the Keras model, in process


@pytest.mark.slow
@pytest.mark.parametrize("head_kind", ["dense"])  # the logistic head: tests/pipeline/test_export_predict.py
def test_image_model_is_resize_then_backbone_then_head_and_loads_safely(head_kind, tmp_path):
    import keras

    from transferlab.backbones import registry
    from transferlab.heads import dense

    member = Member(spec="mobilenet_v2", name="mobilenet_v2", kind="keras", identity="keras:mobilenet_v2@0.35",
                    weights_identity="random-init-seed5", image_size=32, alpha=0.35, weights="none", random_init=True)
    backbone = registry.build("mobilenet_v2", alpha=0.35, weights="none", image_size=32, seed=5)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    features = np.asarray(backbone(np.stack(photos).astype(np.float32), training=False), dtype=np.float64)
    standardizer = base.BlockStandardizer(widths=(1280,)).fit(features)
    block = files.Block(spec="mobilenet_v2", weights="random-init-seed5", width=1280, offset=0, name="mobilenet_v2")
    description = base.HeadDescription(head=head_kind, class_names=CLASSES, blocks=(block,))
    if head_kind == "dense":
        model = dense.build_model(standardizer=standardizer, classes=3, units=8, dropout=0.5, seed=0)
        head = dense.DenseHead(description=description, standardizer=standardizer, model=model)
    else:
        head = logistic.LogisticHead(description, standardizer, rng.normal(size=(3, 1280)), rng.normal(size=3))
    image_model = build.build_image_model(build.build_core(members=[member], head=head, head_folder=tmp_path, seed=5))
    image_model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    # At the backbone's own size the resize changes nothing, so the model is head(backbone(pixels)).
    expected = head.predict_proba(features)
    got = np.concatenate([np.asarray(loaded(photo[None])) for photo in photos])
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert {layer.name for layer in loaded.layers} >= {"image", "resize_32"}


def pixel_head(kind: str, folder: Path):
    """A scratch CNN or a finetune head (random weights) saved into ``folder``, loaded back as train_head would."""
    from transferlab import heads
    from transferlab.backbones import registry, taps
    from transferlab.heads import finetune, scratch

    block = files.Block(spec="mobilenet_v2", weights="random-init-seed5", width=1280, offset=0, name="mobilenet_v2")
    if kind == "scratch":
        settings = {"image_size": 24}
        model = scratch.build_model(classes=3, image_size=24, augment=True, dropout=0.2, seed=0)
        head = scratch.ScratchHead(description=base.HeadDescription("scratch", CLASSES, (block,), settings), model=model)
    else:
        backbone = registry.build("mobilenet_v2", alpha=0.35, weights="none", image_size=32, seed=5)
        backbone.save(folder.parent / "backbone.keras")
        layer = "block_13_expand"
        settings = {"from_layer": layer, "block": "mobilenet_v2", "tap_shape": list(taps.tap_shape(backbone, layer))}
        model = finetune.build_model(backbone=backbone, layer=layer, classes=3, dropout=0.3, seed=0)
        head = finetune.FinetuneHead(description=base.HeadDescription("finetune", CLASSES, (block,), settings), model=model,
                                     backbone_file=folder.parent / "backbone.keras")
    folder.mkdir()
    head.save(folder)
    return heads.load_head(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["scratch", "finetune"])
def test_pixel_heads_export_as_one_model_in_both_formats(kind, tmp_path):
    head = pixel_head(kind, tmp_path / "head")
    member = Member(spec="mobilenet_v2", name="mobilenet_v2", kind="keras", identity="keras:mobilenet_v2@0.35",
                    weights_identity="random-init-seed5", image_size=32, alpha=0.35, weights="none", random_init=True)
    folder = tmp_path / "export"
    folder.mkdir()
    manifest = build.write_export(folder, members=[member], head=head, head_folder=tmp_path / "head", seed=5, tflite=True,
                                  max_image_pixels=12345)
    size = 24 if kind == "scratch" else 32
    assert manifest["layout"] == "classifier" and manifest["inputs"][0]["image_size"] == size
    assert predict.load(folder).max_image_pixels == 12345  # what `transferlab predict` opens images with
    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)) for i in range(3)]
    pixels = predict.resize_all(photos, [size])[size]
    if kind == "scratch":
        expected = head.predict_pixels(pixels)
    else:
        from transferlab.backbones import taps
        from transferlab.heads import finetune

        bottom = taps.bottom_model(finetune.keras.models.load_model(head.backbone_file), head.layer)
        expected = head.predict_proba(np.asarray(bottom(pixels.astype(np.float32))))
    np.testing.assert_allclose(predict.load(folder, format="tflite").predict(photos), expected, atol=1e-4)
    np.testing.assert_allclose(predict.load(folder, format="keras").predict(photos), expected, atol=0.05)  # resize within 1 level
