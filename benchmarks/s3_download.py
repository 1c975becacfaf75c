"""download.source on S3: flower_photos from a local folder, an s3:// prefix and an s3:// .tgz, timed.

Extracts the flower_photos mirror, uploads its 3670 photos (one object each) and the .tgz to a
SeaweedFS bucket, then runs the download stage's library (``download.prepare_dataset``: fetch,
checks, decode-checked index) on each source and prints the seconds of each, and whether the
three indexes agree row for row. The S3 server is a SeaweedFS on 127.0.0.1 started here with the
tests' ``tests/s3_server.py``. Run it on an otherwise idle machine: on a shared one, every figure
is pessimistic (the server and the client share the CPUs).

Usage::

    python benchmarks/s3_download.py --flowers ../shared/data/flower_photos.tgz
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(
    min_image_side=8,
    min_images_per_class=5,
    max_files=10**6,
    max_total_bytes=20 * 2**30,
    max_expansion_ratio=100.0,
    max_image_pixels=89_478_485,
    retries=0,
    deadline_seconds=600,
    workers=2,
)


def timed(name: str, work: Path, source: str, sha256: str = ""):
    """Runs prepare_dataset on ``source`` into a fresh folder; prints and returns (rows, seconds)."""
    from transferlab.data import download

    destination = work / name / "images"
    destination.mkdir(parents=True)
    started = time.perf_counter()
    result = download.prepare_dataset(source=source, sha256=sha256, destination=destination, **LIMITS)
    seconds = time.perf_counter() - started
    print(f"{name:>10}: {result.metrics['images']} images in {seconds:6.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flowers", type=Path, default=ROOT.parent / "shared" / "data" / "flower_photos.tgz")
    arguments = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import s3_server

    from transferlab.data import images

    with tempfile.TemporaryDirectory(prefix="s3-download-") as folder:
        work = Path(folder)
        with tarfile.open(arguments.flowers) as handle:
            handle.extractall(work / "source", filter="data")
        photos = work / "source" / "flower_photos"
        with s3_server.S3Server(work / "seaweedfs") as server:
            os.environ.update(server.env())
            bucket = server.make_bucket()
            fs = server.filesystem()
            files = sorted(path for path in photos.rglob("*") if path.is_file())
            started = time.perf_counter()
            fs.put([str(path) for path in files], [f"{bucket}/photos/{path.relative_to(photos)}" for path in files])
            fs.put_file(str(arguments.flowers), f"{bucket}/flower_photos.tgz")
            print(f"    upload: {len(files)} objects and the .tgz in {time.perf_counter() - started:6.1f} s")
            local = timed("folder", work, str(photos))
            prefix = timed("s3 prefix", work, f"s3://{bucket}/photos/")
            archive = timed("s3 .tgz", work, f"s3://{bucket}/flower_photos.tgz", images.sha256_file(arguments.flowers))
            print(f"same index rows: {local.rows == prefix.rows == archive.rows}")
            print(f"source_fingerprint of the prefix: {prefix.metrics['source_fingerprint']}")


if __name__ == "__main__":
    main()
