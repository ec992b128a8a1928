"""The README stays true to the code: every config key is documented, CI runs the README's test command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flareseg.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def _leaf_keys(node, prefix=""):
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key in _leaf_keys(Config()) if f"| `{key}` |" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert command in readme and command in (REPO / ".ci" / "run").read_text()
    assert "torch==2.13.0" in (REPO / ".ci" / "run").read_text()


MAPPINGS = ("prepare.grids", "predict.postprocess")  # keys whose value is a mapping of named sections


def _flatten(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in MAPPINGS:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize(
    ("name", "sections"),
    [
        ("data_prepare.yaml", ("data", "prepare")),
        ("coarse.yaml", ("data", "model", "train")),
        ("fine.yaml", ("data", "model", "train")),
        ("predict.yaml", ("predict",)),
    ],
)
def test_shipped_yaml_names_every_key_of_its_sections(name, sections):
    shipped = sorted(_flatten(yaml.safe_load((REPO / "configs" / name).read_text())))
    expected = sorted(key for key in _leaf_keys(Config()) if key.split(".")[0] in sections)
    assert shipped == expected


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) >= 16
    for path in paths:
        load_config(path)


def test_flare_system_configs_describe_their_systems():
    flare21 = load_config(REPO / "configs" / "flare21" / "fine.yaml")
    assert flare21.num_classes == 4 and flare21.model.name == "efficient_segnet"
    roi, organs, lesion = (load_config(REPO / "configs" / "flare23" / f"{n}.yaml") for n in ("roi", "organs", "lesion"))
    assert roi.num_classes == 1 and (roi.train.stage, organs.train.stage, lesion.train.stage) == (
        "roi",
        "organs",
        "lesion",
    )
    prepared = load_config(REPO / "configs" / "flare23" / "data_prepare.yaml")
    assert list(prepared.prepare.grids) == ["roi", "organs"] and prepared.uses_patches("organs")
    assert list(load_config(REPO / "configs" / "flare23" / "data_prepare_lesion.yaml").prepare.grids) == ["lesion"]
    assert lesion.class_label_groups[0] == [14] and lesion.train.loss.dynamic_weights
    chain = load_config(REPO / "configs" / "flare23" / "predict.yaml").predict
    assert [path.parent.name for path in chain.stages] == ["roi", "organs", "lesion"]
