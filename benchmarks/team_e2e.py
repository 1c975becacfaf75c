"""The team scenario end to end, timed: photos, embedding cache and DVC remote all on one S3 server.

This is README "Working as a team" run for real on the full flower_photos mirror, with three
clones of this repository as three teammates (each its own DVC cache and its own embedding cache
folder, the code of its own checkout on ``PYTHONPATH``):

1. a SeaweedFS server (``tests/s3_server.py``; or the one the AWS environment names, e.g.
   ``scripts/local_s3.sh``) gets the photos' class folders under ``s3://flowers/photos/`` and
   two empty buckets: ``cache`` (the shared embedding cache) and ``dvc`` (the DVC remote);
2. clone one, an empty embedding cache: ``dvc exp run`` with ``download.source`` on the bucket,
   ``extract_features.cache_remote`` on the cache bucket and offline MobileNetV2 weights (cold:
   embeds everything and pushes it);
3. clone two, another empty embedding cache: the same experiment (remote-warm: every row fetched,
   none embedded), then ``dvc exp run -f`` again (local-warm: no request to the cache bucket);
4. clone one commits its results, adds the DVC remote (endpoint and keys only in
   ``.dvc/config.local``) and pushes; clone three (``git clone`` of clone one, credentials only in
   the AWS variables) pulls: ``dvc status`` up to date, ``dvc repro`` runs no stage, and
   ``dvc metrics show`` and ``dvc exp show`` equal clone one's, and so do params.yaml and dvc.lock.

It prints one table (wall seconds per step, the download and extract_features stages' share of
each ``dvc exp run``, the embedding cache counters) and a JSON line with everything, and exits
non-zero when a check fails. Figures taken on a shared machine are pessimistic: it prints the
load average before and after.

Usage::

    python benchmarks/team_e2e.py --flowers ../shared/data/flower_photos.tgz \\
        --weights ../shared/weights/mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5 --work /tmp/team
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = {"photos": "flowers", "cache": "cache", "dvc": "dvc"}


@contextlib.contextmanager
def s3_environment(work: Path):
    """The AWS variables of the server to use: the caller's, else a SeaweedFS started (and stopped) here."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield {key: os.environ[key] for key in os.environ if key.startswith("AWS_")}
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import s3_server

    with s3_server.S3Server(work / "seaweedfs") as server:
        yield server.env()


def filesystem(environment: dict):
    """An uncached s3fs filesystem for the server ``environment`` names."""
    import s3fs

    return s3fs.S3FileSystem(
        key=environment["AWS_ACCESS_KEY_ID"],
        secret=environment["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=environment["AWS_ENDPOINT_URL"],
        client_kwargs={"region_name": environment.get("AWS_DEFAULT_REGION", "us-east-1")},
        skip_instance_cache=True,
    )


def upload_photos(archive: Path, work: Path, environment: dict) -> dict:
    """Extracts the archive's class folders and uploads them to ``s3://flowers/photos/``; creates the buckets."""
    photos = work / "photos"
    if not photos.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(work / "photos-extract", filter="data")
        (top,) = [path for path in (work / "photos-extract").iterdir() if path.is_dir()]
        top.rename(photos)
    files = sorted(path for path in photos.rglob("*") if path.is_file() and path.parent != photos)
    fs = filesystem(environment)
    for bucket in BUCKETS.values():
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    started = time.perf_counter()
    keys = [f"{BUCKETS['photos']}/photos/{path.relative_to(photos).as_posix()}" for path in files]
    fs.put([str(path) for path in files], keys)
    return {
        "objects": len(files),
        "MB": round(sum(p.stat().st_size for p in files) / 1e6, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


class Clone:
    """One teammate: a git clone of a repository, its own embedding cache folder and environment."""

    def __init__(self, source: Path, root: Path, cache: Path, environment: dict):
        self.root = root
        subprocess.run(["git", "clone", "-q", str(source), str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "config", "user.email", "team@example.invalid"], check=True)
        subprocess.run(["git", "-C", str(root), "config", "user.name", "team_e2e"], check=True)
        self.environment = {
            **os.environ,
            **environment,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(root / "src"),  # this checkout's code, not the editable install's
            "TRANSFERLAB_CACHE_DIR": str(cache),
        }
        self.environment.pop("TRANSFERLAB_ROOT", None)

    def run(self, *command: str) -> str:
        """Runs a command in the clone; returns its stdout, or exits with its output when it fails."""
        result = subprocess.run(command, cwd=self.root, env=self.environment, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed in {self.root}:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def timed(self, *command: str) -> dict:
        """Runs a dvc command, streaming its output to ``dvc.log``; wall seconds, overall and per stage run."""
        started = time.perf_counter()
        stages: dict[str, float] = {}
        current = None
        with (self.root.parent / f"{self.root.name}.log").open("a") as log:
            log.write(f"$ {' '.join(command)}\n")
            process = subprocess.Popen(
                command,
                cwd=self.root,
                env=self.environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for line in process.stdout:
                log.write(line)
                now = time.perf_counter()
                if line.startswith("Running stage '"):
                    if current:
                        stages[current] = now - stages[current]
                    current = line.split("'")[1]
                    stages[current] = now
            process.wait()
        seconds = time.perf_counter() - started
        if current:
            stages[current] = started + seconds - stages[current]
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed in {self.root}; see {log.name}")
        return {"seconds": round(seconds, 1), "stages": {name: round(value, 1) for name, value in stages.items()}}

    def json(self, *command: str):
        return json.loads(self.run(*command))

    def extract_report(self) -> dict:
        return json.loads((self.root / "metrics" / "extract_features.json").read_text())


def experiment(clone: Clone, overrides: list[str], label: str, *, force: bool = False) -> dict:
    """One timed ``dvc exp run`` and the row it gives for the table."""
    figures = clone.timed("dvc", "exp", "run", *(["-f"] if force else []), *overrides)
    report = clone.extract_report()
    shared = report["cache_remote"]
    return {
        "step": label,
        "seconds": figures["seconds"],
        "download s": figures["stages"].get("download", 0.0),
        "extract s": figures["stages"].get("extract_features", 0.0),
        "embedded": report["embedded"],
        "local hits": report["local_hits"],
        "remote hits": report["remote_hits"],
        "pushed": report["pushed"],
        "MB fetched": round(shared.get("bytes_fetched", 0) / 1e6, 1),
        "MB pushed": round(shared.get("bytes_pushed", 0) / 1e6, 1),
        "remote status": shared.get("status", ""),
    }


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    widths = [max(len(column), *(len(str(row.get(column, ""))) for row in rows)) for column in columns]
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(column, "")).rjust(width) for column, width in zip(columns, widths)))


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flowers", type=Path, required=True, help="the flower_photos .tgz mirror")
    parser.add_argument("--weights", type=Path, required=True, help="MobileNetV2 no-top .h5 weights (offline)")
    parser.add_argument("--work", type=Path, required=True, help="a new scratch folder (clones, caches, server)")
    parser.add_argument("--cap", type=int, default=0, help="split.max_images_per_class (0 = all 3670 images)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    loads = {"start": load()}
    overrides = [
        "-S", f"download.source=s3://{BUCKETS['photos']}/photos/",
        "-S", "download.sha256=",
        "-S", f"split.max_images_per_class={args.cap}",
        "-S", f"extract_features.weights={args.weights.resolve()}",
        "-S", f"extract_features.cache_remote=s3://{BUCKETS['cache']}/emb",
    ]  # fmt: skip
    checks: dict[str, bool] = {}
    with s3_environment(work) as environment:
        upload = upload_photos(args.flowers.resolve(), work, environment)
        rows = [{"step": f"upload {upload['objects']} photos ({upload['MB']} MB)", "seconds": upload["seconds"]}]
        print(f"uploaded: {upload}", flush=True)

        one = Clone(ROOT, work / "one", work / "cache-one", environment)
        rows.append(experiment(one, overrides, "clone 1: cold"))
        print(rows[-1], flush=True)

        two = Clone(ROOT, work / "two", work / "cache-two", environment)
        rows.append(experiment(two, overrides, "clone 2: remote-warm"))
        checks["remote-warm embeds nothing"] = rows[-1]["embedded"] == 0
        print(rows[-1], flush=True)
        rows.append(experiment(two, overrides, "clone 2: local-warm (-f)", force=True))
        checks["local-warm embeds and fetches nothing"] = rows[-1]["embedded"] == rows[-1]["remote hits"] == 0
        print(rows[-1], flush=True)

        one.run("git", "add", "-A")
        one.run("git", "commit", "-q", "-m", "results of dvc exp run")
        one.run("dvc", "remote", "add", "-d", "storage", f"s3://{BUCKETS['dvc']}/store")
        for option, variable in (
            ("endpointurl", "AWS_ENDPOINT_URL"),
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ):
            one.run("dvc", "remote", "modify", "--local", "storage", option, environment[variable])
        one.run("git", "add", ".dvc/config")
        one.run("git", "commit", "-q", "-m", "the team's DVC remote")
        checks["no secret in git"] = environment["AWS_SECRET_ACCESS_KEY"] not in one.run("git", "show", "HEAD")
        rows.append({"step": "clone 1: dvc push", "seconds": one.timed("dvc", "push")["seconds"]})

        three = Clone(work / "one", work / "three", work / "cache-three", environment)
        rows.append({"step": "clone 3: dvc pull", "seconds": three.timed("dvc", "pull")["seconds"]})
        checks["clone 3: dvc status up to date"] = "up to date" in three.run("dvc", "status")
        repro = three.timed("dvc", "repro")
        rows.append({"step": "clone 3: dvc repro (no stage)", "seconds": repro["seconds"]})
        checks["clone 3: dvc repro runs no stage"] = not repro["stages"]
        checks["clone 3: metrics equal clone 1's"] = three.json("dvc", "metrics", "show", "--json") == one.json(
            "dvc", "metrics", "show", "--json"
        )
        for name in ("params.yaml", "dvc.lock"):
            checks[f"clone 3: {name} equals clone 1's"] = (three.root / name).read_bytes() == (
                one.root / name
            ).read_bytes()
        checks["clone 3: dvc exp show equals clone 1's"] = three.json("dvc", "exp", "show", "--json") == one.json(
            "dvc", "exp", "show", "--json"
        )
        evaluate = json.loads((three.root / "metrics" / "evaluate.json").read_text())["test"]["accuracy"]
    loads["end"] = load()
    print_table(rows)
    print("checks:", json.dumps(checks, indent=1))
    print(f"clone 3's test accuracy (pulled, not recomputed): {evaluate:.4f}")
    print(f"load average (1, 5, 15 min) at start {loads['start']}, at end {loads['end']}; {os.cpu_count()} CPUs")
    print(json.dumps({"rows": rows, "checks": checks, "load": loads, "test_accuracy": evaluate}))
    if not all(checks.values()):
        raise SystemExit("a check failed: " + ", ".join(name for name, ok in checks.items() if not ok))


if __name__ == "__main__":
    main()
