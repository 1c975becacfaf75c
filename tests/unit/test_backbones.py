"""The backbone registry without TensorFlow: names, validation, specs, weights identity,
TFLite descriptions and the `transferlab backbones` command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys

import pytest

from conftest import WEIGHTS, require_mirror
from transferlab.backbones import registry
from transferlab.cli import backbones as backbones_command
from transferlab.tflite import describe

TFLITE_FILES = {
    "mobilenet_v1_1.0_224_uint8_features.tflite": (
        1024,
        "uint8",
        "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319",
    ),
    "mobilenet_edgetpu_1.0_224_uint8_features.tflite": (
        1280,
        "uint8",
        "fc0a8c8e3007b4f28654408b7259aa948fcfd3fe9ecff1d1632b2c1d3e82b2a8",
    ),
    "efficientnet_lite0_224_int8_features.tflite": (
        1280,
        "uint8",
        "a16fabf94c859b4ffcf978cc9a9d1913d9da2ceb01f59b92909ad95e92d984c9",
    ),
}
V1_TFLITE = WEIGHTS / "mobilenet_v1_1.0_224_uint8_features.tflite"
V1_POOL = "MobilenetV1/Logits/AvgPool_1a/AvgPool"


# ---------------------------------------------------------------- registry


def test_registry_holds_every_family_the_course_names():
    expected = {
        "vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50_v2", "resnet101_v2", "resnet152_v2",
        "mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "inception_v3",
        "inception_resnet_v2", "xception", "efficientnet_v2_s",
        *(f"efficientnet_b{index}" for index in range(8)), *(f"efficientnet_v2_b{index}" for index in range(4)),
    }  # fmt: skip
    assert set(registry.names()) == expected
    assert len(registry.names()) == len(expected)


@pytest.mark.parametrize("name", registry.names())
def test_entry_is_consistent(name):
    entry = registry.get(name)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", entry.name)
    assert entry.preprocess_mode in registry.PREPROCESS_MODES
    assert entry.min_size <= entry.default_size
    assert entry.parameters > 100_000 and entry.gflops > 0.05
    assert registry.feature_dim(entry) == entry.feature_dim
    assert entry.official_weights_file() == entry.weights_file
    assert entry.weights_file.endswith(".h5") and ("notop" in entry.weights_file or "no_top" in entry.weights_file)
    assert not entry.alphas or 1.0 in entry.alphas
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.default_size = 1  # type: ignore[misc]


def test_gflops_follow_the_architecture_convention():
    # ARCHITECTURE.md quotes 2 x multiply-adds per image at 224 px.
    quoted = {
        "mobilenet_v2": 0.60,
        "vgg16": 30.7,
        "resnet50": 7.7,
        "mobilenet": 1.14,
        "mobilenet_v3_large": 0.43,
        "efficientnet_b0": 0.77,
    }
    for name, gflops in quoted.items():
        assert registry.get(name).gflops == pytest.approx(gflops, rel=0.01), name


def test_alpha_lists_and_widths():
    assert registry.get("mobilenet").alphas == (0.25, 0.5, 0.75, 1.0)
    assert registry.get("mobilenet_v2").alphas == (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
    assert registry.get("resnet50").alphas == ()
    assert registry.feature_dim("mobilenet", 0.25) == 256
    assert registry.feature_dim("mobilenet_v2", 0.35) == 1280  # the last conv is not thinned below 1.0
    assert registry.feature_dim("mobilenet_v2", 1.4) == 1792
    assert registry.feature_dim("mobilenet_v3_small", 0.75) == 432
    assert registry.feature_dim("vgg16", None) == 512


def test_unknown_name_lists_every_choice_and_suggests_the_closest():
    with pytest.raises(ValueError) as error:
        registry.get("resnet5")
    message = str(error.value)
    assert message.startswith("Unsupported backbone 'resnet5'")
    assert "did you mean 'resnet50'" in message
    for name in registry.names():
        assert name in message
    with pytest.raises(ValueError, match="did you mean 'mobilenet_v2'"):
        registry.get("MobileNetV2")
    with pytest.raises(ValueError, match="did you mean 'efficientnet_b0'"):
        registry.get("efficientnetb0")


def test_get_is_case_insensitive_and_passes_entries_through():
    entry = registry.get(" MobileNet_V2 ")
    assert (
        entry.name == "mobilenet_v2"
        and entry.constructor == "MobileNetV2"
        and entry.preprocess_module == "mobilenet_v2"
    )
    assert registry.get(entry) is entry


def test_alpha_validation_lists_allowed_values():
    assert registry.check_alpha(registry.get("mobilenet"), None) == 1.0
    assert registry.check_alpha(registry.get("mobilenet"), 0.25) == 0.25
    with pytest.raises(ValueError, match=r"choose one of: 0\.25, 0\.5, 0\.75, 1$"):
        registry.check_alpha(registry.get("mobilenet"), 0.3)
    with pytest.raises(ValueError, match="1.3, 1.4"):
        registry.check_alpha(registry.get("mobilenet_v2"), 2.0)
    assert registry.check_alpha(registry.get("vgg16"), 1.0) is None  # params' default alpha is harmless
    with pytest.raises(ValueError, match="vgg16 has no width multiplier"):
        registry.check_alpha(registry.get("vgg16"), 0.5)


def test_image_size_validation():
    inception = registry.get("inception_v3")
    assert registry.check_image_size(inception, None) == 299
    assert registry.check_image_size(inception, 0) == 299
    assert registry.check_image_size(inception, 75) == 75
    with pytest.raises(ValueError, match="too small for inception_v3; use at least 75"):
        registry.check_image_size(inception, 64)
    with pytest.raises(ValueError, match="at least 71"):
        registry.check_image_size(registry.get("xception"), 70)
    with pytest.raises(ValueError, match="integer"):
        registry.check_image_size(inception, 224.0)


def test_build_validates_before_importing_keras():
    # These fail on arguments, so they must not pay for TensorFlow (checked in a clean process below).
    with pytest.raises(ValueError, match="choose one of"):
        registry.build("mobilenet", alpha=0.4, weights="none")
    with pytest.raises(ValueError, match="too small"):
        registry.build("xception", weights="none", image_size=32)
    with pytest.raises(ValueError, match="weights file not found: .*missing.h5"):
        registry.build("mobilenet", weights="/nonexistent/missing.h5")


# ---------------------------------------------------------------- weights identity


def test_official_weights_file_depends_on_alpha_and_size_like_keras():
    mobilenet = registry.get("mobilenet")
    assert mobilenet.official_weights_file(0.25, 160) == "mobilenet_2_5_160_tf_no_top.h5"
    assert mobilenet.official_weights_file(0.5, 200) == "mobilenet_5_0_224_tf_no_top.h5"  # Keras falls back to 224
    v2 = registry.get("mobilenet_v2")
    assert v2.official_weights_file(1.3, 224) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.3_224_no_top.h5"
    assert v2.official_weights_file(0.35, 96) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    small = registry.get("mobilenet_v3_small")
    assert small.official_weights_file(0.75, 160) == "weights_mobilenet_v3_small_224_0.75_float_no_top_v2.h5"
    assert (
        registry.get("resnet50_v2").official_weights_file(None, 160)
        == "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert registry.get("efficientnet_v2_s").weights_file == "efficientnetv2-s_notop.h5"


def test_weights_identity(tmp_path, monkeypatch):
    entry = registry.get("mobilenet")
    assert registry.weights_identity(entry, "imagenet", alpha=0.25, image_size=128) == "mobilenet_2_5_128_tf_no_top.h5"
    assert registry.weights_identity(entry, "ImageNet", alpha=None, image_size=None) == "mobilenet_1_0_224_tf_no_top.h5"
    assert registry.weights_identity(entry, "none", seed=7) == "random-init-seed7"
    assert registry.weights_identity(entry, None, seed=3) == "random-init-seed3"
    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"not really weights, but bytes to hash")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert registry.weights_identity(entry, str(weights), alpha=0.25, image_size=96, seed=1) == digest
    # Relative paths count from the main repository root, whatever the working directory.
    monkeypatch.setenv("TRANSFERLAB_ROOT", str(tmp_path))
    monkeypatch.chdir("/")
    assert registry.weights_identity(entry, "weights.h5") == digest
    weights.write_bytes(b"changed")  # a changed file is a different identity
    assert registry.weights_identity(entry, "weights.h5") == hashlib.sha256(b"changed").hexdigest()


def test_weights_identity_of_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "weights.h5"
    with pytest.raises(ValueError, match=re.escape(str(missing))) as error:
        registry.weights_identity("mobilenet_v2", str(missing))
    assert "'imagenet' or 'none'" in str(error.value)


# ---------------------------------------------------------------- specs


def test_parse_registry_spec():
    spec = registry.parse_spec(" mobilenet_v2 ")
    assert (spec.kind, spec.name, spec.path, spec.tensor, spec.text) == (
        "keras",
        "mobilenet_v2",
        None,
        "",
        "mobilenet_v2",
    )
    assert spec.backbone is registry.get("mobilenet_v2")
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        registry.parse_spec("resnet5")


def test_parse_tflite_specs(tmp_path):
    spec = registry.parse_spec("tflite:models/x.tflite", root=tmp_path)
    assert (spec.kind, spec.path, spec.tensor, spec.name) == ("tflite", tmp_path / "models" / "x.tflite", "", "x")
    tapped = registry.parse_spec("tflite:/abs/dir/y.tflite#Block_13/Relu6:0", root=tmp_path)
    assert (tapped.path.as_posix(), tapped.tensor, tapped.name) == (
        "/abs/dir/y.tflite",
        "Block_13/Relu6:0",
        "y#Block_13/Relu6:0",
    )
    with pytest.raises(ValueError, match="is a TFLite file"):
        _ = tapped.backbone


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "registry name or tflite:PATH"),
        ("tflite:", "has no file path"),
        ("tflite:#tensor", "has no file path"),
        ("tflite:x.tflite#", "names no tensor"),
        ("onnx:model.onnx", "Unsupported backbone spec kind 'onnx:'"),
        ("model.tflite", "write 'tflite:model.tflite'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        registry.parse_spec(spec)


# ---------------------------------------------------------------- TFLite files


@pytest.mark.real_data
@pytest.mark.parametrize("file_name", sorted(TFLITE_FILES))
def test_describe_shared_tflite_extractors(file_name):
    path = require_mirror(WEIGHTS / file_name)
    width, dtype, sha256 = TFLITE_FILES[file_name]
    info = describe.describe_tflite(path)
    assert info.sha256 == sha256
    assert (info.image_size, info.input_shape, info.input_dtype) == (224, (1, 224, 224, 3), dtype)
    assert info.input_quantization[0] > 0
    assert info.feature_dim == width and info.output_shape[-1] == width and info.output_quantization[0] > 0
    assert 2_000_000 < info.parameters < 5_000_000  # the files are 2.9-4.0 MB of mostly int8 weights
    assert 0.5 < info.gflops < 2.5


@pytest.mark.real_data
def test_tflite_ops_count_matches_keras_mobilenet():
    # Same architecture, counted from TFLite tensor shapes and from Keras layers.
    info = describe.describe_tflite(require_mirror(V1_TFLITE))
    assert info.gflops == pytest.approx(registry.get("mobilenet").gflops, rel=0.01)


@pytest.mark.real_data
def test_describe_named_tensor():
    path = require_mirror(V1_TFLITE)
    output = describe.describe_tflite(path)
    assert output.output_name == V1_POOL and output.tensor == ""
    inner_name = next(
        name for name in _tensor_names(path) if name.startswith("MobilenetV1/MobilenetV1/Conv2d_11_pointwise/Relu6")
    )
    inner = describe.describe_tflite(path, inner_name)
    assert (inner.tensor, inner.output_name, inner.output_shape, inner.feature_dim) == (
        inner_name,
        inner_name,
        (1, 14, 14, 512),
        512,
    )
    assert inner.sha256 == output.sha256 and inner.parameters == output.parameters


@pytest.mark.real_data
def test_bad_tensor_name_lists_candidates():
    path = require_mirror(V1_TFLITE)
    with pytest.raises(ValueError) as error:
        describe.describe_tflite(path, "Conv2d_13_pointwise/Relu6")
    message = str(error.value)
    assert str(path) in message and "no tensor named 'Conv2d_13_pointwise/Relu6'" in message
    assert "Close matches" in message and "MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6;" in message
    with pytest.raises(ValueError) as error:
        describe.describe_tflite(path, "zzz")
    assert "the last computed tensors" in str(error.value) and V1_POOL in str(error.value)


def test_missing_tflite_file(tmp_path):
    with pytest.raises(ValueError, match=f"TFLite file not found: {re.escape(str(tmp_path / 'absent.tflite'))}"):
        describe.describe_tflite(tmp_path / "absent.tflite")


def test_not_a_tflite_file(tmp_path):
    text = tmp_path / "notes.tflite"
    text.write_text("just some text, not a flatbuffer\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(text))} is not a TFLite model"):
        describe.describe_tflite(text)
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\xff" * 64)  # right identifier, garbage body
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        describe.describe_tflite(broken)


@pytest.mark.real_data
def test_input_that_is_not_one_rgb_image(tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(require_mirror(V1_TFLITE)))
    graph = model.subgraphs[0]
    graph.tensors[graph.inputs[0]].shape = [1, 224, 224, 1]
    gray = tmp_path / "gray.tflite"
    flatbuffer_utils.write_model(model, str(gray))
    with pytest.raises(ValueError, match=re.escape(f"{gray}: the model must take one RGB image batch")) as error:
        describe.describe_tflite(gray)
    assert "(1, 224, 224, 1)" in str(error.value)


def _tensor_names(path):
    from ai_edge_litert.interpreter import Interpreter

    return [detail["name"] for detail in Interpreter(model_path=str(path)).get_tensor_details()]


# ---------------------------------------------------------------- the command


def test_listing_contains_every_backbone(capsys):
    assert backbones_command.run(_arguments()) == 0
    output = capsys.readouterr().out
    lines = {line.split()[0]: line for line in output.splitlines() if line.strip()}
    for name in registry.names():
        entry = registry.get(name)
        assert name in lines, name
        assert f"{entry.parameters:,}" in lines[name] and entry.weights_file in lines[name]
    assert "0.35, 0.5, 0.75, 1, 1.3, 1.4" in lines["mobilenet_v2"]
    assert "(F_H x F_W x C + 1) x N_F" in output


def test_listing_as_json(capsys):
    assert backbones_command.run(_arguments(json=True)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(registry.names())
    vgg = rows[0]
    assert vgg["parameters"] == 14_714_688 and vgg["preprocess_mode"] == "caffe" and vgg["alphas"] == []


def test_listing_does_not_import_tensorflow():
    code = (
        "import sys; from transferlab import cli; code = cli.main(['backbones']); "
        "assert code == 0; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "efficientnet_v2_s" in result.stdout


@pytest.mark.real_data
def test_describe_file_command(capsys):
    path = require_mirror(V1_TFLITE)
    assert backbones_command.run(_arguments(file=str(path))) == 0
    output = capsys.readouterr().out
    assert "feature width: 1024" in output and "image size: 224" in output and TFLITE_FILES[path.name][2] in output
    assert backbones_command.run(_arguments(file=f"{path}#{V1_POOL}", json=True)) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["tensor"] == V1_POOL and described["feature_dim"] == 1024


@pytest.mark.real_data
def test_describe_file_command_reports_bad_tensor():
    path = require_mirror(V1_TFLITE)
    result = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "backbones", "--file", f"{path}#nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no tensor named 'nope'" in result.stderr and V1_POOL in result.stderr


def _arguments(**overrides):
    import argparse

    parser = argparse.ArgumentParser()
    backbones_command.configure(parser)
    arguments = parser.parse_args([])
    for key, value in overrides.items():
        setattr(arguments, key, value)
    return arguments
