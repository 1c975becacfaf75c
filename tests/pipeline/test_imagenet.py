"""`transferlab imagenet`: the course's first example, offline, with the shared ImageNet weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import WEIGHTS, require_mirror
from transferlab import cli

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

BUILDINGS = {
    "palace",
    "monastery",
    "temple",
    "stupa",
    "church",
    "castle",
    "bell_cote",
    "dome",
    "mosque",
    "boathouse",
    "pagoda",
    "birdhouse",
}
CLASS_INDEX = WEIGHTS / "imagenet_class_index.json"


def sample_photo(name: str) -> Path:
    from sklearn.datasets import _base  # the sample images ship inside scikit-learn

    return Path(_base.__file__).parent / "images" / name


@pytest.mark.parametrize(
    "arguments, weights_file, expected_first",
    [
        (["--backbone", "mobilenet_v2"], "mobilenet_v2_1.0_224_imagenet_dequant.h5", ("palace", 0.526)),
        (["--backbone", "mobilenet", "--alpha", "0.25"], "mobilenet_v1_0.25_224_imagenet.h5", ("stupa", 0.302)),
    ],
)
def test_china_photo_is_a_palace_or_temple_like_building(arguments, weights_file, expected_first, capsys):
    weights = require_mirror(WEIGHTS / weights_file)
    china = sample_photo("china.jpg")
    code = cli.main(
        [
            "imagenet",
            str(china),
            *arguments,
            "--weights",
            str(weights),
            "--class-index",
            str(require_mirror(CLASS_INDEX)),
            "--json",
        ]
    )
    assert code == 0
    [result] = json.loads(capsys.readouterr().out)
    top = [item["class"] for item in result["predictions"]]
    assert len(top) == 5 and BUILDINGS & set(top)
    # ../shared/weights/MANIFEST.md, "Predictions on sklearn sample photos" (centre crop, bilinear 224)
    assert (top[0], round(result["predictions"][0]["confidence"], 3)) == expected_first


def test_a_no_top_weights_file_and_an_unreadable_photo_are_reported(tmp_path, capsys):
    no_top = require_mirror(WEIGHTS / "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5")
    code = cli.main(
        ["imagenet", str(sample_photo("china.jpg")), "--weights", str(no_top), "--class-index", str(CLASS_INDEX)]
    )
    assert code == 2
    assert "holds no 1000-class top" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a photo")
    weights = require_mirror(WEIGHTS / "mobilenet_v2_1.0_224_imagenet_dequant.h5")
    code = cli.main(
        [
            "imagenet",
            str(tmp_path / "notes.txt"),
            str(sample_photo("flower.jpg")),
            "--weights",
            str(weights),
            "--class-index",
            str(CLASS_INDEX),
            "--top",
            "3",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "notes.txt: not an image" in err
    assert "flower.jpg" in out and "1. daisy 0.158" in out
