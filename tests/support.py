"""Test support: a small image-folder dataset, and a temporary DVC project that runs it.

The project is a fresh git + DVC repository holding this repository's dvc.yaml, stages/ and
src/ (the stages' code deps) with a shrunken params.yaml: random-init backbones at 32 px, tiny
heads. Stages run with this interpreter's environment first on PATH, as in the README.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from conftest import REPOSITORY_ROOT

CLASS_COLOURS = {"daisy": (230, 230, 90), "roses": (200, 40, 60), "tulips": (230, 120, 170)}


def write_dataset(root: Path, *, per_class: int = 12, classes=tuple(CLASS_COLOURS), seed: int = 0, size=(48, 40)) -> Path:
    """Writes ``per_class`` distinct JPEGs per class: a class colour plus noise, so classes are learnable."""
    rng = np.random.default_rng(seed)
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(CLASS_COLOURS.get(label, rng.integers(0, 255, 3)), dtype=np.float32)
        for index in range(per_class):
            noise = rng.normal(0, 40, (size[1], size[0], 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{label}_{index:03d}.jpg", quality=90)
    return root


def rows_for(folder: Path) -> list[dict]:
    """Split-style rows (path, label, sha256, recipe) for every JPEG of a dataset folder."""
    rows = []
    for path in sorted(folder.glob("*/*.jpg")):
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
    "extract_features": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": "none", "image_size": 32, "batch_size": 8},
}


class Project:
    """A temporary DVC project; ``run`` runs a command in it with the test's environment."""

    def __init__(self, root: Path):
        self.root = root
        self.environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(self, *command: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=self.root, env=self.environment, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        return result

    def dvc(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(Path(sys.executable).parent / "dvc"), *arguments, check=check)

    def set_params(self, **sections: dict) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        for name, values in sections.items():
            _merge(params.setdefault(name, {}), values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

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
    project.set_params(download={"source": str(tmp_path / "photos")}, extract_features={"cache_dir": str(tmp_path / "embedding-cache")})
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    project.commit("project")
    return project
