"""params.yaml validation: every failure names the key and what is allowed."""

from __future__ import annotations

import pytest

from conftest import REPOSITORY_ROOT
from transferlab.core import params, paths


def test_the_repository_params_file_is_valid_and_complete():
    raw = params.read_params_file(REPOSITORY_ROOT / "params.yaml")
    assert set(raw) == set(params.SECTIONS)
    for name, section in raw.items():
        loaded = params.parse_section(name, section)
        assert set(section) == set(type(loaded).model_fields), f"params.yaml section {name} must list every key"


def test_every_key_in_params_yaml_is_commented():
    """Each key with a value has a comment above it (two related keys may share one)."""
    lines = (REPOSITORY_ROOT / "params.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        key, colon, value = line.strip().partition(":")
        if not line.startswith("  ") or line.strip().startswith("#") or not colon or not value.strip():
            continue
        above = [lines[number - 1].strip(), lines[number - 2].strip()]
        assert above[0].startswith("#") or above[1].startswith("#"), (
            f"params.yaml line {number + 1} ({key}) has no comment"
        )


@pytest.mark.parametrize(
    "section,raw,expected",
    [
        ("base", {"seed": "42"}, r"base\.seed: Input should be a valid integer"),
        ("base", {"seed": -1}, r"base\.seed: Input should be greater than or equal to 0"),
        ("base", {"sede": 1}, r"base\.sede: unknown key; allowed keys: seed"),
        ("split", {"val_fraction": 1.0}, r"split\.val_fraction: Input should be less than 1"),
        ("split", {"val_fraction": 0.6, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be < 1"),
        ("download", {"sha256": "abc"}, r"download\.sha256: must be empty or 64 hexadecimal"),
        ("download", {"retries": 100}, r"download\.retries: Input should be less than or equal to 10"),
        ("augment", {"flip": "yes"}, r"augment\.flip: Input should be a valid boolean"),
        (
            "extract_features",
            {"engine": "onnx"},
            r"extract_features\.engine: Input should be 'auto', 'keras' or 'tflite'",
        ),
        (
            "extract_features",
            {"batch_size": 0},
            r"extract_features\.batch_size: Input should be greater than or equal to 1",
        ),
        ("extract_features", {"executor": "spark"}, r"extract_features\.executor: Input should be 'local' or 'ray'"),
        (
            "extract_features",
            {"cache_remote": "https://bucket/prefix"},
            r"extract_features\.cache_remote: must be empty \(local cache only\) or s3://BUCKET\[/PREFIX\]",
        ),
        ("extract_features", {"cache_remote": "s3://Team_Cache"}, r"extract_features\.cache_remote: must be empty"),
        ("extract_features", {"cache_remote": "s3://team-cache//x"}, r"extract_features\.cache_remote: must be empty"),
        ("extract_features", {"ray_workers": -1}, r"extract_features\.ray_workers: Input should be greater than or"),
        ("extract_features", {"storage_dtype": "int8"}, r"extract_features\.storage_dtype: Input should be 'float32'"),
        (
            "train_head",
            {"logistic": {"max_memory_gb": 0}},
            r"train_head\.logistic\.max_memory_gb: Input should be greater than 0",
        ),
        (
            "train_head",
            {"head": "svm"},
            r"train_head\.head: unknown head 'svm'; choose one of: dense, finetune, fusion, logistic, scratch",
        ),
        ("train_head", {"dense": {"unitz": 3}}, r"train_head\.dense\.unitz: unknown key; allowed keys: units, dropout"),
        ("train_head", {"seeds": 0}, r"train_head\.seeds: Input should be greater than or equal to 1"),
        ("train_head", {"seeds": 21}, r"train_head\.seeds: Input should be less than or equal to 20"),
        ("train_head", {"seeds": 2.0}, r"train_head\.seeds: Input should be a valid integer"),
        ("train_head", {"fusion": {"weight_step": 0.3}}, r"train_head\.fusion\.weight_step: .*must divide 1"),
        ("train_head", {"fusion": {"finetune": ["a", "a"]}}, r"train_head\.fusion\.finetune: .*list each member once"),
        ("train_head", {"fusion": {"finetune": "all"}}, r"train_head\.fusion\.finetune"),
        ("train_head", {"fusion": {"frozen": "both"}}, r"train_head\.fusion\.frozen: Input should be 'auto', 'sep"),
        ("train_head", {"finetune": {"schedule": "step"}}, r"train_head\.finetune\.schedule: Input should be"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(section, raw, expected):
    with pytest.raises(ValueError, match=expected):
        params.parse_section(section, raw)


def test_unknown_sections_and_files(tmp_path):
    (tmp_path / "params.yaml").write_text("base: {seed: 1}\ntrian_head: {}\n")
    with pytest.raises(ValueError, match="unknown section.*trian_head"):
        params.load_section("base", tmp_path / "params.yaml")
    with pytest.raises(ValueError, match="not found"):
        params.load_section("base", tmp_path / "missing.yaml")
    (tmp_path / "params.yaml").write_text("base: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        params.load_section("base", tmp_path / "params.yaml")


def test_floats_in_exponent_notation_and_loaded_sections_are_frozen(tmp_path):
    (tmp_path / "params.yaml").write_text("train_head:\n  dense: {learning_rate: 3e-4}\n")
    loaded = params.load_section("train_head", tmp_path / "params.yaml")
    assert loaded.dense.learning_rate == pytest.approx(0.0003)
    with pytest.raises(ValueError, match="frozen"):  # pydantic's ValidationError is a ValueError
        loaded.head = "dense"


def test_seeds_default_to_one_and_are_not_a_head_option():
    """train_head.seeds: 1 by default (today's single model); the loop reads it, no head's trainer gets it."""
    assert params.parse_section("train_head", {}).seeds == 1
    loaded = params.parse_section("train_head", {"head": "dense", "seeds": 20})
    assert loaded.seeds == 20 and "seeds" not in loaded.head_options()


def test_relative_paths_resolve_against_the_main_root_also_in_queued_experiments(tmp_path, monkeypatch):
    monkeypatch.delenv("TRANSFERLAB_ROOT", raising=False)
    root = tmp_path / "repo"
    queued = root / ".dvc" / "tmp" / "exps" / "tmpabc123"
    queued.mkdir(parents=True)
    (queued / "dvc.yaml").write_text("stages: {}\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    assert paths.repository_root(queued) == root
    assert paths.repository_root(root / "sub" if (root / "sub").mkdir() is None else root) == root
    monkeypatch.chdir(queued)
    assert paths.resolve_param_path("../shared/x.h5") == root / "../shared/x.h5"
    assert paths.resolve_param_path("/abs/x.h5") == paths.Path("/abs/x.h5")
    monkeypatch.setenv("TRANSFERLAB_ROOT", str(tmp_path))
    assert paths.resolve_param_path("a") == tmp_path / "a"


def test_fusion_settings_and_the_member_heads_options():
    """The fusion head gets its own keys plus the logistic and finetune settings its member heads train with."""
    loaded = params.parse_section(
        "train_head",
        {"head": "fusion", "fusion": {"finetune": [], "from_layer": {"mobilenet_v2": "block_14_expand"}}},
    )
    options = loaded.head_options()
    assert options["finetune"] == [] and options["from_layer"] == {"mobilenet_v2": "block_14_expand"}
    assert options["frozen"] == "auto" and options["weight_step"] == pytest.approx(0.1)
    assert options["logistic_options"] == loaded.logistic.model_dump()
    assert "from_layer" not in options["finetune_options"]  # per member, from fusion.from_layer
    assert options["finetune_options"]["epochs"] == loaded.finetune.epochs
    assert params.parse_section("train_head", {}).fusion.finetune == "auto"


def test_cache_remote_is_empty_or_an_s3_url_without_its_trailing_slash():
    assert params.parse_section("extract_features", {}).cache_remote == ""
    parsed = params.parse_section("extract_features", {"cache_remote": "s3://team-cache/embeddings/"})
    assert parsed.cache_remote == "s3://team-cache/embeddings"
    dotted = params.parse_section("extract_features", {"cache_remote": "s3://team.cache"})
    assert dotted.cache_remote == "s3://team.cache"
