"""Shared embedding cache benchmark: extract_features cold, remote-warm and local-warm, on flower_photos.

Prepares a workspace (download -> split -> augment with the stage scripts, as dvc.yaml runs
them; see benchmarks/scale.py) on the flower_photos mirror, then runs the extract_features stage
script three times against one shared cache (``$TRANSFERLAB_CACHE_REMOTE``):

- cold: an empty local cache and an empty bucket: embeds everything (and converts the backbone
  on ``engine: auto``), then pushes the rows and the conversion;
- remote-warm: another empty local cache (a teammate, a CI runner): fetches everything;
- local-warm: that cache again: no request at all.

``--baseline`` adds a cold run without the shared cache (what pushing costs). The S3 server is
the one the AWS environment names (``AWS_ENDPOINT_URL`` ...; ``scripts/local_s3.sh`` starts
one), else a SeaweedFS started here with the tests' ``tests/s3_server.py``. MobileNetV2 with the
mirror's dequantized ImageNet weights at 224 px, ``engine: auto``. Run it on an otherwise idle
machine: on a shared one, every figure is pessimistic.

Usage::

    python benchmarks/shared_cache.py --flowers ../shared/data/flower_photos.tgz --work /tmp/shared-cache
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path

import scale  # benchmarks/scale.py: the stage commands, params and runner

ROOT = scale.ROOT
FLOWERS_SHA256 = "d34b7d1e28f0955715bfd860975c5e30131e7806d227ac6bb49f1ce40be89215"
BACKBONE = {
    "backbone": "mobilenet_v2",
    "alpha": 1.0,
    "weights": str(scale.SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"),
    "image_size": 224,
    "engine": "auto",
    "cache_dir": "",  # from $TRANSFERLAB_CACHE_DIR: one folder per run below
}


@contextlib.contextmanager
def s3_endpoint(work: Path):
    """The AWS environment of the server to use: the caller's, else a SeaweedFS started (and stopped) here."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield {}
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import s3_server

    with s3_server.S3Server(work / "seaweedfs") as server:
        yield server.env()


def make_bucket(environment: dict) -> str:
    os.environ.update(environment)
    from transferlab.features import cache_remote

    bucket = f"shared-cache-{secrets.token_hex(4)}"
    cache_remote.filesystem().mkdir(bucket)
    return bucket


def extract(workspace: Path, cache: Path, remote: str, environment: dict, label: str) -> dict:
    """One extract_features run with its own local cache folder; returns the figures for the table."""
    os.environ.update(environment, TRANSFERLAB_CACHE_DIR=str(cache), TRANSFERLAB_CACHE_REMOTE=remote)
    figures = scale.run_stage(scale.stage_commands()["extract_features"], workspace, workspace / "stages.log")
    report = scale.read_json(workspace / "metrics" / "extract_features.json")
    shared = report["cache_remote"]
    return {
        "run": label,
        "seconds": round(figures["seconds"], 1),
        "embedded": report["embedded"],
        "local hits": report["local_hits"],
        "remote hits": report["remote_hits"],
        "pushed": report["pushed"],
        "MB fetched": round(shared["bytes_fetched"] / 1e6, 1),
        "MB pushed": round(shared["bytes_pushed"] / 1e6, 1),
        "remote s": shared["seconds"],
        "engine": report["backbones"]["mobilenet_v2"]["engine"],
    }


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = [max(len(str(column)), *(len(str(row[column])) for row in rows)) for column in columns]
    print("  ".join(str(column).rjust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[column]).rjust(width) for column, width in zip(columns, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flowers", type=Path, required=True, help="the flower_photos .tgz mirror")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (workspace, caches, server)")
    parser.add_argument("--cap", type=int, default=0, help="split.max_images_per_class (0 = all 3670 images)")
    parser.add_argument("--baseline", action="store_true", help="also a cold run without the shared cache")
    args = parser.parse_args()
    workspace = args.work / "workspace"
    params = {
        "download": {"source": str(args.flowers.resolve()), "sha256": FLOWERS_SHA256},
        "split": {"max_images_per_class": args.cap},
        "augment": {"preview_images": 2},
        "extract_features": BACKBONE,
    }
    scale.run_pipeline(workspace, params, stages=("download", "split", "augment"))
    with s3_endpoint(args.work) as environment:
        remote = f"s3://{make_bucket(environment)}/embeddings"
        rows = []
        if args.baseline:
            rows.append(extract(workspace, args.work / "cache-baseline", "", environment, "cold, local only"))
        rows.append(extract(workspace, args.work / "cache-a", remote, environment, "cold"))
        rows.append(extract(workspace, args.work / "cache-b", remote, environment, "remote-warm"))
        rows.append(extract(workspace, args.work / "cache-b", remote, environment, "local-warm"))
    print_table(rows)
    print(json.dumps({"remote": remote, "rows": rows}))


if __name__ == "__main__":
    main()
