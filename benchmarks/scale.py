"""Scaling benchmark: the pipeline's cost per image and peak memory from 10^4 images up, and Ray's overhead.

For each size (``--sizes``, default 10k 50k 200k) it writes a synthetic class-folder dataset of
96x96 JPEGs (:func:`write_synthetic`: ten classes, each a colour and a stripe texture of its own
angle and frequency, with jitter and noise, so a linear head learns them but not trivially), then
runs the stage scripts as dvc.yaml runs them (download -> split -> augment -> extract_features ->
extract_taps -> train_head -> evaluate, in a workspace per size) with MobileNet v1 alpha 0.25 at
96 px, ImageNet weights from ``../shared/weights/mobilenet_v1_0.25_224_imagenet_no_top.h5``
(engine auto: converted to TFLite once). Each stage runs as its own process, so its peak RSS is
its own (``os.wait4``'s rusage; with ``executor: ray`` that is the driver's, the actors are Ray's
processes). A forked child's peak RSS starts at its parent's RSS (about 35 MiB for this script),
so no figure is below that floor; the script keeps its own memory small for that reason. The
logistic head trains with params.yaml's ``train_head.logistic.max_memory_gb`` (in
memory up to 4 GB: 200k images need 0.33 GB) unless ``--max-memory-gb`` is given; for
``--out-of-core-sizes`` (default: the largest size) train_head and evaluate run again with the
head out of core, so the table shows both solvers' cost, memory and accuracy.

Then, for the sizes in ``--ray-sizes``, extract_features again on a cold cache with
``executor: ray`` and 1 and 2 workers, beside the local figure (images/s from the stage's
metrics, Ray's start included).

``--flowers PATH.tgz`` instead runs the pipeline on flower_photos with MobileNetV2 (the mirror's
dequantized ImageNet weights, 224 px) and trains the logistic head in memory and out of core on the
same features, printing both test accuracies. ``--components`` (after those runs, in the same
``--work``) measures one core's cost per image of each part: decode + resize, the engine, the
embedding cache's writes and reads, and the bytes read per image (the input of docs/SCALING.md).

Run it on an otherwise idle machine: on a shared one, every figure is pessimistic.

Usage::

    python benchmarks/scale.py --sizes 10000 50000 200000 --ray-sizes 50000 --work /tmp/scale
    python benchmarks/scale.py --flowers ../shared/data/flower_photos.tgz --work /tmp/scale
    python benchmarks/scale.py --components --flowers ../shared/data/flower_photos.tgz --work /tmp/scale  # after both
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", ROOT.parent / "shared"))
STAGES = ("download", "split", "augment", "extract_features", "extract_taps", "train_head", "evaluate")
CLASSES = 10
SIDE = 96
BACKBONE = {
    "backbone": "mobilenet",
    "alpha": 0.25,
    "weights": str(SHARED / "weights" / "mobilenet_v1_0.25_224_imagenet_no_top.h5"),
    "image_size": 96,
    "engine": "auto",
}
FLOWERS_BACKBONE = {
    "backbone": "mobilenet_v2",
    "alpha": 1.0,
    "weights": str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"),
    "image_size": 224,
    "engine": "auto",
}


def write_synthetic(root: Path, count: int, *, seed: int = 0, jobs: int = 2) -> Path:
    """Writes ``count`` 96x96 JPEGs in ten class folders (kept: a second call with the same count reuses them).

    Each image has its own random stream (seeded by ``seed`` and its index), so ``jobs`` processes
    write the same dataset as one.
    """
    done = root / ".complete"
    if done.exists() and done.read_text() == str(count):
        return root
    for label in range(CLASSES):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, count, jobs + 1).astype(int)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_write_images, [root] * jobs, bounds[:-1], bounds[1:], [seed] * jobs))
    done.write_text(str(count))
    return root


def _write_images(root: Path, first: int, end: int, seed: int) -> None:
    colours = np.random.default_rng(seed).uniform(60, 200, size=(CLASSES, 3))
    angles = np.linspace(0, np.pi, CLASSES, endpoint=False)
    frequencies = 2 + (np.arange(CLASSES) % 4) * 1.5  # stripes per image side
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    for index in range(first, end):
        rng = np.random.default_rng([seed, index])
        label = index % CLASSES
        folder = root / f"class_{label:02d}"
        angle = angles[label] + rng.normal(0, 0.15)
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * frequencies[label] * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        colour = colours[label] + rng.normal(0, 25, 3)
        pixels = colour + 40 * stripes[..., None] + rng.normal(0, 20, (SIDE, SIDE, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:07d}.jpg", quality=85)


def stage_commands() -> dict[str, list[str]]:
    """Each stage's command as dvc.yaml writes it, run with this interpreter and this repository's scripts."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name in STAGES:
        words = shlex.split(stages[name]["cmd"])
        commands[name] = [sys.executable, str(ROOT / words[1]), *words[2:]]
    return commands


def write_params(workspace: Path, **sections: dict[str, Any]) -> Path:
    """The repository's params.yaml with ``sections`` merged in, written into ``workspace``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[name].setdefault(key, {}).update(value)
            else:
                params[name][key] = value
    path = workspace / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


LOADS: list[float] = []  # the 1-minute load average at each stage's start and end: how shared the machine was


def run_stage(command: list[str], workspace: Path, log: Path) -> dict[str, float]:
    """Runs one stage script; returns its wall seconds and its own peak RSS (MiB)."""
    started = time.perf_counter()
    LOADS.append(os.getloadavg()[0])
    with log.open("a") as output:
        process = subprocess.Popen(command, cwd=workspace, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    LOADS.append(os.getloadavg()[0])
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed ({process.returncode}); see {log}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_pipeline(workspace: Path, params: dict[str, dict], stages=STAGES, **flags: str) -> dict[str, dict]:
    """Runs ``stages`` in ``workspace`` with ``params`` merged into the repository's; returns each stage's figures."""
    workspace.mkdir(parents=True, exist_ok=True)
    write_params(workspace, **params)
    commands = stage_commands()
    figures = {}
    for name in stages:
        command = commands[name]
        for flag, value in flags.items():  # e.g. another --out for a second extract_features
            if flag in command:
                command[command.index(flag) + 1] = value
        figures[name] = run_stage(command, workspace, workspace / "stages.log")
        print(f"  {name:17s} {figures[name]['seconds']:8.1f} s  {figures[name]['peak_rss_mib']:7.0f} MiB", flush=True)
    return figures


def size_params(source: Path, count: int, work: Path, max_memory_gb: float | None) -> dict[str, dict]:
    """The params of one size's run; ``max_memory_gb`` None keeps the repository's default budget."""
    head: dict[str, Any] = {"head": "logistic"}
    if max_memory_gb is not None:
        head["logistic"] = {"max_memory_gb": max_memory_gb}
    return {
        "download": {"source": str(source), "sha256": "", "max_files": count + 1000},
        "split": {"val_fraction": 0.1, "test_fraction": 0.1},
        "augment": {"copies": 0, "preview_images": 2},
        "extract_features": {**BACKBONE, "cache_dir": str(work / f"cache-{count}-local"), "executor": "local"},
        "train_head": head,
        "evaluate": {"gallery_images": 4},
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def benchmark_size(count: int, work: Path, *, max_memory_gb: float | None, ray: bool, out_of_core: bool) -> dict:
    """One size's pipeline; with ``out_of_core`` also train_head and evaluate with the head out of core."""
    print(f"== {count} images", flush=True)
    started = time.perf_counter()
    source = write_synthetic(work / f"synthetic-{count}", count)
    print(f"  (dataset written in {time.perf_counter() - started:.0f} s)", flush=True)
    workspace = work / f"run-{count}"
    params = size_params(source, count, work, max_memory_gb)
    result = {"images": count, "stages": run_pipeline(workspace, params)}
    result["extract"] = read_json(workspace / "metrics" / "extract_features.json")["images_per_second"]
    result["train_head"] = read_json(workspace / "metrics" / "train_head.json")
    result["evaluate"] = read_json(workspace / "metrics" / "evaluate.json")
    if out_of_core:
        print("  train_head and evaluate again, the head out of core (max_memory_gb 1e-6)", flush=True)
        again = {**params, "train_head": {"head": "logistic", "logistic": {"max_memory_gb": 1e-6}}}
        figures = run_pipeline(workspace, again, stages=("train_head", "evaluate"))
        result["out_of_core"] = {
            "stages": figures,
            "train_head": read_json(workspace / "metrics" / "train_head.json"),
            "evaluate": read_json(workspace / "metrics" / "evaluate.json"),
        }
        write_params(workspace, **params)
    if ray:
        result["ray"] = {}
        for workers in (1, 2):
            name = f"ray{workers}"
            params["extract_features"].update(
                executor="ray", ray_workers=workers, cache_dir=str(work / f"cache-{count}-{name}")
            )
            print(f"  extract_features with executor: ray, {workers} worker(s)", flush=True)
            figures = run_pipeline(
                workspace,
                params,
                stages=("extract_features",),
                **{"--out": f"data/features-{name}", "--metrics": f"metrics/extract_features-{name}.json"},
            )
            metrics = read_json(workspace / "metrics" / f"extract_features-{name}.json")
            result["ray"][name] = {**figures["extract_features"], "images_per_second": metrics["images_per_second"]}
    return result


def print_table(results: list[dict]) -> None:
    print("\nper stage: seconds per 1000 images / peak RSS (MiB)")
    print(f"{'images':>8} " + " ".join(f"{name[:16]:>17}" for name in STAGES))
    for result in results:
        for label, stages in (("", result["stages"]), (" ooc", result.get("out_of_core", {}).get("stages", {}))):
            if not stages:
                continue
            cells = []
            for name in STAGES:
                figures = stages.get(name)
                seconds = figures["seconds"] * 1000 / result["images"] if figures else 0.0
                cells.append(f"{seconds:7.2f} /{figures['peak_rss_mib']:6.0f}" if figures else "")
            print(f"{str(result['images']) + label:>8} " + " ".join(f"{cell:>17}" for cell in cells))
    print("(ooc: train_head and evaluate again with the logistic head out of core)")
    print("\nextract_features images/s (cold cache, whole stage incl. start-up), and the head")
    print(f"{'images':>8} {'local':>8} {'ray x1':>8} {'ray x2':>8} {'ray2/local':>10}  head solver, test accuracy")
    for result in results:
        ray = result.get("ray", {})
        one, two = (ray.get(name, {}).get("images_per_second") for name in ("ray1", "ray2"))
        ratio = f"{two / result['extract']:.2f}" if two else "-"
        heads = [(result["train_head"], result["evaluate"])]
        if "out_of_core" in result:
            heads.append((result["out_of_core"]["train_head"], result["out_of_core"]["evaluate"]))
        described = "; ".join(f"{head.get('solver', '?')}, {accuracy_of(metrics)}" for head, metrics in heads)
        print(f"{result['images']:>8} {result['extract']:>8} {one or '-':>8} {two or '-':>8} {ratio:>10}  {described}")
    if LOADS:
        print(f"\n1-minute load average at the stages' starts and ends: {min(LOADS):.1f}-{max(LOADS):.1f}")


def accuracy_of(metrics: dict) -> str:
    """The test accuracy in metrics/evaluate.json, in percent."""
    accuracy = metrics.get("test", {}).get("accuracy", metrics.get("test_accuracy"))
    return f"{100 * accuracy:.2f}%" if isinstance(accuracy, float) else str(accuracy)


def file_sha256(path: Path) -> str:
    """The file's sha256, read in blocks (holding the archive would raise every stage's RSS floor)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def benchmark_flowers(archive: Path, work: Path) -> None:
    """Logistic head in memory vs out of core on the same flower_photos features."""
    workspace = work / "flowers"
    params = {
        "download": {"source": str(archive), "sha256": file_sha256(archive)},
        "augment": {"preview_images": 2},
        "extract_features": {**FLOWERS_BACKBONE, "cache_dir": str(work / "cache-flowers")},
        "train_head": {"head": "logistic"},
        "evaluate": {"gallery_images": 4},
    }
    figures = {"in memory": run_pipeline(workspace, params)}
    in_memory = read_json(workspace / "metrics" / "evaluate.json")
    params["train_head"]["logistic"] = {"max_memory_gb": 1e-6}
    figures["out of core"] = run_pipeline(workspace, params, stages=("train_head", "evaluate"))
    out_of_core = read_json(workspace / "metrics" / "evaluate.json")
    print(json.dumps({"in_memory": in_memory, "out_of_core": out_of_core, "stages": figures}, indent=1)[:6000])


def per_image_milliseconds(function, count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        function(index)
    return (time.perf_counter() - started) * 1000 / count


def benchmark_components(work: Path, archive: Path | None) -> None:
    """One core's cost per image of each part: decode + resize, engine, cache write and read, bytes read."""
    results = {}
    folders = {"synthetic 96 px": (work / "synthetic-10000", 96)}
    if archive is not None:
        folders["flowers 224 px"] = (work / "flowers" / "data" / "raw" / "images", 224)
    for name, (folder, size) in folders.items():
        if folder.exists():
            results[name] = decode_costs(folder, size)
    for label, pattern in (("mobilenet 0.25 @96", "cache-10000-local"), ("mobilenet_v2 1.0 @224", "cache-flowers")):
        models = sorted((work / pattern / "converted").glob("*.tflite"))
        if models:
            results[label] = engine_and_cache_costs(models[0], work / "component-cache")
    print(json.dumps(results, indent=1))


def decode_costs(folder: Path, size: int) -> dict[str, float]:
    from transferlab.features import decode

    paths = sorted(str(path.relative_to(folder)) for path in folder.glob("*/*.jpg"))[:400]
    items = [decode.Item("0" * 64, "", path) for path in paths]

    def render(index: int) -> None:
        decode.render(items[index], images_directory=folder, size=size, max_image_pixels=10**8)

    return {
        "decode_resize_ms": round(per_image_milliseconds(render, len(items)), 3),
        "file_kib": round(sum((folder / path).stat().st_size for path in paths) / len(paths) / 1024, 1),
    }


def engine_and_cache_costs(model: Path, cache_folder: Path) -> dict[str, float]:
    from transferlab.features import embedding_cache, engines

    engine = engines.TFLiteEngine(model, threads=1)
    pixels = np.random.default_rng(0).integers(0, 255, (32, engine.image_size, engine.image_size, 3), dtype=np.uint8)
    width = engine.run(pixels).shape[1]
    figures = {"engine_ms_one_thread": round(per_image_milliseconds(lambda _: engine.run(pixels), 10) / 32, 3)}
    cache = embedding_cache.EmbeddingCache(cache_folder, f"{width:064x}", description={"probe": str(model)})
    rows = {(f"{index:064x}", ""): np.ones(width, np.float32) for index in range(3200)}
    batches = [dict(list(rows.items())[start : start + 32]) for start in range(0, len(rows), 32)]
    figures["cache_write_ms"] = round(
        per_image_milliseconds(lambda index: cache.put_many(batches[index]), len(batches)) / 32, 4
    )
    figures["cache_read_ms"] = round(per_image_milliseconds(lambda _: cache.get_many(list(rows)), 1) / len(rows), 4)
    figures["embedding_kib"] = round(width * 4 / 1024, 2)
    cache.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument(
        "--ray-sizes", type=int, nargs="*", default=[50_000], help="sizes also run on Ray (1, 2 workers)"
    )
    parser.add_argument(
        "--max-memory-gb", type=float, help="train_head.logistic.max_memory_gb (default: params.yaml's, in memory)"
    )
    parser.add_argument(
        "--out-of-core-sizes",
        type=int,
        nargs="*",
        help="sizes whose head is also trained out of core (train_head + evaluate again); default: the largest",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferlab-scale"))
    parser.add_argument("--flowers", type=Path, help="flower_photos.tgz: compare the two logistic solvers instead")
    parser.add_argument("--components", action="store_true", help="per-image costs of each part (after a run)")
    arguments = parser.parse_args()
    arguments.work.mkdir(parents=True, exist_ok=True)
    if arguments.components:
        benchmark_components(arguments.work.resolve(), arguments.flowers)
        return
    if arguments.flowers:
        benchmark_flowers(arguments.flowers.resolve(), arguments.work.resolve())
        return
    results = []
    out_of_core = max(arguments.sizes) if arguments.out_of_core_sizes is None else arguments.out_of_core_sizes
    for count in arguments.sizes:
        results.append(
            benchmark_size(
                count,
                arguments.work.resolve(),
                max_memory_gb=arguments.max_memory_gb,
                ray=count in arguments.ray_sizes,
                out_of_core=count in (out_of_core if isinstance(out_of_core, list) else [out_of_core]),
            )
        )
        (arguments.work / "results.json").write_text(json.dumps(results, indent=1))
        print_table(results)


if __name__ == "__main__":
    main()
