"""extract_features on Ray (``executor: ray``): the local executor's features bit for bit, the cache, a killed worker.

Every test here shares the session's local Ray instance (the ``ray_instance`` fixture) and is
marked ``ray``: ``pytest -m ray`` runs them alone. Backbone: random-init MobileNetV2 (alpha 0.35)
on the engine ``auto``, so the driver converts it to TFLite once and the workers load that file.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import support
from transferlab.backbones import stack
from transferlab.core import params
from transferlab.features import extract_features

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("ray_instance")]
SMALL = {**support.SMALL_PARAMS["extract_features"], "engine": "auto"}


def run_extraction(folder: Path, rows: list[dict], cache: Path, *, executor: str, **settings):
    values = {**SMALL, **settings}
    members = stack.resolve_members(params.parse_section("extract_features", values), seed=0)
    return extract_features.extract_features(
        members=members,
        rows_by_split={"train": rows[::2], "val": rows[1::4], "test": rows[3::4]},
        images_directory=folder,
        cache_directory=cache,
        engine=values["engine"],
        batch_size=values["batch_size"],
        threads=2,
        seed=0,
        max_image_pixels=10**8,
        executor=executor,
        ray_workers=2,
    )


def local_reference(folder: Path, rows: list[dict], ray_cache: Path, tmp_path: Path, **settings):
    """The local executor's features, with the very converted model the Ray run used (conversion is not
    byte-reproducible, so a second conversion could name other bytes)."""
    local_cache = tmp_path / "local-cache"
    shutil.copytree(ray_cache / "converted", local_cache / "converted")
    return run_extraction(folder, rows, local_cache, executor="local", **settings)


def assert_same_features(first: dict, second: dict) -> None:
    for split in ("train", "val", "test"):
        for key in ("features", "labels", "paths", "sha256", "block_engines"):
            np.testing.assert_array_equal(first[split].arrays[key], second[split].arrays[key], err_msg=f"{split}/{key}")


def test_ray_gives_the_local_features_bit_for_bit_and_a_second_run_hits_the_cache(tmp_path):
    folder = support.write_dataset(tmp_path / "photos", per_class=8, size=support.ODD_SIZES, name=support.ODD_NAME)
    rows = support.rows_for(folder)
    cold, cold_report = run_extraction(folder, rows, tmp_path / "cache", executor="ray")
    warm, warm_report = run_extraction(folder, rows, tmp_path / "cache", executor="ray")
    local, local_report = local_reference(folder, rows, tmp_path / "cache", tmp_path)

    assert cold_report["embedded"] == len(rows) and cold_report["cache_hits"] == 0
    assert warm_report["embedded"] == 0 and warm_report["cache_hits"] == len(rows)
    assert local_report["embedded"] == len(rows)
    assert cold_report["backbones"]["mobilenet_v2"]["engine"] == local_report["backbones"]["mobilenet_v2"]["engine"]
    assert_same_features(cold, local)
    assert_same_features(cold, warm)


def cached_rows(cache: Path) -> int:
    total = 0
    for database in cache.glob("*/*.sqlite"):
        with sqlite3.connect(database, timeout=30) as connection:
            total += connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    return total


def ray_workers() -> list[psutil.Process]:
    """This machine's Ray actor processes running the executor's ``_Embedder``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "_Embedder" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def kill_a_worker_mid_run(cache: Path, killed: list[int], *, after_rows: int, deadline: float) -> None:
    """Waits until the driver has stored ``after_rows`` embeddings, then SIGKILLs one working actor."""
    while time.monotonic() < deadline:
        workers = ray_workers()
        if workers and cached_rows(cache) >= after_rows:
            workers[0].send_signal(signal.SIGKILL)
            killed.append(workers[0].pid)
            return
        time.sleep(0.05)


def test_a_worker_killed_mid_run_loses_nothing_and_the_features_are_identical(tmp_path):
    folder = support.write_dataset(tmp_path / "photos", per_class=60)
    rows = support.rows_for(folder)
    cache = tmp_path / "cache"
    settings = {"image_size": 128, "batch_size": 4}
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_mid_run, args=(cache, killed), kwargs={"after_rows": 8, "deadline": time.monotonic() + 300}
    )
    killer.start()
    try:
        features, report = run_extraction(folder, rows, cache, executor="ray", **settings)
    except Exception as error:  # the other allowed outcome: a clear failure, and a rerun embeds only the rest
        stored = cached_rows(cache)
        assert 0 < stored < len(rows), f"failed with nothing or everything stored: {error}"
        features, report = run_extraction(folder, rows, cache, executor="ray", **settings)
        assert report["cache_hits"] == stored and report["embedded"] == len(rows) - stored
    finally:
        killer.join()
    assert killed, "no Ray worker was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert report["embedded"] + report["cache_hits"] == len(rows) and cached_rows(cache) == len(rows)
    local, _ = local_reference(folder, rows, cache, tmp_path, **settings)
    assert_same_features(features, local)


def test_dvc_exp_run_with_the_ray_executor_gives_the_local_features_and_metrics(dvc_project):
    """The stage through DVC joins the session's Ray ($RAY_ADDRESS); support's projects run the Keras engine."""
    project = dvc_project
    project.dvc("repro", "evaluate")
    local_features = {split: np.load(project.root / f"data/features/{split}.npz") for split in ("train", "val", "test")}
    local_evaluation = json.loads((project.root / "metrics/evaluate.json").read_text())
    project.commit("local")

    ray_cache = project.root.parent / "ray-cache"
    project.dvc("exp", "run", "-S", "extract_features.executor=ray", "-S", f"extract_features.cache_dir={ray_cache}")

    report = json.loads((project.root / "metrics/extract_features.json").read_text())
    assert report["embedded"] == 54 and report["cache_hits"] == 0, "a fresh cache: every view embedded on Ray"
    for split, arrays in local_features.items():
        on_ray = np.load(project.root / f"data/features/{split}.npz")
        np.testing.assert_array_equal(on_ray["features"], arrays["features"], err_msg=split)
    assert json.loads((project.root / "metrics/evaluate.json").read_text()) == local_evaluation
