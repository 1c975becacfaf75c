"""Engine speed of TFLite feature extractors: batch sizes, threads, with and without XNNPACK.

For each file (default: the three shared extractors), runs LiteRT on random uint8 images and
prints images/s side by side, so the best batch size per model can be chosen by measurement
(ARCHITECTURE.md: depthwise networks run faster at small batches on 2 cores). Each rewrite of
transferlab.tflite.rewrites that applies to a file (``static-shapes`` for a file whose tensors
lack shapes, ``int8`` for a uint8 model, ``float32`` for any quantized model) is run on XNNPACK too.

Then it prints the CPU's identity and flags (verdicts hold for one CPU only) and, per file, what
``engine: auto`` chooses on this machine (transferlab.features.engine_choice.measure on real
flower photos from the mirror): the chosen path and batch, each candidate's images/s and lowest
cosine to LiteRT's reference kernels, against the noise floor::

    python benchmarks/tflite_backbones.py [FILE.tflite ...] [--batches 1,8,32] [--seconds 3] [--no-choice]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "weights"
DEFAULT_FILES = sorted(SHARED.glob("*_features.tflite"))
ARCHIVE = SHARED.parent / "data" / "flower_photos.tgz"


def images_per_second(
    path: Path, *, batch: int, threads: int, xnnpack: bool, seconds: float, rewrite: str = ""
) -> float:
    """Median images/s of repeated invocations (after one warm-up) within about ``seconds``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from transferlab.tflite import rewrites

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    source = (
        {"model_content": rewrites.rewritten_content(path.read_bytes(), rewrite)}
        if rewrite
        else {"model_path": str(path)}
    )
    interpreter = Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    pixels = (
        np.random.default_rng(0).integers(0, 256, (batch, *detail["shape"][1:]), dtype=np.uint8).astype(detail["dtype"])
    )
    interpreter.set_tensor(detail["index"], pixels)
    interpreter.invoke()
    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds or len(rates) < 3:
        begin = time.perf_counter()
        interpreter.invoke()
        rates.append(batch / (time.perf_counter() - begin))
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, default=DEFAULT_FILES)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-plain", action="store_true", help="skip the runs without XNNPACK")
    parser.add_argument("--no-table", action="store_true", help="skip the batch x path table")
    parser.add_argument("--no-choice", action="store_true", help="skip what engine: auto chooses")
    arguments = parser.parse_args()
    from transferlab.features import cpu

    print(f"CPU: {cpu.current().description} (key {cpu.current().key})")
    if not arguments.no_table:
        print_table(arguments)
    if not arguments.no_choice:
        print_choices(arguments.files)


def print_table(arguments) -> None:
    """Images/s per file, thread count and path (as given, without XNNPACK, each rewrite) by batch."""
    batches = [int(value) for value in arguments.batches.split(",")]
    print(
        f"{'model':<48} {'threads':>7} {'path':>13} "
        + " ".join(f"{'b=' + str(b):>8}" for b in batches)
        + "   (images/s, median)"
    )
    from transferlab.tflite import rewrites

    for path in arguments.files:
        variants = [(True, "")] + ([] if arguments.no_plain else [(False, "")])
        variants += [
            (True, rewrite) for rewrite, problem in rewrites.candidates(path.read_bytes()).items() if not problem
        ]
        for threads in [int(value) for value in arguments.threads.split(",")]:
            for xnnpack, rewrite in variants:
                rates = [
                    images_per_second(
                        path, batch=b, threads=threads, xnnpack=xnnpack, seconds=arguments.seconds, rewrite=rewrite
                    )
                    for b in batches
                ]
                label = rewrite or ("xnnpack" if xnnpack else "builtin")
                print(
                    f"{path.stem:<48} {threads:>7} {label:>13} " + " ".join(f"{rate:8.1f}" for rate in rates),
                    flush=True,
                )


def flower_photos(count: int, size: int) -> np.ndarray:
    """The first ``count`` photos of the flower_photos mirror, rendered as the pipeline renders them."""
    import io
    import tarfile

    from PIL import Image

    from transferlab.data import augment

    photos = []
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg") and len(photos) < count:
                image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
                photos.append(augment.render_view(image, "", size))
    return np.stack(photos)


def print_choices(files: list[Path]) -> None:
    """What ``engine: auto`` chooses for each file on this CPU, and every candidate's figures."""
    from transferlab.features import engine_choice

    photos = flower_photos(engine_choice.VERIFICATION_IMAGES, 224)
    print(f"\n{'model':<42} {'chosen':>13} {'batch':>5} {'img/s':>7}   candidates at batch {engine_choice.SPEED_BATCH}")
    for path in files:
        verdict = engine_choice.measure(path.read_bytes(), photos)
        candidates = ", ".join(
            f"{name} {report['images_per_second']} (cos {report['lowest_cosine']:.4f}"
            + ("" if report["qualifies"] else ", rejected")
            + ")"
            for name, report in verdict.get("paths", {}).items()
        )
        print(
            f"{path.stem:<42} {verdict['rewrite'] or 'as given':>13} {verdict['batch']:>5} "
            f"{verdict.get('images_per_second', 0):>7.1f}   {candidates}; noise floor {verdict.get('noise_floor')}",
            flush=True,
        )


if __name__ == "__main__":
    main()
