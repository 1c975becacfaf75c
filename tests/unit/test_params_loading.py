"""Reading a params file defensively: alias bombs, long values, the real file name in messages."""

from __future__ import annotations

import pytest

from transferlab.core import params, stage


def alias_bomb(levels: int) -> str:
    """A few hundred bytes of params.yaml whose ``base.seed`` expands to 9**levels strings ("billion laughs")."""
    nested = ["&l0 [" + ",".join(["lol"] * 9) + "]"]
    nested += [f"&l{n} [" + ",".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return f"base: {{seed: [{', '.join(nested)}]}}\n"


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    bomb = tmp_path / "params.yaml"
    bomb.write_text(alias_bomb(6))  # 531441 values from about 500 bytes
    assert bomb.stat().st_size < 1000
    with pytest.raises(ValueError) as refused:
        params.load_section("base", bomb)
    message = str(refused.value)
    assert "aliases" in message and str(params.MAX_ALIAS_VALUES) in message and str(bomb) in message
    assert len(message) < 400  # the rejected value is never printed in full


def test_ordinary_aliases_still_work(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "train_head:\n  dense: {learning_rate: &rate 0.001}\n  finetune: {learning_rate: *rate}\n"
    )
    loaded = params.load_section("train_head", tmp_path / "params.yaml")
    assert loaded.dense.learning_rate == loaded.finetune.learning_rate == 0.001


def test_aliases_under_the_bound_are_read_and_the_rejected_value_is_shortened(tmp_path):
    (tmp_path / "params.yaml").write_text(alias_bomb(4))  # about 7400 values: read, then refused by the schema
    with pytest.raises(ValueError, match=r"base\.seed: Input should be a valid integer \(got \[\[") as refused:
        params.load_section("base", tmp_path / "params.yaml")
    assert len(str(refused.value)) < 2 * params.MAX_SHOWN_CHARACTERS


def test_a_long_list_written_out_is_not_an_alias_bomb(tmp_path):
    (tmp_path / "params.yaml").write_text(f"base: {{seed: {list(range(3 * params.MAX_ALIAS_VALUES))}}}\n")
    assert len(params.read_params_file(tmp_path / "params.yaml")["base"]["seed"]) == 3 * params.MAX_ALIAS_VALUES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base: &a {seed: [*a]}\n", "refers to a value that contains it"),
        ("base: {seed: " + "[" * 3000 + "]" * 3000 + "}\n", "nests its values too deeply"),
    ],
)
def test_self_references_and_deep_nesting_are_one_line_errors(tmp_path, text, expected):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ValueError, match=expected):
        params.load_section("base", tmp_path / "params.yaml")


def test_long_rejected_values_are_shortened(tmp_path):
    (tmp_path / "params.yaml").write_text(f"download: {{min_image_side: {'9' * 100_000}x}}\n")
    with pytest.raises(ValueError) as refused:
        params.load_section("download", tmp_path / "params.yaml")
    assert "download.min_image_side: Input should be a valid integer" in str(refused.value)
    assert len(str(refused.value)) < 2 * params.MAX_SHOWN_CHARACTERS
    nested = {"source": [[list(range(1000))] * 1000] * 1000}
    with pytest.raises(ValueError) as refused:
        params.parse_section("download", nested)
    assert "download.source" in str(refused.value) and len(str(refused.value)) < 2 * params.MAX_SHOWN_CHARACTERS


def test_messages_name_the_params_file_that_was_read(tmp_path, capsys):
    other = tmp_path / "experiment.yaml"
    other.write_text("download: {retries: -1}\n")
    with pytest.raises(ValueError, match=r"^\S*experiment\.yaml: invalid 'download' section") as refused:
        params.load_section("download", other)
    assert "params.yaml" not in str(refused.value)
    other.write_text("download: [1, 2]\n")
    with pytest.raises(ValueError, match=r"experiment\.yaml: section 'download' must be a mapping"):
        params.load_section("download", other)

    main = stage.define("demo", paths={}, sections=("download",))(lambda paths, download: None)
    with pytest.raises(SystemExit) as exited:
        main(["--params", str(other)])
    assert exited.value.code == 1
    assert "experiment.yaml: section 'download'" in capsys.readouterr().err


def test_a_params_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    (tmp_path / "params.yaml").write_bytes(b"base: {seed: 1}  # caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        params.load_section("base", tmp_path / "params.yaml")
