"""The course's comparison table, reproduced through the pipeline: three experiments, one table.

The course (TensorFlow's image classification and transfer learning tutorials, on
flower_photos) compares three models by validation accuracy:

    CNN from scratch                  68.7%
    + dropout and data augmentation   75.2%
    frozen MobileNet + dense head     87.5%

This script runs the same three as ``dvc exp run`` experiments of a transferlab repository,
one after the other, so that every figure comes from the same split rows and the same evaluate
stage, and shows in ``dvc exp show``:

    course-scratch          train_head.head=scratch (the tutorial's CNN on pixels, 10 epochs)
    course-scratch-augment  ... + scratch.augment=true, scratch.dropout=0.2, scratch.epochs=15

(both with scratch.patience = epochs: every epoch runs, as in the tutorial, and the one with the
lowest validation loss is kept)
    course-transfer         train_head.head=dense on the course's MobileNet features

All three set extract_features to the course's backbone (MobileNet v1, alpha 0.25 by default:
the only v1 weights in the offline mirror), so the features are extracted once and the scratch
runs use the same features files, which say which image each split row is. Each experiment
runs with ``--temp`` (in DVC's temporary copy), so the workspace stays as it was.

It prints one row per experiment: the course's figure, validation and test accuracy
(metrics/evaluate.json), the training time (metrics/train_head.json ``seconds``), and the wall
and CPU time (user + system of every process) of the whole ``dvc exp run``. The first
experiment also pays for download, split and feature extraction unless DVC's run cache already
holds them; the other two reuse them. Run it on an otherwise idle machine; on 2 cores the
full flower_photos takes about half an hour.

Usage::

    python benchmarks/course_table.py --weights ../shared/weights/mobilenet_v1_0.25_224_imagenet_no_top.h5
    python benchmarks/course_table.py -S split.max_images_per_class=100 -S train_head.scratch.epochs=2   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVALUATE_METRICS = "metrics/evaluate.json"
TRAIN_METRICS = "metrics/train_head.json"


@dataclass(frozen=True)
class Experiment:
    """One row of the course's table and the params that reproduce it."""

    name: str
    model: str
    course_val_accuracy: float
    overrides: dict[str, str] = field(default_factory=dict)


# The scratch runs train every epoch, as the tutorial does (patience = epochs), and keep the one
# with the lowest validation loss, as every Keras head here does.
EXPERIMENTS = (
    Experiment(
        "course-scratch",
        "CNN from scratch",
        0.687,
        {
            "train_head.head": "scratch",
            "train_head.scratch.augment": "false",
            "train_head.scratch.dropout": "0.0",
            "train_head.scratch.epochs": "10",
            "train_head.scratch.patience": "10",
        },
    ),
    Experiment(
        "course-scratch-augment",
        "+ dropout and augmentation",
        0.752,
        {
            "train_head.head": "scratch",
            "train_head.scratch.augment": "true",
            "train_head.scratch.dropout": "0.2",
            "train_head.scratch.epochs": "15",
            "train_head.scratch.patience": "15",
        },
    ),
    Experiment("course-transfer", "frozen MobileNet + dense head", 0.875, {"train_head.head": "dense"}),
)


def overrides_for(experiment: Experiment, *, backbone: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The ``-S`` values of one experiment: the shared backbone, its own, then the user's (which win)."""
    return {**backbone, **experiment.overrides, **extra}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a mapping; ``ValueError`` for an item without ``=``."""
    parsed = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"-S {item!r}: expected KEY=VALUE, e.g. -S train_head.scratch.epochs=2")
        parsed[key] = value
    return parsed


def run_experiment(experiment: Experiment, overrides: dict[str, str], *, repo: Path, dvc: str) -> dict[str, float]:
    """Runs one ``dvc exp run --temp``; returns its wall and CPU seconds. Exits with DVC's output on failure."""
    command = [dvc, "exp", "run", "--temp", "-n", experiment.name]
    for key, value in overrides.items():
        command += ["-S", f"{key}={value}"]
    print(f"\n$ {' '.join(command)}", flush=True)
    before = _children_cpu_seconds()
    started = time.perf_counter()
    output: collections.deque[str] = collections.deque(maxlen=200)  # the tail, shown when the run fails
    with subprocess.Popen(
        command, cwd=repo, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            output.append(line)
            if _progress_line(line):
                print(line, end="", flush=True)
    wall = time.perf_counter() - started
    cpu = _children_cpu_seconds() - before
    if process.returncode != 0:
        sys.exit(f"{experiment.name} failed ({process.returncode}):\n{''.join(output)}")
    return {"wall_seconds": wall, "cpu_seconds": cpu}


def remove_existing(names: list[str], *, repo: Path, dvc: str) -> None:
    """Removes earlier experiments of these names on this baseline, so the runs can take them."""
    listed = subprocess.run(
        [dvc, "exp", "list", "--name-only"], cwd=repo, env=_environment(), capture_output=True, text=True, check=True
    ).stdout.split()
    existing = [name for name in names if name in listed]
    if existing:
        print(f"removing earlier experiments {', '.join(existing)}", flush=True)
        subprocess.run([dvc, "exp", "remove", *existing], cwd=repo, env=_environment(), capture_output=True, check=True)


def experiment_metrics(shown: Any, name: str) -> dict[str, Any]:
    """The metrics files of experiment ``name`` in ``dvc exp show --json`` output: path -> content."""
    for entry in _walk(shown):
        if entry.get("name") == name and isinstance(entry.get("data"), dict) and "metrics" in entry["data"]:
            return {path: (item or {}).get("data", {}) for path, item in (entry["data"]["metrics"] or {}).items()}
    raise ValueError(f"experiment {name} is not in `dvc exp show --json`; did it run on this commit?")


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison table as Markdown, one row per experiment."""
    lines = [
        "| model | experiment | course val | val accuracy | test accuracy | train_head s | exp wall s | exp CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['name']} | {row['course_val_accuracy']:.1%} | {row['val_accuracy']:.1%} "
            f"| {row['test_accuracy']:.1%} | {row['train_seconds']:.0f} | {row['wall_seconds']:.0f} "
            f"| {row['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


def result_row(experiment: Experiment, metrics: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
    """One table row from an experiment's metrics files and measured times."""
    evaluated, trained = metrics.get(EVALUATE_METRICS), metrics.get(TRAIN_METRICS)
    if not evaluated or not trained:
        raise ValueError(f"{experiment.name}: {EVALUATE_METRICS} or {TRAIN_METRICS} missing from `dvc exp show`")
    return {
        "name": experiment.name,
        "model": experiment.model,
        "course_val_accuracy": experiment.course_val_accuracy,
        "val_accuracy": evaluated["val"]["accuracy"],
        "test_accuracy": evaluated["test"]["accuracy"],
        "val_examples": evaluated["val"]["examples"],
        "test_examples": evaluated["test"]["examples"],
        "backbone": evaluated["provenance"]["backbone"],
        "train_seconds": trained["seconds"],
        **times,
    }


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _environment() -> dict[str, str]:
    # The stages run `python stages/...`: this interpreter's environment first on PATH.
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def _progress_line(line: str) -> bool:
    # DVC's stage headers and the stages' own summary lines; not TensorFlow's start-up noise.
    return line.startswith(("Running stage", "Stage '", "[train_head]", "[evaluate]", "Reproduced", "Ran experiment"))


def _default_dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the transferlab repository (default: here)")
    parser.add_argument(
        "--backbone", default="mobilenet", help="extract_features.backbone of all three (the course: mobilenet)"
    )
    parser.add_argument("--alpha", default="0.25", help="extract_features.alpha (0.25: the mirror's MobileNet v1)")
    parser.add_argument(
        "--weights", default="imagenet", help="extract_features.weights: imagenet, a no-top .h5 file, or none"
    )
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more param for every experiment (wins over the course's); repeatable",
    )
    parser.add_argument("--dvc", default=_default_dvc(), help="the dvc executable")
    arguments = parser.parse_args()
    try:
        extra = parse_overrides(arguments.set)
    except ValueError as error:
        parser.error(str(error))
    backbone = {
        "extract_features.backbone": arguments.backbone,
        "extract_features.alpha": arguments.alpha,
        "extract_features.weights": arguments.weights,
    }
    remove_existing([experiment.name for experiment in EXPERIMENTS], repo=arguments.repo, dvc=arguments.dvc)
    times = {
        experiment.name: run_experiment(
            experiment,
            overrides_for(experiment, backbone=backbone, extra=extra),
            repo=arguments.repo,
            dvc=arguments.dvc,
        )
        for experiment in EXPERIMENTS
    }
    shown = json.loads(
        subprocess.run(
            [arguments.dvc, "exp", "show", "--json"],
            cwd=arguments.repo,
            env=_environment(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    rows = [
        result_row(experiment, experiment_metrics(shown, experiment.name), times[experiment.name])
        for experiment in EXPERIMENTS
    ]
    print(f"\n{table(rows)}\n")
    print(
        f"val {rows[0]['val_examples']} images, test {rows[0]['test_examples']} images (the same rows in all three); "
        f"transfer backbone: {rows[-1]['backbone']}. Course figures: validation accuracy of the tutorials' own runs."
    )
    print("See them with: dvc exp show --only-changed", flush=True)


if __name__ == "__main__":
    main()
