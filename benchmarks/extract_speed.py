"""End-to-end feature extraction speed: decode + resize + infer, every engine side by side.

Embeds every image of a dataset folder (default: the flower_photos mirror, extracted to a
temporary folder) with one backbone, each variant in its own process so peak memory is its own:

- ``keras-predict``: the tutorial path: Pillow on one thread, ``model.predict`` per batch;
- ``keras``: transferlab's pipeline with the Keras engine (traced call, threaded decoding);
- ``tflite``: transferlab's pipeline with the converted LiteRT engine, cold cache;
- ``tflite-converted``: the same with the converted model already on disk (it is converted once
  per backbone, weights and size) but no embeddings: a new dataset's first run;
- ``tflite-warm``: the same run again, served from the embedding cache.

Run it alone on an otherwise idle machine (timings are noisy on 2 cores)::

    python benchmarks/extract_speed.py --weights ../shared/weights/mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5

Prints one line per variant: images, seconds, images/s, peak RSS, and the ratio to keras-predict.

With ``--stack`` (default members: the three shared TFLite extractors) it measures a stack against
the sum of its members instead, side by side in one run: decoding alone (``decode``), each member
alone with a cold cache (its engine choice measured on this CPU, reported with its engine-only
seconds), then the stack cold (verdicts already known, embeddings not), and prints the gap between
the stack's time and the members' engine-only seconds plus one decode::

    python benchmarks/extract_speed.py --stack [--stack-specs tflite:A.tflite,tflite:B.tflite] [--limit 600]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPOSITORY.parent / "shared" / "data" / "flower_photos.tgz"
VARIANTS = ("keras-predict", "keras", "tflite", "tflite-converted", "tflite-warm")
SHARED_EXTRACTORS = sorted((REPOSITORY.parent / "shared" / "weights").glob("*_features.tflite"))


def list_images(folder: Path, limit: int) -> list[dict]:
    """Rows (path, label, sha256, recipe) for every JPEG under the class folders of ``folder``."""
    from transferlab.data import images

    rows = []
    for path in sorted(folder.glob("*/*.jpg"))[: limit or None]:
        rows.append(
            {
                "path": str(path.relative_to(folder)),
                "label": path.parent.name,
                "sha256": images.sha256_file(path),
                "recipe": "",
            }
        )
    return rows


def run_variant(variant: str, folder: Path, rows: list[dict], arguments) -> dict:
    """Runs one variant in this process and returns its figures."""
    started = time.perf_counter()
    members = {}
    if variant == "keras-predict":
        count = _keras_predict(folder, rows, arguments)
    elif variant == "decode":
        count = _decode_only(folder, rows, arguments)
    elif variant.startswith(("member-", "stack")):
        count, members = _stack_part(variant, folder, rows, arguments)
    else:
        count = _pipeline(variant, folder, rows, arguments)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "variant": variant,
        "images": count,
        "seconds": seconds,
        "images_per_second": count / seconds,
        "peak_rss_gib": peak,
        "members": members,
    }


def _decode_only(folder: Path, rows: list[dict], arguments) -> int:
    """Decodes and resizes every image as extraction does (same threads and batches), embedding nothing."""
    from transferlab.core import params
    from transferlab.features import decode

    items = [decode.Item(row["sha256"], row["recipe"], row["path"]) for row in rows]
    limit = params.DownloadParams().max_image_pixels

    def render(item):
        return decode.render(item, images_directory=folder, size=arguments.size, max_image_pixels=limit)

    for _ in decode.pixel_batches(items, render_one=render, batch_size=arguments.batch_size, threads=arguments.threads):
        pass
    return len(rows)


def _stack_part(variant: str, folder: Path, rows: list[dict], arguments) -> tuple[int, dict]:
    """One member (``member-<i>``) or the whole stack, through the library; returns per-member figures."""
    from transferlab.backbones import stack
    from transferlab.core import params
    from transferlab.features import extract_features

    specs = arguments.stack_specs.split(",")
    chosen = specs if variant == "stack" else [specs[int(variant.removeprefix("member-"))]]
    settings = params.parse_section(
        "extract_features",
        {"backbone": chosen if len(chosen) > 1 else chosen[0], "batch_size": arguments.batch_size},
    )
    _, report = extract_features.extract_features(
        members=stack.resolve_members(settings, seed=0),
        rows_by_split={"train": rows},
        images_directory=folder,
        cache_directory=Path(arguments.cache),
        engine="auto",
        batch_size=arguments.batch_size,
        threads=arguments.threads,
        seed=0,
        max_image_pixels=params.DownloadParams().max_image_pixels,
    )
    members = {
        name: {
            "engine": member["engine"],
            "batch": (member.get("engine_choice") or {}).get("batch"),
            "engine_seconds": member["engine_seconds"],
        }
        for name, member in report["backbones"].items()
    }
    return len(rows), members


def _keras_predict(folder: Path, rows: list[dict], arguments) -> int:
    import numpy as np
    from PIL import Image, ImageOps

    from transferlab.backbones import registry

    model = registry.build(
        registry.get(arguments.backbone), weights=arguments.weights, image_size=arguments.size, alpha=arguments.alpha
    )
    for start in range(0, len(rows), arguments.batch_size):
        batch = []
        for row in rows[start : start + arguments.batch_size]:
            image = ImageOps.exif_transpose(Image.open(folder / row["path"])).convert("RGB")
            batch.append(np.asarray(image.resize((arguments.size, arguments.size), Image.BILINEAR), dtype=np.float32))
        model.predict(np.stack(batch), verbose=0)
    return len(rows)


def _pipeline(variant: str, folder: Path, rows: list[dict], arguments) -> int:
    from transferlab.backbones import stack
    from transferlab.core import params
    from transferlab.features import extract_features

    settings = params.parse_section(
        "extract_features",
        {
            "backbone": arguments.backbone,
            "weights": arguments.weights,
            "alpha": arguments.alpha,
            "image_size": arguments.size,
            "batch_size": arguments.batch_size,
        },
    )
    members = stack.resolve_members(settings, seed=0)
    _, report = extract_features.extract_features(
        members=members,
        rows_by_split={"train": rows},
        images_directory=folder,
        cache_directory=Path(arguments.cache),
        engine=variant.removesuffix("-warm").removesuffix("-converted"),
        batch_size=arguments.batch_size,
        threads=arguments.threads,
        seed=0,
        max_image_pixels=params.DownloadParams().max_image_pixels,
    )
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument(
        "--folder", type=Path, help="an extracted dataset folder (class sub-folders) instead of --archive"
    )
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument(
        "--weights",
        default=str(REPOSITORY.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"),
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--stack", action="store_true", help="the stack against the sum of its members")
    parser.add_argument(
        "--stack-specs",
        default=",".join(f"tflite:{path}" for path in SHARED_EXTRACTORS),
        help="the stack's backbone specs, comma-separated (default: the shared TFLite extractors)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        rows = json.loads(Path(arguments.rows).read_text())
        print(json.dumps(run_variant(arguments.child, arguments.folder, rows, arguments)))
        return
    with tempfile.TemporaryDirectory(prefix="transferlab-bench-") as scratch:
        scratch = Path(scratch)
        folder = arguments.folder or _extract(arguments.archive, scratch)
        rows = list_images(folder, arguments.limit)
        (scratch / "rows.json").write_text(json.dumps(rows))
        results = []
        members = len(arguments.stack_specs.split(","))
        variants = (
            ["decode", *(f"member-{index}" for index in range(members)), "stack"]
            if arguments.stack
            else arguments.variants.split(",")
        )
        for variant in variants:
            # A fresh cache for the cold runs; the warm run reuses the tflite run's cache.
            cache = scratch / ("cache-tflite" if variant in ("tflite", "tflite-warm") else f"cache-{variant}")
            if variant == "tflite-converted":  # only the converted model, from the cold run
                shutil.copytree(scratch / "cache-tflite" / "converted", cache / "converted")
            if variant == "stack":  # the members' verdicts, measured in their own runs; no embeddings
                for index in range(members):
                    shutil.copytree(
                        scratch / f"cache-member-{index}" / "converted", cache / "converted", dirs_exist_ok=True
                    )
            command = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--folder",
                str(folder),
                "--rows",
                str(scratch / "rows.json"),
                "--cache",
                str(cache),
            ]
            command += [
                "--backbone",
                arguments.backbone,
                "--alpha",
                str(arguments.alpha),
                "--weights",
                arguments.weights,
            ]
            command += [
                "--size",
                str(arguments.size),
                "--batch-size",
                str(arguments.batch_size),
                "--threads",
                str(arguments.threads),
                "--stack-specs",
                arguments.stack_specs,
            ]
            output = subprocess.run(
                command, check=True, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            ).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            _print(results)
        if arguments.stack:
            _print_stack(results)


def _print_stack(results: list[dict]) -> None:
    """The stack against its members: engine and engine-only seconds each, the sum plus one decode, the gap."""
    from transferlab.features import cpu

    by_variant = {result["variant"]: result for result in results}
    decode_seconds = by_variant["decode"]["seconds"]
    print(f"\nCPU: {cpu.current().description}")
    print(f"{'member':<48} {'engine':>15} {'batch':>5} {'engine s':>9} {'alone s':>8} {'in stack s':>10}")
    engine_total = 0.0
    stack_members = by_variant["stack"]["members"]
    for result in results:
        for name, member in result["members"].items() if result["variant"].startswith("member-") else ():
            engine_total += member["engine_seconds"]
            print(
                f"{name[-48:]:<48} {member['engine']:>15} {member['batch'] or '-':>5} {member['engine_seconds']:>9.1f} "
                f"{result['seconds']:>8.1f} {stack_members.get(name, {}).get('engine_seconds', 0):>10.1f}"
            )
    floor = engine_total + decode_seconds
    stack_seconds = by_variant["stack"]["seconds"]
    in_stack = sum(member["engine_seconds"] for member in stack_members.values())
    print(f"decode alone: {decode_seconds:.1f} s; members' engine-only sum + one decode: {floor:.1f} s")
    print(f"engine seconds inside the stack: {in_stack:.1f} s (alone: {engine_total:.1f} s)")
    print(
        f"stack cold (verdicts known): {stack_seconds:.1f} s; gap {stack_seconds - floor:+.1f} s "
        f"({100 * (stack_seconds - floor) / floor:+.0f}%)"
    )
    sys.stdout.flush()


def _extract(archive: Path, scratch: Path) -> Path:
    with tarfile.open(archive) as handle:
        handle.extractall(scratch / "data", filter="data")
    return next(path for path in (scratch / "data").iterdir() if path.is_dir())


def _print(results: list[dict]) -> None:
    baseline = results[0]["images_per_second"]
    print(f"\n{'variant':<14} {'images':>6} {'seconds':>8} {'images/s':>9} {'peak RSS GiB':>12} {'vs first':>8}")
    for result in results:
        print(
            f"{result['variant']:<14} {result['images']:>6} {result['seconds']:>8.1f} "
            f"{result['images_per_second']:>9.1f} "
            f"{result['peak_rss_gib']:>12.2f} {result['images_per_second'] / baseline:>7.2f}x"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
