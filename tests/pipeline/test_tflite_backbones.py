"""TFLite files as backbones: features equal the Keras original's, stacks, bad specs, queued runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import support
from transferlab.backbones import registry, stack
from transferlab.core import params, paths
from transferlab.data import augment, images
from transferlab.features import engine_choice, engines, extract_features

pytestmark = pytest.mark.slow
SIZE = 32
TAP_LAYER = "conv_a"


def tiny_keras_model(channels: int = 3):
    """Raw 0..255 pixels in, pooled 16 features out; a named inner convolution to tap."""
    import keras

    keras.utils.set_random_seed(0)
    pixels = keras.Input((SIZE, SIZE, channels), name="pixels")
    hidden = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(pixels)
    hidden = keras.layers.Conv2D(8, 3, activation="relu", name=TAP_LAYER)(hidden)
    hidden = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_b")(hidden)
    return keras.Model(pixels, keras.layers.GlobalAveragePooling2D()(hidden))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The Keras model, its TFLite conversion, and the name of the converted tap tensor."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_keras_model()
    path = engines.convert_to_tflite(model, folder / "tiny.tflite")
    return model, path, first_conv_output(path)


def first_conv_output(path: Path) -> str:
    """The name of the tensor the first CONV_2D writes (conv_a's output, ReLU fused)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    names = {detail["index"]: detail["name"] for detail in interpreter.get_tensor_details()}
    conv = next(op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D")
    return names[conv["outputs"][0]]


@pytest.fixture()
def dataset(tmp_path):
    folder = support.write_dataset(tmp_path / "photos", per_class=4)
    return folder, support.rows_for(folder)


def extract_with(folder: Path, rows: list[dict], cache: Path, backbone, mirror_average: bool = False, **settings):
    values = {**support.SMALL_PARAMS["extract_features"], "backbone": backbone, **settings}
    members = stack.resolve_members(params.parse_section("extract_features", values), seed=0)
    return extract_features.extract_features(
        members=members,
        rows_by_split={"train": rows[::2], "val": rows[1::2]},
        images_directory=folder,
        cache_directory=cache,
        engine=values.get("engine", "auto"),
        batch_size=5,
        threads=2,
        seed=0,
        max_image_pixels=10**8,
        mirror_average=mirror_average,
    )


def rendered(folder: Path, rows: list[dict]) -> np.ndarray:
    return np.stack(
        [augment.render_view(images.open_rgb(folder / row["path"], max_image_pixels=10**8), "", SIZE) for row in rows]
    )


def lowest_cosine(first: np.ndarray, second: np.ndarray) -> float:
    return float(engines.cosine_similarity(first, second).min())


def test_a_tflite_file_gives_the_keras_models_features(tiny, dataset, tmp_path):
    model, path, _ = tiny
    folder, rows = dataset
    features, report = extract_with(folder, rows, tmp_path / "cache", f"tflite:{path}")

    expected = model(rendered(folder, rows[::2]).astype(np.float32)).numpy()
    assert features["train"].arrays["features"].shape == (len(rows[::2]), 16)
    assert lowest_cosine(features["train"].arrays["features"], expected) >= engine_choice.MINIMUM_COSINE
    member = report["backbones"]["tiny"]
    assert member["kind"] == "tflite" and member["weights"] == registry.sha256_file(path)
    assert member["engine"] == "tflite" and "no rewrite applies" in member["engine_note"]  # a float file runs as given


def test_a_named_tensor_gives_the_keras_layers_pooled_output(tiny, dataset, tmp_path):
    import keras

    model, path, tensor = tiny
    folder, rows = dataset
    features, report = extract_with(folder, rows, tmp_path / "cache", f"tflite:{path}#{tensor}")

    inner = keras.Model(model.input, model.get_layer(TAP_LAYER).output)
    expected = inner(rendered(folder, rows[::2]).astype(np.float32)).numpy().mean(axis=(1, 2))
    assert features["train"].arrays["features"].shape == (len(rows[::2]), 8)
    assert lowest_cosine(features["train"].arrays["features"], expected) >= engine_choice.MINIMUM_COSINE
    assert report["backbones"][f"tiny#{tensor}"]["feature_dim"] == 8


def test_a_stack_with_a_tflite_member_is_the_concatenation_and_adding_a_member_embeds_only_it(tiny, dataset, tmp_path):
    _, path, _ = tiny
    folder, rows = dataset
    cache = tmp_path / "cache"
    tflite_alone, first = extract_with(folder, rows, cache, f"tflite:{path}")
    # engine keras: the Keras member runs as it is (no conversion); the TFLite member as given.
    keras_alone, _ = extract_with(folder, rows, tmp_path / "other-cache", "mobilenet_v2", engine="keras")
    stacked, report = extract_with(folder, rows, cache, [f"tflite:{path}", "mobilenet_v2"], engine="keras")

    assert first["backbones"]["tiny"]["embedded"] == len(rows)
    assert report["backbones"]["tiny"] == {**report["backbones"]["tiny"], "embedded": 0, "cache_hits": len(rows)}
    assert report["backbones"]["mobilenet_v2"]["embedded"] == len(rows) and report["embedded"] == len(rows)
    for split in ("train", "val"):
        expected = np.concatenate(
            [tflite_alone[split].arrays["features"], keras_alone[split].arrays["features"]], axis=1
        )
        np.testing.assert_array_equal(stacked[split].arrays["features"], expected)
    arrays = stacked["train"].arrays
    assert list(arrays["block_widths"]) == [16, 1280] and list(arrays["block_offsets"]) == [0, 16]
    assert list(arrays["block_specs"]) == [f"tflite:{path}", "mobilenet_v2"]


def test_mirror_averaging_averages_each_image_with_its_mirror_image_and_caches_both(tiny, dataset, tmp_path):
    model, path, _ = tiny
    folder, rows = dataset
    cache = tmp_path / "cache"
    averaged, report = extract_with(folder, rows, cache, f"tflite:{path}", mirror_average=True)

    pixels = rendered(folder, rows[::2]).astype(np.float32)
    expected = (model(pixels).numpy() + model(pixels[:, :, ::-1].copy()).numpy()) / 2
    features = averaged["train"].arrays["features"]
    assert lowest_cosine(features, expected) >= engine_choice.MINIMUM_COSINE
    # Pooled features of these noisy test images are nearly mirror-symmetric: compare distances.
    assert 100 * np.abs(features - expected).max() < np.abs(features - model(pixels).numpy()).max()
    assert report["embedded"] == 2 * len(rows) and report["distinct_views"] == 2 * len(rows)
    plain, plain_report = extract_with(folder, rows, cache, f"tflite:{path}")
    assert plain_report["embedded"] == 0, "the originals were cached by the averaging run"
    _, again = extract_with(folder, rows, cache, f"tflite:{path}", mirror_average=True)
    assert again["embedded"] == 0 and again["cache_hits"] == 2 * len(rows)
    assert lowest_cosine(plain["train"].arrays["features"], model(pixels).numpy()) >= engine_choice.MINIMUM_COSINE


# ---------------------------------------------------------------- bad specs


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.tflite").write_text("not a model\n")
    engines.convert_to_tflite(tiny_keras_model(channels=1), folder / "gray.tflite")
    return folder


def resolve(spec: str):
    return stack.resolve_members(params.parse_section("extract_features", {"backbone": [spec]}), seed=0)


def test_each_bad_spec_gives_its_error_naming_the_file(tiny, bad_files, tmp_path):
    _, path, tensor = tiny
    missing = tmp_path / "missing" / "model.tflite"
    with pytest.raises(ValueError, match=rf"TFLite file not found: {missing}"):
        resolve(f"tflite:{missing}")
    with pytest.raises(ValueError, match=r"text\.tflite is not a TFLite model"):
        resolve(f"tflite:{bad_files / 'text.tflite'}")
    with pytest.raises(ValueError, match=r"gray\.tflite: the model must take one RGB image batch .*\(1, 32, 32, 1\)"):
        resolve(f"tflite:{bad_files / 'gray.tflite'}")
    with pytest.raises(ValueError) as unknown:
        resolve(f"tflite:{path}#{TAP_LAYER}")  # a layer name, not the converted tensor's full name
    message = str(unknown.value)
    assert f"no tensor named '{TAP_LAYER}'" in message and str(path) in message
    assert tensor in message, "the candidates must list the full name of the tensor that was meant"
    with pytest.raises(ValueError, match="names no tensor"):
        resolve(f"tflite:{path}#")


def test_a_bad_spec_stops_the_stage_with_its_message(tiny, bad_files, tmp_path):
    root = tmp_path / "workspace"
    folder = support.write_dataset(root / "data" / "raw" / "images", per_class=3)
    lines = ["path,label,sha256,recipe"] + [
        f"{r['path']},{r['label']},{r['sha256']}," for r in support.rows_for(folder)
    ]
    for target in ("data/augmented/train.csv", "data/splits/val.csv", "data/splits/test.csv"):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text("\n".join(lines) + "\n")
    settings = {"backbone": ["tflite:../bad/text.tflite"], "cache_dir": str(tmp_path / "cache")}
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 0}, "extract_features": settings}))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "text.tflite").write_bytes((bad_files / "text.tflite").read_bytes())
    command = support.extract_features_command()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    # The relative path counts from the workspace root (the folder holding dvc.yaml).
    assert "workspace/../bad/text.tflite is not a TFLite model" in result.stderr
    assert "Traceback" not in result.stderr and not (root / "data" / "features").exists()


# ---------------------------------------------------------------- queued experiments


def test_relative_paths_resolve_against_the_main_root_inside_queued_copies(tmp_path):
    root = tmp_path / "project"
    queued_copy = root / ".dvc" / "tmp" / "exps" / "tmp1a2b3c" / "stages"
    assert paths.repository_root(queued_copy) == root
    spec = registry.parse_spec("tflite:../models/tiny.tflite", root=paths.repository_root(queued_copy))
    assert spec.path.resolve() == (tmp_path / "models" / "tiny.tflite").resolve()


def test_a_queued_experiment_with_a_relative_tflite_path_works(tiny, dvc_project):
    _, path, _ = tiny
    project = dvc_project
    models = project.root.parent / "models"
    models.mkdir()
    (models / "tiny.tflite").write_bytes(path.read_bytes())  # outside the project: only a relative path reaches it
    name = "queued-tiny"
    project.dvc("exp", "run", "--queue", "-n", name, "-S", "extract_features.backbone=[tflite:../models/tiny.tflite]")
    project.dvc("queue", "start")
    state = wait_for(project, name)
    assert state == "success", project.dvc("queue", "logs", name, check=False).stdout[-4000:]

    metrics = experiment_metrics(project, name)
    member = metrics["metrics/extract_features.json"]["backbones"]["tiny"]
    assert member["spec"] == "tflite:../models/tiny.tflite" and member["weights"] == registry.sha256_file(path)
    assert member["feature_dim"] == 16 and member["embedded"] + member["cache_hits"] > 0
    evaluation = metrics["metrics/evaluate.json"]
    assert evaluation["provenance"]["backbone"] == "tiny"  # evaluate saw the queued copy's tiny features
    assert evaluation["provenance"]["blocks"]["tiny"]["width"] == 16
    assert evaluation["test"]["examples"] > 0


def wait_for(project, name: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = project.dvc("queue", "status").stdout
        for line in status.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == name and parts[-1].lower() in ("success", "failed"):
                return parts[-1].lower()
        time.sleep(2)
    raise AssertionError(f"experiment {name} did not finish in {timeout} s:\n{status}")


def experiment_metrics(project, name: str) -> dict:
    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for revision in group.get("revs") or []:
                if revision.get("name") == name:
                    return {path: content["data"] for path, content in revision["data"]["metrics"].items()}
    raise AssertionError(f"experiment {name} not in dvc exp show:\n{json.dumps(shown)[:3000]}")
