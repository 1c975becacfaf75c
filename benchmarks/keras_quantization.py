"""Float32 against dynamic-range quantized TFLite for a Keras backbone: conversion time, engine speed, agreement.

Issue 15 asks for a cold MobileNetV2 extraction >= 4x the tutorial path. The float32 engine is what
``engine: auto`` converts a Keras backbone to; this script measures, side by side in one process,
whether LiteRT's dynamic-range quantization (``Optimize.DEFAULT``: int8 weights, activations
quantized per call, no calibration) would be a faster engine on this CPU, and how far it moves the
features (cosine to Keras on real photos; the conversion check asks >= 0.9999).

Usage::

    python benchmarks/keras_quantization.py   # MobileNetV2, the mirror's weights, 32 mirror photos

Prints the CPU, then per variant: conversion seconds, model bytes, and per batch size (1, 8, 32) the
engine's images/s on 2 threads and the lowest cosine to Keras.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared"


def photos(archive: Path, count: int, size: int) -> np.ndarray:
    """``count`` photos of the archive (every other JPEG, in name order), resized to ``size``, float32 0..255."""
    pixels = []
    with tarfile.open(archive) as handle:
        members = sorted((m for m in handle.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        for member in members[: 2 * count : 2]:
            image = Image.open(handle.extractfile(member)).convert("RGB").resize((size, size), Image.BILINEAR)
            pixels.append(np.asarray(image, dtype=np.float32))
    return np.stack(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5")
    )
    parser.add_argument("--archive", type=Path, default=SHARED / "data" / "flower_photos.tgz")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per variant and batch size")
    arguments = parser.parse_args()

    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from transferlab.backbones import registry
    from transferlab.features import cpu, engines

    model = registry.build(registry.get(arguments.backbone), weights=arguments.weights, image_size=arguments.size)
    pixels = photos(arguments.archive, arguments.images, arguments.size)
    reference = model.predict(pixels, verbose=0).reshape(len(pixels), -1)
    frozen = engines._frozen_call(model)
    print(f"CPU: {cpu.current().description}")
    print(f"{'variant':10} {'convert s':>9} {'MB':>6} {'batch':>5} {'images/s':>9} {'min cosine':>11}")
    for variant in ("float32", "dynamic"):
        started = time.perf_counter()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], model)
        if variant == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        with contextlib.redirect_stdout(io.StringIO()):
            content = converter.convert()
        convert_seconds = time.perf_counter() - started
        for batch in (1, 8, 32):
            interpreter = Interpreter(model_content=content, num_threads=2)
            source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            interpreter.resize_tensor_input(source["index"], [batch, *pixels.shape[1:]])
            interpreter.allocate_tensors()
            outputs = []
            for start in range(0, len(pixels) - batch + 1, batch):
                interpreter.set_tensor(source["index"], pixels[start : start + batch])
                interpreter.invoke()
                outputs.append(interpreter.get_tensor(target["index"]).reshape(batch, -1))
            features = np.concatenate(outputs)
            cosine = engines.cosine_similarity(features, reference[: len(features)]).min()
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < arguments.seconds:
                interpreter.set_tensor(source["index"], pixels[:batch])
                interpreter.invoke()
                count += batch
            rate = count / (time.perf_counter() - started)
            print(
                f"{variant:10} {convert_seconds:9.1f} {len(content) / 1e6:6.1f} {batch:5d} {rate:9.1f} {cosine:11.6f}"
            )


if __name__ == "__main__":
    main()
