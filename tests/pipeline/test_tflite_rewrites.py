"""Faster rewrites of the shared quantized TFLite extractors, and choosing one by measurement."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from conftest import FLOWERS_ARCHIVE, WEIGHTS, require_mirror
from transferlab.backbones import registry
from transferlab.data import augment, images
from transferlab.features import cpu, engine_choice, engines
from transferlab.tflite import rewrites

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
EDGETPU = WEIGHTS / "mobilenet_edgetpu_1.0_224_uint8_features.tflite"
V1 = WEIGHTS / "mobilenet_v1_1.0_224_uint8_features.tflite"
LITE0 = WEIGHTS / "efficientnet_lite0_224_int8_features.tflite"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four flower photos of different classes from the mirror, at 224 px as the pipeline renders them."""
    archive = require_mirror(FLOWERS_ARCHIVE)
    folder = tmp_path_factory.mktemp("photos")
    taken: set[str] = set()
    with tarfile.open(archive) as handle:
        for member in handle:
            label = member.name.split("/")[1] if member.name.count("/") == 2 else ""
            if member.isfile() and member.name.endswith(".jpg") and label not in taken:
                taken.add(label)
                handle.extract(member, folder, filter="data")
            if len(taken) == 4:
                break
    paths = sorted(folder.rglob("*.jpg"))
    return np.stack([augment.render_view(images.open_rgb(path, max_image_pixels=10**8), "", 224) for path in paths])


def delegate_partitions(content: bytes) -> int:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=1)
    interpreter.allocate_tensors()
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())


def test_written_in_shapes_let_xnnpack_take_the_whole_edgetpu_graph_and_change_nothing(photos):
    content = require_mirror(EDGETPU).read_bytes()
    shaped = rewrites.static_shapes_content(content)

    assert len(rewrites.unshaped_tensors(content)) == 74 and rewrites.unshaped_tensors(shaped) == []  # every activation
    assert delegate_partitions(content) == 15, "as given, XNNPACK takes only the ADDs, one partition each"
    assert delegate_partitions(shaped) == 1
    exact = engine_choice._outputs(content, photos, delegate=False)  # LiteRT's reference kernels, batch 4
    np.testing.assert_array_equal(engine_choice._outputs(shaped, photos, delegate=False), exact)


def dequantized_filters(content: bytes) -> list[tuple[np.ndarray, int]]:
    """Each convolution's filter as real numbers, (q - zero point) x scale, and its channel axis."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interpreter.allocate_tensors()
    details = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    filters = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            detail = details[op["inputs"][1]]
            quantization = detail["quantization_parameters"]
            axis = 0 if op["op_name"] == "CONV_2D" else 3
            shape = [1] * len(detail["shape"])
            shape[axis] = -1 if len(quantization["scales"]) > 1 else 1
            values = interpreter.get_tensor(op["inputs"][1]).astype(np.float64)
            filters.append(
                ((values - quantization["zero_points"].reshape(shape)) * quantization["scales"].reshape(shape), axis)
            )
    return filters


def test_the_int8_rewrite_keeps_the_weights_and_the_features(photos):
    content = require_mirror(V1).read_bytes()
    rewritten = rewrites.int8_content(content)

    original, converted = dequantized_filters(content), dequantized_filters(rewritten)
    assert len(original) == len(converted) == 27
    exact = total = 0
    for (before, axis), (after, _) in zip(original, converted):
        same = np.moveaxis(before == after, axis, 0).reshape(before.shape[axis], -1).all(axis=1)
        exact, total = exact + int(same.sum()), total + len(same)
        assert np.abs(before - after).max() <= np.abs(before).max() / 254  # half a step of the coarser scale
    assert exact / total > 0.99, f"channels that fit in int8 are carried over exactly; only {exact} of {total} were"
    assert delegate_partitions(rewritten) == 1
    reference = engine_choice._outputs(content, photos, delegate=False)
    cosine = engines.cosine_similarity(engine_choice._outputs(rewritten, photos, delegate=True), reference).min()
    assert cosine >= 0.999
    assert rewrites.int8_problem(require_mirror(LITE0).read_bytes()) == "already an int8 model"
    with pytest.raises(ValueError, match="already an int8 model"):
        rewrites.int8_content(LITE0.read_bytes())


def fixed_speeds(monkeypatch, content: bytes, *, as_given: float, rewritten: float, batch: int = 8) -> None:
    """Speed is measured on a shared machine; the choice is tested with fixed figures (``batch`` fastest)."""

    def race(candidates, pixels):
        return {
            name: (as_given if model == content else rewritten) * (2 if size == batch else 1)
            for name, (model, size) in candidates.items()
        }

    monkeypatch.setattr(engine_choice, "_race", race)


def test_the_fastest_agreeing_path_is_chosen_and_remembered(photos, tmp_path, monkeypatch):
    content = require_mirror(V1).read_bytes()
    sha256 = registry.sha256_file(V1)
    fixed_speeds(monkeypatch, content, as_given=50.0, rewritten=100.0, batch=1)

    def choose(requested):
        return engine_choice.choose_tflite_engine(
            requested=requested,
            path=V1,
            tensor="",
            sha256=sha256,
            conversion_directory=tmp_path,
            sample_pixels=lambda: photos,
        )

    choice = choose("auto")
    assert choice.name in ("tflite-int8", "tflite-float32"), "both rewrites agree with v1 and are equally fast here"
    verdict = json.loads(engine_choice.tflite_verdict_path(tmp_path, sha256, cpu.current()).read_text())
    assert verdict["paths"]["int8"]["qualifies"] and verdict["paths"]["int8"]["lowest_cosine"] >= verdict["noise_floor"]
    assert verdict["paths"]["float32"]["qualifies"], "float32 is a candidate, and it agrees with v1"
    assert verdict["not_applicable"] == {"static-shapes": "every tensor already has a shape"}
    assert (
        verdict["batch"] == 1 and verdict["images_per_second"] == 200.0 and verdict["cpu"]["key"] == cpu.current().key
    )
    summary = choice.summary()
    assert summary["batch"] == 1 and summary["measured_images_per_second"] == 200.0
    assert summary["candidates"] == {"as_given": 50.0, "int8": 100.0, "float32": 100.0}

    monkeypatch.setattr(
        engine_choice, "measure", lambda *arguments: pytest.fail("a remembered verdict is not measured again")
    )
    assert choose("auto").name == choice.name
    assert choose("tflite").name == "tflite", "engine: tflite runs the file as given"
    engine = choice.build()
    features = engine.run(photos)
    assert engine.slice == 1 and features.shape == (4, 1024) and features.dtype == np.float32
    assert engines.cosine_similarity(features, engine_choice._outputs(content, photos, delegate=False)).min() >= 0.998
    assert (
        rewrites.rewrite_of_engine(choice.name) == choice.verdict["rewrite"]
        and rewrites.rewrite_of_engine("tflite") == ""
    )


def test_of_paths_within_15_percent_of_the_fastest_the_most_faithful_is_chosen(photos, monkeypatch):
    """A near-tie's winner changes with the machine's load; the verdict must not, so fidelity decides it."""
    content = require_mirror(LITE0).read_bytes()
    fixed_speeds(monkeypatch, content, as_given=100.0, rewritten=100.0 * engine_choice.SPEED_TOLERANCE * 0.99)
    tied = engine_choice.measure(content, photos)
    cosines = {name: report["lowest_cosine"] for name, report in tied["paths"].items()}
    assert set(cosines) == {"as_given", "float32"} and cosines["as_given"] != cosines["float32"]
    faithful = max(cosines, key=cosines.get)
    assert tied["rewrite"] == ("" if faithful == "as_given" else faithful), tied["reason"]
    assert "closest to the reference kernels" in tied["reason"]

    # The same two paths with the less faithful one clearly faster: speed wins.
    slow, fast = (100.0, 100.0 * engine_choice.SPEED_TOLERANCE * 1.05)
    as_given, rewritten = (slow, fast) if faithful == "as_given" else (fast, slow)
    fixed_speeds(monkeypatch, content, as_given=as_given, rewritten=rewritten)
    clear = engine_choice.measure(content, photos)
    assert clear["rewrite"] == ("float32" if faithful == "as_given" else ""), clear["reason"]


def test_a_faster_rewrite_that_disagrees_is_not_used(photos, monkeypatch):
    from ai_edge_litert.tools import flatbuffer_utils

    content = require_mirror(V1).read_bytes()
    real_int8 = rewrites.int8_content

    def broken_int8(source: bytes) -> bytes:  # the rewrite with its weights scrambled
        model = flatbuffer_utils.convert_bytearray_to_object(bytearray(real_int8(source)))
        flatbuffer_utils.randomize_weights(model, random_seed=0)
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))

    monkeypatch.setattr(rewrites, "int8_content", broken_int8)
    fixed_speeds(monkeypatch, content, as_given=50.0, rewritten=100.0)
    verdict = engine_choice.measure(content, photos)
    assert verdict["rewrite"] != "int8" and not verdict["paths"]["int8"]["qualifies"]
    assert "(rejected)" in verdict["reason"]


@pytest.mark.parametrize(
    ("path", "lowest"),
    [(V1, 0.997), (LITE0, 0.995)],
    ids=["mobilenet_v1", "efficientnet_lite0"],
)
def test_the_float32_rewrite_computes_what_the_file_computes(photos, path, lowest):
    content = require_mirror(path).read_bytes()
    rewritten = rewrites.float32_content(content)

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=rewritten)
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8, "it takes the same uint8 image"
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    assert delegate_partitions(rewritten) == 1, "XNNPACK takes the whole float graph"
    reference = engine_choice._outputs(content, photos, delegate=False)
    cosine = engines.cosine_similarity(engine_choice._outputs(rewritten, photos, delegate=True), reference)
    assert cosine.min() >= lowest
    interpreter.allocate_tensors()
    float_filters = [
        interpreter.get_tensor(op["inputs"][1])
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")
    ]
    quantized_filters = dequantized_filters(content)
    assert len(float_filters) == len(quantized_filters)
    for values, (real, _) in zip(float_filters, quantized_filters, strict=True):
        np.testing.assert_allclose(values, real, rtol=1e-6, atol=1e-7)  # the weights' real values, in float32


def test_the_float32_rewrite_of_edgetpu_is_measured_and_refused(photos, monkeypatch):
    content = require_mirror(EDGETPU).read_bytes()
    fixed_speeds(monkeypatch, content, as_given=10.0, rewritten=100.0)

    verdict = engine_choice.measure(content, photos)

    # The file clamps its ReLUs at calibrated maxima; the float graph does not: below the noise floor.
    assert not verdict["paths"]["float32"]["qualifies"]
    assert verdict["paths"]["float32"]["lowest_cosine"] < verdict["noise_floor"]
    assert verdict["rewrite"] in ("static-shapes", "int8")
    assert "float32" in verdict["reason"] and "(rejected)" in verdict["reason"]


def test_the_float32_rewrite_is_not_a_candidate_when_it_drops_the_tapped_tensor(photos, monkeypatch):
    content = require_mirror(LITE0).read_bytes()
    fixed_speeds(monkeypatch, content, as_given=10.0, rewritten=100.0)

    assert rewrites.float32_dropped_tensors(content) == {"tfl.quantize"}  # the image as int8
    verdict = engine_choice.measure(content, photos, tensor="tfl.quantize")
    assert verdict["rewrite"] == "" and "drops the tapped tensor 'tfl.quantize'" in verdict["not_applicable"]["float32"]
    assert engine_choice.measure(content, photos)["rewrite"] == "float32", "the graph output is kept"


def test_a_verdict_is_remembered_per_cpu(photos, tmp_path, monkeypatch):
    content = require_mirror(LITE0).read_bytes()
    sha256 = registry.sha256_file(LITE0)
    measured = []
    real_measure = engine_choice.measure

    def counting_measure(model, pixels, **options):
        measured.append(1)
        return real_measure(model, pixels, **options)

    monkeypatch.setattr(engine_choice, "measure", counting_measure)
    avx2 = cpu.CpuIdentity(model="AMD EPYC", flags=("avx", "avx2", "fma"), cpus=2)
    vnni = cpu.CpuIdentity(model="AMD EPYC", flags=("avx", "avx2", "avx512_vnni", "avx512f", "fma"), cpus=2)

    def choose(identity, as_given, rewritten):
        fixed_speeds(monkeypatch, content, as_given=as_given, rewritten=rewritten)
        return engine_choice.choose_tflite_engine(
            requested="auto",
            path=LITE0,
            tensor="",
            sha256=sha256,
            conversion_directory=tmp_path,
            sample_pixels=lambda: photos,
            cpu_identity=identity,
        )

    assert avx2.key != vnni.key
    assert choose(avx2, as_given=40.0, rewritten=60.0).name == "tflite-float32"
    assert choose(vnni, as_given=90.0, rewritten=30.0).name == "tflite", "another CPU: measured afresh"
    assert len(measured) == 2
    assert choose(avx2, as_given=90.0, rewritten=30.0).name == "tflite-float32", "each CPU keeps its own verdict"
    assert len(measured) == 2
    assert {path.name for path in tmp_path.glob("*.json")} == {
        f"{sha256}-{avx2.key}-tflite.json",
        f"{sha256}-{vnni.key}-tflite.json",
    }
    moved = engine_choice.tflite_verdict_path(tmp_path, sha256, vnni)
    moved.write_bytes(engine_choice.tflite_verdict_path(tmp_path, sha256, avx2).read_bytes())  # copied by hand
    assert choose(vnni, as_given=90.0, rewritten=30.0).name == "tflite", "a verdict of another CPU is never served"
    assert len(measured) == 3


@pytest.mark.parametrize(
    ("path", "rewrite"), [(V1, "int8"), (LITE0, ""), (LITE0, "float32")], ids=["v1-int8", "lite0", "lite0-float32"]
)
def test_threads_and_the_engine_batch_leave_the_features_unchanged(photos, path, rewrite):
    """The batch and threads chosen per CPU are not in the cache key, so they must not move a bit of the features."""
    content = rewrites.rewritten_content(require_mirror(path).read_bytes(), rewrite)
    reference = engines.TFLiteEngine(path, content=content, threads=2).run(photos)
    for threads, batch in [(1, 0), (1, 1), (2, 1), (2, 3)]:
        features = engines.TFLiteEngine(path, content=content, threads=threads, batch=batch).run(photos)
        np.testing.assert_array_equal(features, reference, err_msg=f"threads {threads}, batch {batch}")
