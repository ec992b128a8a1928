"""Config faults: non-finite numbers and keys given twice were accepted silently; both are one-line errors now."""

from __future__ import annotations

from pathlib import Path

import pytest

from flareseg.cli import main
from flareseg.config import ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  lr: .inf\n", "'train.lr'"),
        ("train:\n  lr: .nan\n", "'train.lr'"),
        ("train:\n  grad_clip: -.inf\n", "'train.grad_clip'"),  # float | null: null means no clipping, not .inf
        ("data:\n  hu_window: [-325, .inf]\n", "'data.hu_window[1]'"),
        ("distill:\n  temperature: .NaN\n", "'distill.temperature'"),
    ],
)
def test_non_finite_numbers_in_yaml_are_rejected(tmp_path, text, key):
    with pytest.raises(ConfigError, match="must be a finite number") as caught:
        load_config(_write(tmp_path, text))
    assert key in str(caught.value)


@pytest.mark.parametrize("value", [".inf", ".nan", "-.Inf"])
def test_non_finite_numbers_in_overrides_are_rejected(value):
    with pytest.raises(ConfigError, match=r"'train\.lr' must be a finite number"):
        load_config(None, [f"train.lr={value}"])


def test_finite_numbers_still_load():
    config = load_config(None, ["train.lr=3e-4", "train.grad_clip=null", "data.hu_window=[-100, 200.5]"])
    assert config.train.lr == 3e-4 and config.train.grad_clip is None and config.data.hu_window == (-100.0, 200.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: 1e-2\n  epochs: 5\n  lr: 1e-3\n", "line 4: duplicate key 'train.lr' (first given on line 2"),
        ("train:\n  lr: 1e-2\nmodel:\n  dropout: 0\ntrain:\n  epochs: 3\n", "line 5: duplicate key 'train'"),
        ("train:\n  loss:\n    name: dice\n    name: dice_bce\n", "line 4: duplicate key 'train.loss.name'"),
        ("prepare:\n  label_map: {1: 1, 2: 2, 1: 3}\n", "line 2: duplicate key 'prepare.label_map.1'"),
    ],
)
def test_duplicate_yaml_keys_are_rejected_with_line_and_dotted_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_duplicate_keys_in_an_override_value_are_rejected():
    with pytest.raises(ConfigError, match=r"duplicate key 'prepare\.label_map\.1'"):
        load_config(None, ["prepare.label_map={1: 1, 1: 2}"])


def test_aliases_and_merge_keys_are_not_duplicates(tmp_path):
    # one anchored mapping used twice, and a merge key (<<) beside an explicit key that overrides it: valid YAML
    grids = "  grids:\n    coarse: &grid {region: labels, size: [24, 24, 24]}\n    fine: *grid\n"
    text = f"prepare:\n{grids}train:\n  <<: {{lr: 0.01, epochs: 2}}\n"
    config = load_config(_write(tmp_path, text + "  epochs: 3\n"))
    assert config.prepare.grids["coarse"].size == config.prepare.grids["fine"].size == (24, 24, 24)
    assert config.train.lr == 0.01 and config.train.epochs == 3


def test_cli_reports_each_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, "train:\n  lr: .inf\n")
    assert main(["config", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'train.lr' must be a finite number" in error
    path = _write(tmp_path, "train:\n  epochs: 3\n  epochs: 4\n")
    assert main(["config", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "line 3: duplicate key 'train.epochs'" in error
