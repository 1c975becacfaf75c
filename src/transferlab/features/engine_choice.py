"""Choosing how to run a backbone, by measurement on real photos; the verdict is remembered on disk.

Keras backbones (:func:`choose_keras_engine`): LiteRT runs the frozen Keras backbones 1.5x to
6.6x faster than ``model.predict`` on the 2-core machine (ARCHITECTURE.md, "Performance"), so
``auto`` converts a backbone to a float32 TFLite model once, checks it against Keras on real
photos (cosine >= :data:`MINIMUM_COSINE`) and uses it where it agrees; where conversion fails or
disagrees it falls back to Keras with a warning.

TFLite files (:func:`choose_tflite_engine`): a rewrite of the file (see
:mod:`transferlab.tflite.rewrites`) cannot be held to that cosine, since XNNPACK rounds 8-bit
requantization differently from LiteRT's reference kernels. What can be asked is that a rewrite
moves the features less than one grey level of input noise does (the *noise floor*: the lowest
cosine between the reference kernels' features of the photos and of the photos with each pixel
moved by -1, 0 or +1, seeded). :func:`measure` measures the file as given (XNNPACK) and every
applicable rewrite (static shapes, int8, float32), keeps those that pass, uses the fastest (or,
of the paths within 15% of the fastest, :data:`SPEED_TOLERANCE`, the one closest to the reference
kernels: a near-tie's winner would change with the machine's load, and with it the features),
then picks its batch size by measurement too (:data:`BATCH_CANDIDATES`; the batch does not change
a path's features, bit for bit: tests/pipeline/test_tflite_rewrites.py). Which path is fastest depends
on the CPU (int8 wins with VNNI; float32 can win on AVX2 alone), so the verdict is remembered per
file (by sha256) *and* per CPU (:mod:`transferlab.features.cpu`) in the embedding cache's
conversion folder: a cache folder shared between machines never serves one machine's verdict to
another. Each rewrite has its own engine name, part of the embedding cache key, so embeddings of
different paths never mix. Speeds are measured interleaved (one invocation of each candidate in
turn), so a load that comes and goes on a shared machine slows every candidate alike.

Nothing read back from the conversion folder is trusted (see :mod:`transferlab.features.cache_files`):
verdicts carry a checksum, a converted model's sha256 is recorded in its verdict, and a damaged
or unrecorded file is recomputed with a warning. Every TFLite choice also names the sha256 of
the exact bytes its engine will run (:attr:`ConvertedEngine.content_sha256`, part of the
embedding cache's namespace), and the engine, when built, runs only bytes with that sha256: a
damaged model can never place embeddings under the key of the good one.

This module sits above :mod:`transferlab.features.engines` (running an engine) and
:mod:`transferlab.tflite.rewrites` (rewriting bytes), which import nothing from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones.stack import Member
from transferlab.core import atomic
from transferlab.features import cache_files, cpu, engines
from transferlab.tflite import rewrites

LOGGER = logging.getLogger(__name__)
MINIMUM_COSINE = 0.9999  # the agreement a converted Keras backbone must reach with Keras to be used
VERIFICATION_IMAGES = 16  # real photos that a converted engine must reproduce Keras on
VERDICT_VERSION = 2  # 2: verdicts carry a checksum and the sha256 of the model bytes to run
SPEED_SECONDS = 1.0  # per candidate; the differences it looks for are 2x, not 10%
SPEED_BATCH = 8
SPEED_SAMPLES = 25  # invocations per candidate that end a race early (small models: milliseconds, not seconds)
BATCH_CANDIDATES = (1, 8, 32)  # engine batch sizes raced for the chosen path (depthwise nets can prefer 1)
SPEED_TOLERANCE = 1.15  # paths within this factor of the fastest are tied; the most faithful of them wins
TFLITE_VERDICT_VERSION = 4  # 3: keyed by the CPU; float32 rewrite; batch chosen. 4: near-ties go to the most faithful
NOISE_SEED = 0


@dataclass
class ConvertedEngine:
    """The outcome of choosing an engine for a backbone: its name and how it is built.

    Attributes:
        name: the engine name (part of the embedding cache's namespace).
        build: builds the engine (called on the first cache miss only).
        verdict: why this engine (``reason``) and what was measured.
        content_sha256: the sha256 of the exact model bytes a TFLite engine runs (the converted
            or given file, after any rewrite); empty for Keras, whose weights identity names
            its numbers. Part of the embedding cache's namespace.
    """

    name: str
    build: Callable[[], Any]
    verdict: dict
    content_sha256: str = ""

    def summary(self) -> dict:
        """What was chosen and why, for the metrics: engine, rewrite, batch, measured images/s, CPU."""
        verdict = self.verdict
        paths = verdict.get("paths") or {}
        chosen = paths.get(verdict.get("rewrite") or "as_given", {})
        return {
            "engine": self.name,
            "rewrite": verdict.get("rewrite", ""),
            "batch": verdict.get("batch"),
            "measured_images_per_second": verdict.get("images_per_second", chosen.get("images_per_second")),
            "candidates": {name: report.get("images_per_second") for name, report in paths.items()},
            "rejected": sorted(name for name, report in paths.items() if not report.get("qualifies", True)),
            "cpu": (verdict.get("cpu") or {}).get("key", cpu.current().key),
            "conversion_seconds": verdict.get("seconds"),  # build (TensorFlow import), convert, verify: once
        }


def verification_pixels(
    items: Sequence[Any], render_one: Callable[[Any, int], np.ndarray], size: int
) -> Callable[[], np.ndarray]:
    """Gives the real photos an engine is checked on: the first views, rendered at ``size`` when called.

    Args:
        items: the views to embed (:class:`transferlab.features.decode.Item`).
        render_one: (item, size) -> uint8 pixels.
        size: the engine's input side.
    """
    return lambda: np.stack([render_one(item, size) for item in items[:VERIFICATION_IMAGES]])


# ---------------------------------------------------------------- Keras backbones


def conversion_identity(member: Member, tap: str = "") -> str:
    """Names a member's converted model (and its saved Keras backbone) in the conversion folder.

    Args:
        member: a stack member.
        tap: the layer whose input a tap model computes, or empty for the member's embedding.
    """
    return f"{member.identity}|{member.weights_identity}|{member.image_size}" + (f"|tap:{tap}" if tap else "")


def verify_against_keras(engine: Any, keras_engine: engines.KerasEngine, pixels: np.ndarray) -> float:
    """Returns the lowest cosine between ``engine`` and Keras on ``pixels`` (real photos)."""
    return float(engines.cosine_similarity(engine.run(pixels), keras_engine.run(pixels)).min())


def choose_keras_engine(
    *,
    requested: str,
    build_model: Callable[[], Any],
    conversion_directory: Path,
    identity: str,
    sample_pixels: Callable[[], np.ndarray],
    choose_batch: bool = False,
    cpu_identity: cpu.CpuIdentity | None = None,
) -> ConvertedEngine:
    """Picks ``keras`` or ``tflite`` for a Keras backbone; the verdict is remembered on disk.

    Args:
        requested: the ``extract_features.engine`` param: auto, keras or tflite.
        build_model: builds the Keras model (called only when needed).
        conversion_directory: where converted models and verdicts are kept (in the cache dir).
        identity: a key naming backbone + weights + input size; the converted file's name.
        sample_pixels: gives a batch of real photos to check the converted model against Keras.
        choose_batch: also choose the converted model's engine batch by measurement on this CPU
            (:data:`BATCH_CANDIDATES`; remembered per CPU beside the verdict, measured without TensorFlow).
        cpu_identity: the CPU that batch is chosen for; None: this machine's.

    Raises:
        ValueError: ``tflite`` was requested but the conversion does not agree with Keras.
    """
    if requested == "keras":
        return ConvertedEngine(
            "keras", lambda: engines.KerasEngine(build_model()), {"engine": "keras", "reason": "requested"}
        )
    key = hashlib.sha256(identity.encode()).hexdigest()
    verdict_path = conversion_directory / f"{key}.json"
    verdict = _keras_verdict(verdict_path, identity)
    if verdict is None:
        (conversion_directory / f"{key}.tflite").unlink(missing_ok=True)  # an unchecked model of an older version
        verdict = _convert_and_verify(build_model, conversion_directory, key, sample_pixels)
        verdict.update(version=VERDICT_VERSION, identity=identity)
        verdict = cache_files.write_record(verdict_path, verdict)  # after the model: it vouches for it
    if verdict["agrees"]:
        tflite_path = converted_model_path(verdict_path, verdict["tflite_sha256"])
        batch = 0
        if choose_batch and requested == "auto":
            record = _converted_batch(verdict_path, verdict, cpu_identity or cpu.current(), sample_pixels)
            verdict = {**verdict, **{name: record[name] for name in ("batch", "batches", "images_per_second", "cpu")}}
            verdict["reason"] += f"; batch {record['batch']} (images/s by batch: {record['batches']})"
            batch = int(record["batch"])
        return _checked_engine(
            "tflite", tflite_path, verdict, verdict_path, expected=verdict["tflite_sha256"], batch=batch
        )
    if requested == "tflite":
        raise ValueError(
            f"the TFLite conversion of {identity} does not agree with Keras ({verdict['reason']}); "
            "set extract_features.engine: keras (or auto, which falls back by itself)"
        )
    LOGGER.warning("TFLite engine not used for %s (%s); falling back to Keras", identity, verdict["reason"])
    return ConvertedEngine("keras", lambda: engines.KerasEngine(build_model()), verdict)


def _converted_batch(
    verdict_path: Path, verdict: dict, identity: cpu.CpuIdentity, sample_pixels: Callable[[], np.ndarray]
) -> dict:
    """The converted model's fastest engine batch on this CPU: ``<key>-<CPU key>-batch.json``, else measured.

    Depthwise networks can run faster at batch 1 than at 32 on LiteRT (their activations at 32
    overflow the cache), by how much depends on the CPU; the batch does not change the features
    (tests/pipeline/test_tflite_rewrites.py), so it is not part of the embedding cache key.
    """
    path = verdict_path.with_name(f"{verdict_path.stem}-{identity.key}-batch.json")
    record = cache_files.read_record(path, consequence="measuring the batch again")
    if (
        record is not None
        and record.get("version") == TFLITE_VERDICT_VERSION
        and record.get("tflite_sha256") == verdict["tflite_sha256"]
        and (record.get("cpu") or {}).get("key") == identity.key
        and record.get("batch") in BATCH_CANDIDATES
    ):
        return record
    content = converted_model_path(verdict_path, verdict["tflite_sha256"]).read_bytes()
    if cache_files.content_sha256(content) != verdict["tflite_sha256"]:
        raise ValueError(
            f"the converted model beside {verdict_path} changed during the run; run extract_features again"
        )
    LOGGER.info(
        "Measuring the converted model's batch on this CPU (%s); remembered for later runs", identity.description
    )
    record = _with_batch({"reason": ""}, content, sample_pixels())
    record.update(version=TFLITE_VERDICT_VERSION, tflite_sha256=verdict["tflite_sha256"], cpu=identity.as_dict())
    return cache_files.write_record(path, record)


def converted_model_path(verdict_path: Path, sha256: str) -> Path:
    """Where a converted model lives: ``<identity key>-<first 16 hex digits of its sha256>.tflite``.

    Content-addressed, because conversion is not byte-for-byte reproducible: two runs converting
    one backbone at once each keep their own file, and whichever verdict is written last names an
    intact one (with one shared name, a verdict could vouch for the other run's bytes).
    """
    return verdict_path.with_name(f"{verdict_path.stem}-{sha256[:16]}.tflite")


def _keras_verdict(verdict_path: Path, identity: str) -> dict | None:
    """The remembered verdict if it and the converted model it vouches for are intact, else None."""
    verdict = cache_files.read_record(verdict_path, consequence="converting and checking the backbone again")
    if verdict is None or verdict.get("version") != VERDICT_VERSION or verdict.get("identity") != identity:
        return None  # absent, damaged (warned), or of another format: convert again
    if not verdict.get("agrees"):
        return verdict
    sha256 = verdict.get("tflite_sha256")
    tflite_path = converted_model_path(verdict_path, sha256 if isinstance(sha256, str) else "")
    if not cache_files.file_matches(tflite_path, sha256, record=verdict_path, consequence="reconverting"):
        tflite_path.unlink(missing_ok=True)  # damaged: of no use to anyone, and never to be loaded
        return None
    return verdict


def _convert_and_verify(
    build_model: Callable[[], Any], directory: Path, key: str, sample_pixels: Callable[[], np.ndarray]
) -> dict:
    started = time.perf_counter()
    model = build_model()  # imports TensorFlow: the first run's start-up (issue 15 item 7), logged below
    built = time.perf_counter()
    try:
        content = engines.converted_content(model)
    except Exception as error:  # the converter raises many types; any failure means "use Keras"
        return {"agrees": False, "reason": f"conversion failed: {type(error).__name__}: {error}"[:500], "cosine": None}
    converted = time.perf_counter()
    sha256 = cache_files.content_sha256(content)
    tflite_path = converted_model_path(directory / f"{key}.json", sha256)
    with atomic.atomic_path(tflite_path) as temporary:
        temporary.write_bytes(content)
    engine = engines.TFLiteEngine(tflite_path, content=content)  # the bytes checked are the bytes recorded
    cosine = verify_against_keras(engine, engines.KerasEngine(model), sample_pixels())
    agrees = cosine >= MINIMUM_COSINE
    reason = f"lowest cosine {cosine:.6f} on real photos (needs >= {MINIMUM_COSINE})"
    seconds = {
        "build": round(built - started, 2),
        "convert": round(converted - built, 2),
        "verify": round(time.perf_counter() - converted, 2),
    }
    LOGGER.info("Converted the backbone to TFLite: %s s (build includes importing TensorFlow)", seconds)
    return {"agrees": agrees, "reason": reason, "cosine": cosine, "tflite_sha256": sha256, "seconds": seconds}


def _checked_engine(
    name: str,
    path: Path,
    verdict: dict,
    verdict_path: Path | None,
    *,
    expected: str,
    tensor: str = "",
    rewrite: str = rewrites.AS_GIVEN,
    batch: int = 0,
) -> ConvertedEngine:
    """An engine that runs ``path`` (after ``rewrite``) only if those bytes have the sha256 ``expected``.

    The choice was keyed by ``expected`` before any bytes were loaded (a warm run never loads
    them), so the bytes loaded later for the misses are checked again: a file changed in between
    must not place embeddings under that key.
    """

    def build() -> engines.TFLiteEngine:
        content = Path(path).read_bytes()
        if rewrite:
            content = rewrites.rewritten_content(content, rewrite)
        if cache_files.content_sha256(content) != expected:
            if verdict_path is not None:
                verdict_path.unlink(missing_ok=True)  # the next run measures (or converts) afresh
            raise ValueError(
                f"the model bytes from {path}{f' ({rewrite} rewrite)' if rewrite else ''} no longer have the sha256 "
                f"{expected[:12]}... this run chose them by (the file changed during the run"
                f"{', or the rewrite changed' if rewrite else ''}); run extract_features again"
            )
        return engines.TFLiteEngine(path, tensor=tensor, content=content, batch=batch)

    return ConvertedEngine(name, build, verdict, content_sha256=expected)


# ---------------------------------------------------------------- TFLite files


def choose_tflite_engine(
    *,
    requested: str,
    path: Path,
    tensor: str,
    sha256: str,
    conversion_directory: Path,
    sample_pixels: Callable[[], np.ndarray],
    cpu_identity: cpu.CpuIdentity | None = None,
) -> ConvertedEngine:
    """Picks how to run a ``tflite:`` backbone: the file as given, or its fastest agreeing rewrite.

    Args:
        requested: ``extract_features.engine``. ``auto`` chooses by measurement (below);
            ``tflite`` runs the file exactly as given; ``keras`` does not apply (as given, noted).
        path: the TFLite file.
        tensor: the tapped tensor (``tflite:PATH#TENSOR``), or empty for the output.
        sha256: the file's sha256; the verdict is remembered as ``<sha256>-<CPU key>-tflite.json``.
        conversion_directory: where verdicts are kept (the embedding cache's ``converted/``).
        sample_pixels: real photos at the file's input size (uint8, (N, S, S, 3)).
        cpu_identity: the CPU the verdict is for; None: this machine's (:func:`transferlab.features.cpu.current`).
    """
    if requested != "auto":
        note = (
            "engine: keras does not apply to a TFLite file; it runs as given"
            if requested == "keras"
            else "requested: the file as given"
        )
        return _checked_engine(
            rewrites.engine_name(rewrites.AS_GIVEN), path, {"reason": note}, None, expected=sha256, tensor=tensor
        )
    identity = cpu_identity or cpu.current()
    verdict_path = tflite_verdict_path(conversion_directory, sha256, identity)
    verdict = _tflite_verdict(verdict_path, sha256, identity)
    if verdict is None:
        content = Path(path).read_bytes()
        if cache_files.content_sha256(content) != sha256:
            raise ValueError(f"{path} changed since this run read it (its sha256 is no longer {sha256}); run again")
        LOGGER.info("Measuring how to run %s on this CPU (%s); remembered for later runs", path, identity.description)
        verdict = measure(content, sample_pixels(), tensor=tensor)
        verdict.update(sha256=sha256, cpu=identity.as_dict())
        verdict = cache_files.write_record(verdict_path, verdict)
    return _checked_engine(
        rewrites.engine_name(verdict["rewrite"]),
        path,
        verdict,
        verdict_path,
        expected=verdict["content_sha256"],
        tensor=tensor,
        rewrite=verdict["rewrite"],
        batch=int(verdict.get("batch") or 0),
    )


def tflite_verdict_path(conversion_directory: Path, sha256: str, identity: cpu.CpuIdentity) -> Path:
    """Where the verdict for one TFLite file on one CPU is kept: ``<sha256>-<CPU key>-tflite.json``."""
    return conversion_directory / f"{sha256}-{identity.key}-tflite.json"


def _tflite_verdict(path: Path, sha256: str, identity: cpu.CpuIdentity) -> dict | None:
    """The remembered verdict for the file with this sha256 on this CPU if it is intact, else None."""
    verdict = cache_files.read_record(path, consequence="measuring the rewrites again")
    if verdict is None or verdict.get("version") != TFLITE_VERDICT_VERSION or verdict.get("sha256") != sha256:
        return None  # absent, damaged (warned), or of another format: measure again
    if (verdict.get("cpu") or {}).get("key") != identity.key:
        return None  # measured on another CPU (a file copied by hand): measure here
    if verdict.get("rewrite") not in (rewrites.AS_GIVEN, *rewrites.REWRITES) or not verdict.get("content_sha256"):
        return None
    return verdict


def measure(content: bytes, pixels: np.ndarray, *, tensor: str = "") -> dict:
    """Measures the file and each applicable rewrite on real photos; returns the verdict.

    A rewrite qualifies when it is bit-identical to the file on LiteRT's reference kernels, or
    when its features on XNNPACK are at least as close to the reference kernels' as the noise
    floor (see the module docstring); the fastest of the file and the qualifying rewrites wins
    (near-ties: :func:`_most_faithful_of_the_fastest`), and its engine batch is the fastest of
    :data:`BATCH_CANDIDATES`. ``tensor``: the tapped tensor (``tflite:PATH#TENSOR``), which a
    rewrite must keep.

    Returns:
        ``rewrite`` (the choice, ``""`` for the file as given), ``content_sha256`` (of the
        chosen bytes: the file after that rewrite), ``batch`` and ``images_per_second`` (the
        chosen path's at that batch), ``reason``, and per path: ``images_per_second`` (at
        :data:`SPEED_BATCH`), ``lowest_cosine`` (to the reference kernels), ``exact``,
        ``qualifies``; ``batches`` (images/s of the chosen path per batch); ``noise_floor``;
        ``not_applicable`` (rewrite: why).
    """
    problems = rewrites.candidates(content)
    if tensor and not problems[rewrites.FLOAT32] and tensor in rewrites.float32_dropped_tensors(content):
        problems[rewrites.FLOAT32] = f"it drops the tapped tensor '{tensor}' (a cast between two float tensors)"
    applicable = [rewrite for rewrite, problem in problems.items() if not problem]
    verdict: dict[str, Any] = {
        "version": TFLITE_VERDICT_VERSION,
        "rewrite": rewrites.AS_GIVEN,
        "content_sha256": cache_files.content_sha256(content),
        "batch": 0,
        "not_applicable": {k: v for k, v in problems.items() if v},
    }
    if not applicable:
        verdict["reason"] = (
            "TFLite file runs as given (no rewrite applies: "
            + "; ".join(f"{k}: {v}" for k, v in problems.items())
            + ")"
        )
        return _with_batch(verdict, content, pixels)
    reference = _outputs(content, pixels, delegate=False)
    noisy = np.clip(pixels.astype(np.int16) + np.random.default_rng(NOISE_SEED).integers(-1, 2, pixels.shape), 0, 255)
    floor = _lowest_cosine(_outputs(content, noisy.astype(np.uint8), delegate=False), reference)
    paths = {rewrites.AS_GIVEN: _path_report(content, pixels, reference, floor, exact=True)}
    contents = {rewrites.AS_GIVEN: content}
    for rewrite in applicable:
        try:
            rewritten = rewrites.rewritten_content(content, rewrite)
            exact = bool(np.array_equal(_outputs(rewritten, pixels, delegate=False), reference))
            paths[rewrite] = _path_report(rewritten, pixels, reference, floor, exact=exact)
            contents[rewrite] = rewritten
        except (RuntimeError, ValueError) as error:  # LiteRT refuses the rewritten file: keep the others
            verdict["not_applicable"][rewrite] = f"failed: {error}"[:300]
    speeds = _race({name: (data, SPEED_BATCH) for name, data in contents.items()}, pixels)
    for name, report in paths.items():
        report["images_per_second"] = round(speeds[name], 1)
    chosen = _most_faithful_of_the_fastest(paths)
    verdict.update(
        rewrite=chosen,
        content_sha256=cache_files.content_sha256(contents[chosen]),
        noise_floor=round(floor, 6),
        paths={name or "as_given": report for name, report in paths.items()},
        reason=_reason(chosen, paths, floor),
    )
    return _with_batch(verdict, contents[chosen], pixels)


def _most_faithful_of_the_fastest(paths: dict[str, dict]) -> str:
    """The qualifying path closest to the reference kernels among those within :data:`SPEED_TOLERANCE` of the fastest.

    Paths whose speeds differ by a few percent are tied: which one a race calls faster changes with
    the machine's load from run to run, and each path computes slightly different features, so the
    fastest alone would let timing noise move every figure downstream. Among tied paths the most
    faithful (highest lowest cosine; then the faster) wins, which makes the verdict the same run
    after run; a path faster by more than the tolerance still wins outright.
    """
    qualifying = {name: report for name, report in paths.items() if report["qualifies"]}
    fastest = max(report["images_per_second"] for report in qualifying.values())
    tied = [name for name, report in qualifying.items() if report["images_per_second"] * SPEED_TOLERANCE >= fastest]
    return max(tied, key=lambda name: (qualifying[name]["lowest_cosine"], qualifying[name]["images_per_second"]))


def _with_batch(verdict: dict, content: bytes, pixels: np.ndarray) -> dict:
    """Adds the chosen path's fastest engine batch (``batch``, ``batches``, ``images_per_second``)."""
    batches = _race({batch: (content, batch) for batch in BATCH_CANDIDATES}, pixels)
    batch = max(batches, key=batches.get)
    verdict.update(
        batch=batch,
        images_per_second=round(batches[batch], 1),
        batches={str(size): round(rate, 1) for size, rate in batches.items()},
    )
    verdict["reason"] += f"; batch {batch} (images/s by batch: {verdict['batches']})"
    return verdict


def _path_report(content: bytes, pixels: np.ndarray, reference: np.ndarray, floor: float, *, exact: bool) -> dict:
    cosine = _lowest_cosine(_outputs(content, pixels, delegate=True), reference)
    return {"lowest_cosine": round(cosine, 6), "exact": exact, "qualifies": exact or cosine >= floor}


def _reason(chosen: str, paths: dict, floor: float) -> str:
    described = ", ".join(
        f"{name or 'as given'} {report['images_per_second']} img/s cos {report['lowest_cosine']}"
        + ("" if report["qualifies"] else " (rejected)")
        for name, report in paths.items()
    )
    return (
        f"chose {chosen or 'the file as given'}, the closest to the reference kernels of the paths within "
        f"{SPEED_TOLERANCE - 1:.0%} of the fastest ({described}; noise floor {floor:.6f})"
    )


def _interpreter(content: bytes, batch: int, *, delegate: bool) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(
        model_content=content, num_threads=engines.ENGINE_THREADS, experimental_op_resolver_type=resolver
    )
    if batch:
        detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def _outputs(content: bytes, pixels: np.ndarray, *, delegate: bool) -> np.ndarray:
    interpreter = _interpreter(content, len(pixels), delegate=delegate)
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], _as_input(pixels, detail["dtype"]))
    interpreter.invoke()
    output = interpreter.get_output_details()[0]
    values = interpreter.get_tensor(output["index"]).reshape(len(pixels), -1).astype(np.float64)
    scale, zero_point = output["quantization"]
    return (values - zero_point) * scale if scale else values


def _as_input(pixels: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype == np.int8:  # an int8 image input is the uint8 one shifted by 128 (as engines.TFLiteEngine feeds it)
        return (np.asarray(pixels, dtype=np.int16) - 128).astype(np.int8)
    return np.asarray(pixels).astype(dtype)


def _lowest_cosine(first: np.ndarray, second: np.ndarray) -> float:
    return float(engines.cosine_similarity(first, second).min())


def _race(candidates: dict[Any, tuple[bytes, int]], pixels: np.ndarray) -> dict[Any, float]:
    """Median images/s of each candidate (model bytes, batch) on XNNPACK, invoked in turn.

    Interleaving the invocations, rather than timing one candidate after the other, lets a load
    that comes and goes on a shared machine slow every candidate alike. The photos are repeated
    to fill a batch larger than the sample.
    """
    interpreters = {}
    for name, (content, batch) in candidates.items():
        interpreter = _interpreter(content, batch, delegate=True)
        detail = interpreter.get_input_details()[0]
        filled = np.resize(pixels, (batch, *pixels.shape[1:]))
        interpreter.set_tensor(detail["index"], _as_input(filled, detail["dtype"]))
        interpreter.invoke()  # the first call packs XNNPACK's weights
        interpreters[name] = (interpreter, batch)
    rates: dict[Any, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    while min(map(len, rates.values())) < 3 or (
        time.perf_counter() - started < SPEED_SECONDS * len(candidates)
        and min(map(len, rates.values())) < SPEED_SAMPLES
    ):
        for name, (interpreter, batch) in interpreters.items():
            begin = time.perf_counter()
            interpreter.invoke()
            rates[name].append(batch / (time.perf_counter() - begin))
    return {name: float(np.median(values)) for name, values in rates.items()}
