"""Test support: a small image-folder dataset, and a temporary DVC project that runs it.

The project is a fresh git + DVC repository holding this repository's dvc.yaml, stages/ and
src/ (the stages' code deps) with a shrunken params.yaml: random-init backbones at 32 px on the
Keras engine, tiny heads, no TFLite export. Stages run with this interpreter's environment first
on PATH, as in the README.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from conftest import REPOSITORY_ROOT

CLASS_COLOURS = {"daisy": (230, 230, 90), "roses": (200, 40, 60), "tulips": (230, 120, 170)}

# Sizes (width, height) that trip naive resizing, for ``write_dataset(size=ODD_SIZES)``: tiny (MNIST-sized),
# 100x100 (below every backbone's input size, so the pipeline upscales it), tall and wide (1:4 and 4:1).
ODD_SIZES = ((28, 28), (100, 100), (40, 160), (160, 40))
# A file-name stem with spaces and non-ASCII characters, for ``write_dataset(name=ODD_NAME)``.
ODD_NAME = "{label} photo n°{index:03d} été 花"
IMAGE_SUFFIXES = (".jpg", ".png")


def write_dataset(
    root: Path,
    *,
    per_class: int | Mapping[str, int] = 12,
    classes: Sequence[str] = tuple(CLASS_COLOURS),
    seed: int = 0,
    size: tuple[int, int] | Sequence[tuple[int, int]] = (48, 40),
    name: str = "{label}_{index:03d}",
    formats: Sequence[str] = ("jpg",),
) -> Path:
    """Writes a small image-folder dataset, ``root/<class>/<name>.<format>``; the one generator the tests share.

    Every image is its class colour plus noise, so classes are learnable and no two files are identical.

    Args:
        root: the dataset folder (created).
        per_class: images per class, or a mapping from class name to its count (then ``classes`` is ignored).
        classes: class names; one without a colour in ``CLASS_COLOURS`` gets a random one.
        seed: seeds the noise (and the colours of unknown classes).
        size: (width, height) of every image, or a sequence of sizes taken in turn (image ``i`` of each class
            gets ``size[i % len(size)]``), such as ``ODD_SIZES``.
        name: format string for the file-name stem, with ``{label}`` and ``{index}``, such as ``ODD_NAME``.
        formats: file suffixes ("jpg", "png") taken in turn, like ``size``.

    Returns:
        ``root``.
    """
    counts = dict(per_class) if isinstance(per_class, Mapping) else {label: per_class for label in classes}
    sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(each) for each in size]
    rng = np.random.default_rng(seed)
    for label, count in counts.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(CLASS_COLOURS.get(label, rng.integers(0, 255, 3)), dtype=np.float32)
        for index in range(count):
            width, height = sizes[index % len(sizes)]
            suffix = formats[index % len(formats)]
            noise = rng.normal(0, 40, (height, width, 3))
            image = Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))
            path = folder / f"{name.format(label=label, index=index)}.{suffix}"
            image.save(path, **({"quality": 90} if suffix in ("jpg", "jpeg") else {}))
    return root


def rows_for(folder: Path) -> list[dict]:
    """Split-style rows (path, label, sha256, recipe) for every image of a dataset folder, sorted by path."""
    rows = []
    for path in sorted(path for path in folder.glob("*/*") if path.suffix in IMAGE_SUFFIXES):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append({"path": str(path.relative_to(folder)), "label": path.parent.name, "sha256": digest, "recipe": ""})
    return rows


def _merge(target: dict, values: dict) -> None:
    """Deep-merges ``values`` into ``target`` (nested sections keep their other keys)."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


SMALL_PARAMS = {
    "download": {"sha256": "", "min_images_per_class": 3},
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"copies": 1, "preview_images": 2},
    "extract_features": {
        "backbone": "mobilenet_v2",
        "alpha": 0.35,
        "weights": "none",
        "image_size": 32,
        "batch_size": 8,
    },
}


# The DVC projects run Keras backbones on the Keras engine and export no TFLite model: each TFLite
# conversion costs ~15 s per stage run (a full small pipeline: ~60 s -> ~30 s). The conversions are
# tested where they are the subject (test_extract_features, test_tflite_backbones, test_export_predict),
# and test_dvc_pipeline runs the default engine (auto) through DVC once.
PROJECT_PARAMS = {"extract_features": {"engine": "keras"}, "export": {"tflite": False}}


class Project:
    """A temporary DVC project; ``run`` runs a command in it with the test's environment."""

    def __init__(self, root: Path):
        self.root = root
        self.environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(self, *command: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(
            command, cwd=self.root, env=self.environment, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
            )
        return result

    def dvc(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(Path(sys.executable).parent / "dvc"), *arguments, check=check)

    def set_params(self, **sections: dict) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        for name, values in sections.items():
            _merge(params.setdefault(name, {}), values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def restore(self) -> None:
        """The workspace as committed: params, lock file, metrics and the DVC outputs they name.

        ``dvc exp run`` leaves the experiment it ran in the workspace; this starts the next from HEAD.
        """
        self.run("git", "checkout", "--", "params.yaml", "dvc.lock", "metrics")
        self.dvc("checkout", "--force", "-q")

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message, "--allow-empty")


def make_project(tmp_path: Path) -> Project:
    """A git + DVC project with a generated dataset as ``download.source`` and small params."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("stages", "src"):
        shutil.copytree(REPOSITORY_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPOSITORY_ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPOSITORY_ROOT / "params.yaml", root / "params.yaml")
    project = Project(root)
    write_dataset(tmp_path / "photos")
    project.set_params(**SMALL_PARAMS)
    project.set_params(**PROJECT_PARAMS)
    project.set_params(
        download={"source": str(tmp_path / "photos")}, extract_features={"cache_dir": str(tmp_path / "embedding-cache")}
    )
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    project.commit("project")
    return project


def extract_features_command(
    *,
    images: str = "data/raw/images",
    splits: str = "data/splits",
    augmented: str = "data/augmented/train.csv",
    out: str = "data/features",
    metrics: str = "metrics/extract_features.json",
) -> list[str]:
    """The extract_features stage as dvc.yaml runs it (this interpreter, this repository's script)."""
    script = REPOSITORY_ROOT / "stages" / "extract_features.py"
    paths = {"images": images, "splits": splits, "augmented": augmented, "out": out, "metrics": metrics}
    return [sys.executable, str(script)] + [part for flag, path in paths.items() for part in (f"--{flag}", path)]
