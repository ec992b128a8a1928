"""Strict typed configs: defaults, errors that name the dotted key, overrides, paths, saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flareseg.cli import main
from flareseg.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sub" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_hold_the_reference_settings():
    config = load_config()
    coarse, fine = config.prepare.grids["coarse"], config.prepare.grids["fine"]
    assert (coarse.region, coarse.size, fine.region, fine.size) == ("volume", (160,) * 3, "labels", (192,) * 3)
    assert fine.margin_mm == 20.0 and config.data.hu_window == (-325.0, 325.0)
    assert len(config.data.labels) == 13 and config.data.labels[0] == "liver"


def test_shipped_config_loads_and_matches_the_defaults():
    config = load_config(REPO / "configs" / "data_prepare.yaml")
    defaults = Config()
    assert config.data == defaults.data
    assert config.prepare.grids == defaults.prepare.grids
    assert config.prepare.images == (REPO / "dataset" / "imagesTr").resolve()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prepare:\n  workrs: 3\n", "unknown config key 'prepare.workrs'; did you mean 'prepare.workers'?"),
        (
            "prepare:\n  grids:\n    coarse:\n      region: volume\n      sise: [1, 2, 3]\n",
            "'prepare.grids.coarse.sise'; did you mean 'prepare.grids.coarse.size'?",
        ),
        ("prepar:\n  workers: 3\n", "unknown config key 'prepar'; did you mean 'prepare'?"),
        ("prepare:\n  workers: two\n", "'prepare.workers' expects an integer, got str 'two'"),
        ("prepare:\n  workers: 2.5\n", "'prepare.workers' expects an integer"),
        ("prepare:\n  overwrite: 1\n", "'prepare.overwrite' expects true or false"),
        (
            "prepare:\n  grids:\n    coarse:\n      region: volume\n      size: [160, 160]\n",
            "'prepare.grids.coarse.size' expects 3 values",
        ),
        (
            "prepare:\n  grids:\n    coarse:\n      region: volume\n      size: [160, 160, x]\n",
            "'prepare.grids.coarse.size[2]' expects an integer",
        ),
        ("prepare:\n  label_resampling: nearst\n", "did you mean 'nearest'?"),
        ("prepare:\n  images: 5\n", "'prepare.images' expects a path"),
        ("prepare: 3\n", "'prepare' must be a mapping"),
        ("data:\n  hu_window: [300, -300]\n", "'data.hu_window' must be [low, high]"),
        (
            "prepare:\n  grids:\n    coarse:\n      region: volume\n      size: [8, 8, 8]\n      spacing: [2, 2, 3]\n",
            "set exactly one of 'prepare.grids.coarse.size'",
        ),
        ("prepare:\n  grids:\n    fine:\n      size: [8, 8, 8]\n", "'prepare.grids.fine.region' must be set"),
        ("prepare:\n  grids: {}\n", "'prepare.grids' must name at least one stage grid"),
        ("prepare:\n  grids:\n    Fine:\n      region: labels\n      size: [8, 8, 8]\n", "use lower-case letters"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("prepare: [unclosed\n", "invalid YAML"),
    ],
)
def test_errors_name_the_full_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert message in str(caught.value)


def test_relative_paths_are_relative_to_the_yaml_file(tmp_path):
    path = _write(tmp_path, "prepare:\n  images: ../raw/images\n  out: /abs/out\n")
    config = load_config(path)
    assert config.prepare.images == (tmp_path / "raw" / "images").resolve()
    assert config.prepare.out == Path("/abs/out")


def test_overrides_are_typed_and_strict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "prepare:\n  workers: 3\n")
    config = load_config(
        path,
        [
            "prepare.workers=5",
            "prepare.grids.coarse.size=null",
            "prepare.grids.coarse.spacing=[2, 2, 3]",
            "prepare.out=relative/out",
        ],
    )
    assert config.prepare.workers == 5
    assert load_config(path, ["train.lr=3e-3"]).train.lr == 0.003  # YAML 1.1 reads 3e-3 as a string
    assert config.prepare.grids["coarse"].size is None and config.prepare.grids["coarse"].spacing == (2.0, 2.0, 3.0)
    assert config.prepare.out == (tmp_path / "relative" / "out").resolve()  # command line: relative to cwd
    for bad, message in [
        ("prepare.wrkers=1", "did you mean 'prepare.workers'?"),
        ("prepare.workers", "expects key=value"),
        ("prepare.workers=abc", "expects an integer"),
        ("prepare.workers.x=1", "is a value, not a section"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
            load_config(path, [bad])


def test_saved_config_reloads_to_the_same_config(tmp_path):
    config = load_config(None, ["prepare.workers=7", f"prepare.out={tmp_path / 'out'}", "data.labels=[a, b, lesion]"])
    saved = save_config(config, tmp_path / "run")
    assert saved.name == "config.yaml" and not list((tmp_path / "run").glob(".*tmp*"))
    assert load_config(saved) == config
    assert yaml.safe_load(saved.read_text())["prepare"]["workers"] == 7


def test_cli_reports_config_errors_and_prints_resolved_config(tmp_path, capsys):
    assert main(["config", "--set", "prepare.worker=2"]) == 2
    assert "did you mean 'prepare.workers'?" in capsys.readouterr().err
    assert main(["config", "--set", "prepare.workers=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["prepare"]["workers"] == 4


def test_stage_grids_are_named_and_set_by_their_keys():
    config = load_config(
        None, ["prepare.grids.fine.margin_mm=12", "prepare.grids.lesion={region: labels, spacing: [2, 1, 1]}"]
    )
    assert list(config.prepare.grids) == ["coarse", "fine", "lesion"] and config.prepare.grids["fine"].margin_mm == 12
    assert config.grid("lesion").fixed_spacing and not config.uses_patches("coarse")
    with pytest.raises(
        ConfigError, match="'prepare.grids.organs' is not an entry of 'prepare.grids' \\(entries: coarse, fine"
    ):
        load_config(None, ["prepare.grids.organs.size=[8,8,8]"])
    with pytest.raises(ConfigError, match="no prepared grid is named 'organs'"):
        config.grid("organs")
    with pytest.raises(ConfigError, match="'train.stage' names a stage 'Fine'"):
        load_config(None, ["train.stage=Fine"])


def test_moved_keys_say_where_they_went(tmp_path):
    with pytest.raises(ConfigError, match="'prepare.coarse'; it is now prepare.grids.coarse \\(with region: volume\\)"):
        load_config(_write(tmp_path, "prepare:\n  coarse:\n    size: [8, 8, 8]\n"))
    with pytest.raises(ConfigError, match="'train.fine_margin_jitter_mm'; it is now train.margin_jitter_mm"):
        load_config(None, ["train.fine_margin_jitter_mm=5"])


def test_each_stage_has_its_component_rule_over_the_shorthand():
    predict = load_config(
        None,
        [
            "predict.keep_components_per_label={2: 2}",
            "predict.postprocess={lesion: {min_volume_mm3: 0, keep_components_per_label: {14: 0}}}",
        ],
    ).predict
    roi, organs, lesion = (
        predict.postprocess_for(name, finds_region=name == "roi") for name in ("roi", "organs", "lesion")
    )
    assert (roi.min_volume_mm3, organs.min_volume_mm3, lesion.min_volume_mm3) == (1000.0, 2000.0, 0.0)
    assert organs.keep_components == lesion.keep_components == 1
    assert organs.keep_components_per_label == {2: 2} and lesion.keep_components_per_label == {2: 2, 14: 0}
    with pytest.raises(ConfigError, match="'predict.postprocess.lesion.keep_components' must be >= 1"):
        load_config(None, ["predict.postprocess.lesion={keep_components: 0}"])
