"""``transferlab predict``: classify image files or folders with the exported model (models/export).

Each file is decoded and resized exactly as the pipeline does it, with the image size limit the
model was trained with (``download.max_image_pixels``, recorded in the manifest). A file that is not a readable
image, or not a regular file (a FIFO is never opened: reading it would block), gets one line on stderr and the
others go on; the exit code is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from transferlab.export import predict

PROGRESS_FROM = 20  # a progress bar (on stderr) from this many files on


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds this command's options."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders (searched recursively)")
    parser.add_argument(
        "--model",
        default=str(predict.DEFAULT_MODEL_FOLDER),
        metavar="DIR",
        help="the export stage's folder (default: %(default)s)",
    )
    parser.add_argument(
        "--top", type=int, default=1, metavar="K", help="classes shown per image (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    parser.add_argument(
        "--format",
        choices=predict.FORMATS,
        default="auto",
        help="auto (TFLite when exported, else Keras), keras (model.keras) or tflite (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images decoded and run together (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    """Classifies every file; returns 0, or 1 when any file failed."""
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    files, missing = predict.collect_files(args.paths)
    model = predict.load(args.model, format=args.format)
    with tqdm(total=len(files), unit="image", file=sys.stderr, disable=len(files) < PROGRESS_FROM) as bar:
        results = predict.classify_files(
            model,
            files,
            top=args.top,
            batch_size=args.batch_size,
            max_image_pixels=model.max_image_pixels,
            progress=bar.update,
        )
    results = missing + results
    failed = [result for result in results if result.error]
    for result in failed:
        print(f"transferlab predict: {result.path}: {result.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([result.to_json() for result in results], indent=2))
    else:
        for result in results:
            if not result.error:
                print(f"{result.path}: " + ", ".join(f"{name} {confidence:.3f}" for name, confidence in result.top))
    if not results:
        print("transferlab predict: no files found in the given folder(s)", file=sys.stderr)
    if failed:
        print(f"transferlab predict: {len(failed)} of {len(results)} file(s) could not be classified", file=sys.stderr)
    return 1 if failed or not results else 0
