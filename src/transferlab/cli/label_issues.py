"""`transferlab label-issues`: images whose label looks wrong, from the cached embeddings (cleanlab).

Reads data/features/{train,val,test}.npz and the trained head (models/head), writes
metrics/label_issues.csv (most suspicious first) and a gallery PNG. A command, not part of the
evaluate stage: cross-validation and cleanlab's import cost a few seconds that every experiment
of a comparison would otherwise pay. Confirmed errors go into params.yaml ``split.exclude``. The
library is :mod:`transferlab.reports.label_issues`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab import heads
from transferlab.core import params as params_module
from transferlab.data import tables
from transferlab.features import files
from transferlab.heads import base
from transferlab.reports import label_issues


def configure(parser) -> None:
    parser.add_argument("--features", type=Path, default=Path("data/features"), help="the features folder")
    parser.add_argument("--model", type=Path, default=Path("models/head"), help="the trained head")
    parser.add_argument(
        "--taps", type=Path, default=Path("data/taps"), help="the taps folder (read when it holds a taps.json)"
    )
    parser.add_argument("--images", type=Path, default=Path("data/raw/images"), help="the images folder")
    parser.add_argument("--out", type=Path, default=Path("metrics/label_issues.csv"), help="the CSV to write")
    parser.add_argument(
        "--gallery", type=Path, default=Path("metrics/label_issues.png"), help="the gallery PNG to write"
    )
    parser.add_argument("--gallery-images", type=int, default=16, help="most suspicious images drawn (default 16)")
    parser.add_argument("--folds", type=int, default=label_issues.FOLDS, help="cross-validation folds (default 5)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    raw = params_module.read_params_file(args.params)
    seed = params_module.parse_section("base", raw.get("base")).seed
    limit = params_module.parse_section("download", raw.get("download")).max_image_pixels
    if not 2 <= args.folds <= 50 or not 1 <= args.gallery_images <= 256:
        raise ValueError("--folds must be 2..50 and --gallery-images 1..256")
    splits = files.load_splits(
        args.features,
        ("train", "val", "test"),
        images_directory=args.images,
        max_image_pixels=limit,
        taps_directory=args.taps if (args.taps / "taps.json").is_file() else None,
    )
    head = heads.load_head(args.model)
    head.description.check_features(splits["test"])
    settings = head.description.settings or {}
    pool = label_issues.out_of_sample_pool(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        test_probabilities=base.predict_split(head, splits["test"]),
        c=float(settings.get("c", 1.0)),  # the logistic head's chosen C; other heads: scikit-learn's default
        seed=seed,
        folds=args.folds,
        max_iter=int(settings.get("max_iter", 1000)),
    )
    issues = label_issues.find_issues(pool)
    tables.write_label_issues([vars(issue) for issue in issues], args.out)
    label_issues.render(
        issues,
        images_directory=args.images,
        path=args.gallery,
        images=args.gallery_images,
        examined=len(pool.labels),
        max_image_pixels=limit,
    )
    print(
        f"{len(issues)} suspected label errors among {len(pool.labels)} images "
        "(train and val cross-validated, test by the head)"
    )
    for issue in issues[:10]:
        print(
            f"{issue.rank:>3}. {issue.path}: filed as {issue.given_label}, looks like {issue.suggested_label} "
            f"(score {issue.score:.3f}, {issue.split}, sha256 {issue.sha256[:12]})"
        )
    print(f"\nwritten: {args.out}, {args.gallery}; exclude the confirmed ones with params.yaml split.exclude")
    return 0
