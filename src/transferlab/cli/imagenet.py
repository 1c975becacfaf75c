"""``transferlab imagenet``: the course's first example, a pretrained ImageNet classifier on photos.

The ``keras.applications`` model *with* its 1000-class top, its ``preprocess_input``, and the
class names of ``decode_predictions``. Each photo is centre-cropped to a square and resized
bilinearly (Pillow) to the model's input size (224 for the MobileNets), as in
``../shared/weights/MANIFEST.md``.

Offline use: ``--weights`` takes a local weights file *with* the top (``weights="imagenet"``
downloads Keras' official file), and ``--class-index`` a local ``imagenet_class_index.json``.
Keras' ``decode_predictions`` can only find that file in ``$KERAS_HOME/models`` (read once, when
Keras is imported) or download it, so with ``--class-index`` the file is read and checked here
(1000 classes, each ``[wordnet id, name]``) and decoded the way ``decode_predictions`` decodes:
the ``top`` highest scores, highest first, as ``(wordnet id, name, score)``. Without it,
``decode_predictions`` itself runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.backbones import registry
from transferlab.core import params
from transferlab.export import predict

DEFAULT_BACKBONE = "mobilenet_v2"
IMAGENET_CLASSES = 1000
TOP_LAYER = "predictions"  # the name keras.applications gives the classifier's last layer
SHARED_HINT = "e.g. ../shared/weights/mobilenet_v2_1.0_224_imagenet_dequant.h5 or mobilenet_v1_0.25_224_imagenet.h5"
BATCH = 16


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds this command's options."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="photos, or folders (searched recursively)")
    parser.add_argument(
        "--backbone", default=DEFAULT_BACKBONE, help="registry name (`transferlab backbones`; default: %(default)s)"
    )
    parser.add_argument("--alpha", type=float, default=None, help="width multiplier for the MobileNets (default 1.0)")
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="PATH|imagenet",
        help=f"weights WITH the 1000-class top: a local file ({SHARED_HINT}) or imagenet (download)",
    )
    parser.add_argument(
        "--class-index",
        type=Path,
        default=None,
        metavar="PATH",
        help="a local imagenet_class_index.json (default: Keras' own, downloaded once)",
    )
    parser.add_argument("--top", type=int, default=5, metavar="K", help="classes per photo (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=params.DownloadParams().max_image_pixels,
        metavar="N",
        help="larger images are refused as decompression bombs (default: params' "
        "download.max_image_pixels default, %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Classifies every photo into the ImageNet classes; returns 0, or 1 when any file failed."""
    if not 1 <= args.top <= IMAGENET_CLASSES:
        raise ValueError(f"--top must be between 1 and {IMAGENET_CLASSES}, got {args.top}")
    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be at least 1, got {args.max_image_pixels}")
    entry = registry.get(args.backbone)
    alpha = registry.check_alpha(entry, args.alpha)
    class_index = read_class_index(args.class_index) if args.class_index is not None else None
    weights = check_top_weights(args.weights)
    files, missing = predict.collect_files(args.paths)
    results: list[dict[str, Any]] = [result.to_json() for result in missing]
    model = build_classifier(entry, alpha=alpha, weights=weights)
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        results.extend(
            classify(model, entry, chunk, top=args.top, class_index=class_index, max_image_pixels=args.max_image_pixels)
        )
    return report(results, as_json=args.json)


def read_class_index(path: Path) -> dict[str, tuple[str, str]]:
    """Reads and checks an ImageNet class index: ``{"0": [wordnet id, name], ..., "999": [...]}``.

    Raises:
        ValueError: missing file, not JSON, or not exactly the 1000 classes as ``[id, name]`` pairs.
    """
    if not path.is_file():
        raise ValueError(f"class index not found: {path}; give imagenet_class_index.json (../shared/weights has it)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); give Keras' imagenet_class_index.json") from None
    expected = {str(index) for index in range(IMAGENET_CLASSES)}
    if not isinstance(content, dict) or set(content) != expected:
        raise ValueError(
            f'{path} must map the {IMAGENET_CLASSES} class numbers "0".."999" to [wordnet id, name]; '
            "give Keras' imagenet_class_index.json"
        )
    bad = [
        key
        for key, value in content.items()
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value))
    ]
    if bad:
        raise ValueError(
            f"{path}: class {sorted(bad, key=int)[0]} is not a [wordnet id, name] pair; "
            "give Keras' imagenet_class_index.json"
        )
    return {key: (value[0], value[1]) for key, value in content.items()}


def check_top_weights(weights: str) -> str:
    """``imagenet``, or the resolved path of a local weights file that holds the classifier top.

    Raises:
        ValueError: the file is missing, or a legacy Keras HDF5 file without the ``predictions`` layer.
    """
    if weights.strip().lower() == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"weights file not found: {path}; give a local file with the 1000-class top ({SHARED_HINT}) or imagenet"
        )
    layers = _hdf5_layer_names(path)
    if layers is not None and TOP_LAYER not in layers:
        raise ValueError(
            f"{path} holds no 1000-class top (its last layers are {', '.join(layers[-3:])}): it is a no-top "
            f"feature-extractor file. Give the file with the top ({SHARED_HINT})"
        )
    return str(path)


def _hdf5_layer_names(path: Path) -> list[str] | None:
    # Keras-2 style weights files (the official and the shared ones) list their layers in an attribute.
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            names = handle.attrs.get("layer_names")
            return None if names is None else [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except OSError:
        return None  # not HDF5 (a .keras archive, say): let Keras judge it


def build_classifier(entry: registry.Backbone, *, alpha: float | None, weights: str) -> Any:
    """``keras.applications.<constructor>(include_top=True)`` at its default size, with ``weights``."""
    import keras

    arguments = {"include_top": True, "weights": weights, "input_shape": (entry.default_size, entry.default_size, 3)}
    if alpha is not None:
        arguments["alpha"] = alpha
    try:
        model = getattr(keras.applications, entry.constructor)(**arguments)
    except Exception as error:  # noqa: BLE001 - Keras raises bare Exception for failed downloads
        if weights == "imagenet":
            raise ValueError(
                f"could not get Keras' ImageNet weights for {entry.constructor} ({error}); "
                "offline, pass --weights with "
                f"a local file with the top ({SHARED_HINT})"
            ) from error
        raise ValueError(
            f"could not load {weights} into {entry.constructor}(alpha={alpha}, include_top=True): {error}. It must be "
            "the weights WITH the top of this backbone and alpha"
        ) from error
    if tuple(model.output_shape) != (None, IMAGENET_CLASSES):
        raise ValueError(f"{entry.constructor} gives {model.output_shape}, not the {IMAGENET_CLASSES} ImageNet classes")
    return model


def centre_square(picture: Image.Image, size: int) -> np.ndarray:
    """The largest centred square, resized bilinearly to ``size``: float32 (size, size, 3), 0..255."""
    width, height = picture.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = picture.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.float32)


def classify(
    model: Any,
    entry: registry.Backbone,
    files: Sequence[Path],
    *,
    top: int,
    class_index: dict[str, tuple[str, str]] | None,
    max_image_pixels: int,
) -> list[dict[str, Any]]:
    """Runs the classifier on the files: per file ``{"path", "predictions": [{"class", "wnid", "confidence"}]}``,
    or ``{"path", "error"}`` for a file that is not a readable image."""
    import keras

    opened = [predict.open_image(path, max_image_pixels=max_image_pixels) for path in files]
    good = [centre_square(picture, entry.default_size) for picture, _ in opened if picture is not None]
    decoded: list = []
    if good:
        module = getattr(keras.applications, entry.preprocess_module)
        probabilities = np.asarray(model(module.preprocess_input(np.stack(good)), training=False))
        decoded = decode(probabilities, top=top, class_index=class_index, keras_decode=module.decode_predictions)
    rows = iter(decoded)
    return [
        {"path": str(path), "error": error}
        if picture is None
        else {
            "path": str(path),
            "predictions": [
                {"class": name, "wnid": wnid, "confidence": round(float(score), 6)} for wnid, name, score in next(rows)
            ],
        }
        for path, (picture, error) in zip(files, opened)
    ]


def decode(
    probabilities: np.ndarray, *, top: int, class_index: dict[str, tuple[str, str]] | None, keras_decode: Any
) -> list:
    """``(wordnet id, name, score)`` of the ``top`` classes per row, highest first.

    With ``class_index`` the given file names the classes, exactly as ``decode_predictions``
    would; without it ``keras_decode`` (``decode_predictions``) runs.
    """
    if class_index is None:
        try:
            return keras_decode(probabilities, top=top)
        except Exception as error:  # noqa: BLE001 - a failed download surfaces as many types
            raise ValueError(
                f"decode_predictions could not get imagenet_class_index.json ({error}); "
                "offline, pass --class-index PATH "
                "(../shared/weights/imagenet_class_index.json)"
            ) from error
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    return [[(*class_index[str(i)], float(row[i])) for i in indices] for row, indices in zip(probabilities, order)]


def report(results: Sequence[dict[str, Any]], *, as_json: bool) -> int:
    """Prints the results (lines or JSON) and the failures (stderr); returns the exit code."""
    failed = [result for result in results if "error" in result]
    for result in failed:
        print(f"transferlab imagenet: {result['path']}: {result['error']}", file=sys.stderr)
    if as_json:
        print(json.dumps(list(results), indent=2))
    else:
        for result in results:
            if "error" not in result:
                print(result["path"])
                for rank, item in enumerate(result["predictions"], start=1):
                    print(f"  {rank}. {item['class']} {item['confidence']:.3f} ({item['wnid']})")
    if not results:
        print("transferlab imagenet: no files found", file=sys.stderr)
    return 1 if failed or not results else 0
