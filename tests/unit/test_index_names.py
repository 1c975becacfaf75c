"""One rule for names (issue 14, item 6) and tiny images refused with their reason (item 7).

Class folders whose names later stages cannot carry are refused by download with one message
naming each (escaped); files with such names are excluded as ``bad-name``; nothing strips names.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPOSITORY_ROOT
from transferlab.core import params
from transferlab.data import download, index, split, tables

DEFAULTS = params.DownloadParams()
CHECKS = dict(min_image_side=DEFAULTS.min_image_side, max_image_pixels=DEFAULTS.max_image_pixels, max_files=1000)


def save_images(folder: Path | bytes, count: int, *, size=(40, 32), seed=0, mode="RGB") -> None:
    """``count`` distinct PNGs in ``folder`` (a path, or bytes for names that are not UTF-8)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        name = os.path.join(folder, b"%d.png" % number if isinstance(folder, bytes) else f"{number}.png")
        Image.fromarray(pixels, mode).save(name, format="PNG")


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def all_printable(text: str) -> bool:
    return all(character.isprintable() or character == "\n" for character in text) and "\x1b" not in text


# ---------------------------------------------------------------------------------- class folders


@pytest.mark.parametrize(
    ("name", "shown", "why"),
    [
        ("dogs ", "'dogs '", "starts or ends with whitespace"),
        (" dogs", "' dogs'", "starts or ends with whitespace"),
        ("\u3000dogs", r"'\u3000dogs'", "starts or ends with whitespace"),
        ("new\nline", r"'new\x0aline'", "holds control characters"),
        ("tab\there", r"'tab\x09here'", "holds control characters"),
        ("\x1b[31mred\x1b[0m", r"'\x1b[31mred\x1b[0m'", "holds control characters"),
        (
            "para\u2029graph",
            r"'para\u2029graph'",
            "holds control characters (newline, tab, terminal escape codes) or line",
        ),
        (b"caf\xe9", r"'caf\xe9'", "is not valid UTF-8"),
    ],
)
def test_a_class_folder_name_later_stages_cannot_carry_is_refused(tmp_path, name, shown, why):
    save_images(tmp_path / "cats", 5)
    save_images(os.path.join(os.fsencode(tmp_path), name) if isinstance(name, bytes) else tmp_path / name, 5, seed=1)
    with pytest.raises(ValueError) as refused:
        list(index.index_rows(tmp_path, workers=1, **CHECKS))
    message = str(refused.value)
    assert f"class folder name(s) that later stages cannot use: {shown} ({why}" in message
    assert "rename the folder" in message and "'cats'" not in message
    assert all_printable(message)  # no escape code, newline or stray byte reaches the terminal


def test_every_refused_class_folder_is_named_in_one_message(tmp_path):
    for name in ("ok", "bad ", "worse\x07"):
        save_images(tmp_path / name, 5)
    with pytest.raises(ValueError, match=r"'bad ' \(starts or ends .*\), 'worse\\x07' \(holds control"):
        list(index.index_rows(tmp_path, workers=1, **CHECKS))


def test_the_download_stage_refuses_escape_codes_without_printing_them(tmp_path):
    source = tmp_path / "photos"
    save_images(source / "cats", 5)
    save_images(source / "\x1b[2J\x1b[31mdogs", 5, seed=1)
    workspace = tmp_path / "repo"
    workspace.mkdir()
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    (workspace / "experiment.yaml").write_text(yaml.safe_dump({"download": {"source": str(source), "sha256": ""}}))
    result = run_download_stage(workspace, "experiment.yaml")
    assert result.returncode == 1, result.stderr
    assert r"'\x1b[2J\x1b[31mdogs' (holds control characters" in result.stderr
    assert "\x1b" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    raw = workspace / "data" / "raw"
    assert not raw.exists() or sorted(os.listdir(raw)) == []  # nothing half-written, no temporaries


def run_download_stage(workspace: Path, params_file: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPOSITORY_ROOT / "stages" / "download.py"), "--images", "data/raw/images"]
    command += ["--index", "data/raw/index.csv", "--metrics", "metrics/download.json", "--params", params_file]
    return subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------- files


def test_files_with_unusable_names_are_excluded_as_bad_name_and_the_rest_downloads(tmp_path):
    save_images(tmp_path / "cats", 5)
    save_images(tmp_path / "dogs", 5, seed=1)
    cats = os.fsencode(tmp_path / "cats")
    for number, bad in enumerate([b"caf\xe9.png", b"esc\x1b[2J.png", b"new\nline.png", b"sub\x07/deep.png"]):
        os.makedirs(os.path.dirname(os.path.join(cats, bad)), exist_ok=True)
        Path(os.fsdecode(os.path.join(cats, bad))).write_bytes(png_bytes(10 + number))
    rows = list(index.index_rows(tmp_path, workers=2, **CHECKS))
    bad = {row.path: row for row in rows if row.status == index.BAD_NAME}
    assert sorted(bad) == [
        "cats/caf\\xe9.png",
        "cats/esc\\x1b[2J.png",
        "cats/new\\x0aline.png",
        "cats/sub\\x07/deep.png",
    ]
    assert bad["cats/caf\\xe9.png"].label == "cats" and "not valid UTF-8" in bad["cats/caf\\xe9.png"].detail
    assert "control characters" in bad["cats/new\\x0aline.png"].detail
    assert sum(row.status == "ok" for row in rows) == 10

    tables.write_index(rows, tmp_path / "index.csv")  # a UTF-8 CSV, one line per row
    assert len((tmp_path / "index.csv").read_text(encoding="utf-8").splitlines()) == len(rows) + 1
    assert [row["path"] for row in tables.read_index(tmp_path / "index.csv")] == [row.path for row in rows]
    index.check_classes(rows, min_images_per_class=5, classes=["cats", "dogs"])
    metrics = download.summarize(rows, source="s", archive_sha256=None, seconds=0.0)
    assert metrics["excluded"]["bad-name"] == 4 and metrics["images"] == 10


def test_a_link_with_an_unusable_name_is_written_escaped(tmp_path):
    row = tables.IndexRow("cats/l\x1bnk.jpg", "cats", "", None, None, index.LINK, "symbolic link to caf\udce9")
    (escaped,) = [
        r
        for r in index.index_rows(make_two_classes(tmp_path), workers=1, extra_rows=[row], **CHECKS)
        if r.status == index.LINK
    ]
    assert (escaped.path, escaped.detail) == ("cats/l\\x1bnk.jpg", "symbolic link to caf\\xe9")


def make_two_classes(root: Path) -> Path:
    save_images(root / "cats", 5)
    save_images(root / "dogs", 5, seed=1)
    return root


def test_spaces_inside_and_unicode_names_are_kept_exactly_by_every_stage(tmp_path):
    save_images(tmp_path / "sea lions", 5)
    save_images(tmp_path / "café", 5, seed=1)
    (tmp_path / "café" / " padded name .png").write_bytes(png_bytes(20))
    rows = list(index.index_rows(tmp_path, workers=1, **CHECKS))
    assert all(row.status == "ok" for row in rows)
    tables.write_index(rows, tmp_path / "index.csv")
    result = split.split_index(tables.read_index(tmp_path / "index.csv"), val_fraction=0.2, test_fraction=0.2, seed=1)
    paths = [row["path"] for name in split.SPLIT_NAMES for row in result.splits()[name]]
    assert "café/ padded name .png" in paths  # not stripped: the file exists under exactly this name
    assert all((tmp_path / path).is_file() for path in paths)
    assert {row["label"] for row in result.train} == {"sea lions", "café"}


def test_printable_escapes_only_what_a_terminal_could_act_on():
    assert index.printable("roses/été 2.jpg") == "roses/été 2.jpg"
    assert index.printable("a\x1b[31mb\n\tc\x7f\u200b\u2028") == r"a\x1b[31mb\x0a\x09c\x7f\u200b\u2028"
    assert index.printable("caf\udce9\\x") == r"caf\xe9\\x"  # a stray byte; a real backslash is doubled
    assert index.name_problem("roses") is None and index.name_problem("sea lions") is None
    assert index.name_problem(" padded ", whole=False) is None


# ---------------------------------------------------------------------------------- tiny images


def test_a_dataset_of_28x28_digits_passes_with_the_default_params(tmp_path):
    for digit in range(3):
        save_images(tmp_path / str(digit), 6, size=(28, 28), seed=digit, mode="L")
    rows = list(index.index_rows(tmp_path, workers=1, **CHECKS))
    assert {row.status for row in rows} == {"ok"}
    index.check_classes(rows, min_images_per_class=DEFAULTS.min_images_per_class, classes=["0", "1", "2"])


def test_tiny_images_are_refused_naming_the_reason_per_class_and_the_param(tmp_path):
    for digit in range(3):
        save_images(tmp_path / str(digit), 6, size=(4, 4), seed=digit)
    (tmp_path / "2" / "notes.txt").write_text("not an image")
    rows = list(index.index_rows(tmp_path, workers=1, **CHECKS))
    with pytest.raises(ValueError) as refused:
        index.check_classes(
            rows,
            min_images_per_class=5,
            classes=["0", "1", "2"],
            source="digits.tgz",
            min_image_side=DEFAULTS.min_image_side,
            max_image_pixels=DEFAULTS.max_image_pixels,
        )
    message = str(refused.value)
    assert "digits.tgz has fewer than 2 classes with usable images" in message
    per_class = (
        "0: 0 (excluded: 6 too-small); 1: 0 (excluded: 6 too-small); 2: 0 (excluded: 6 too-small, 1 not-an-image)"
    )
    dominant = "Most excluded files (18 of 19) are too-small: their shorter side is below download.min_image_side=8"
    assert per_class in message and dominant in message
    assert "lower download.min_image_side" in message


def test_a_class_too_small_after_exclusions_names_the_param_too(tmp_path):
    save_images(tmp_path / "big", 6, size=(40, 40))
    save_images(tmp_path / "huge", 2, size=(40, 40), seed=1)
    save_images(tmp_path / "huge" / "scans", 4, size=(120, 100), seed=2)
    rows = list(index.index_rows(tmp_path, workers=1, min_image_side=8, max_image_pixels=10_000, max_files=100))
    with pytest.raises(ValueError) as refused:
        index.check_classes(rows, min_images_per_class=5, classes=["big", "huge"], max_image_pixels=10_000)
    message = str(refused.value)
    assert "class 'huge' has 2 usable image(s) (excluded: 4 too-large)" in message
    assert "more pixels than download.max_image_pixels=10000; raise download.max_image_pixels" in message
