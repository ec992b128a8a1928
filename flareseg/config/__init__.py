"""Typed configuration: the schema (every default in one place) and strict YAML loading."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from flareseg.atomic import atomic_write_text
from flareseg.config.loader import ConfigError, apply_override, build_config, read_yaml, set_value, to_plain
from flareseg.config.schema import FLARE_ORGANS, Config

CONFIG_FILE_NAME = "config.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None = all defaults), apply `key.sub=value` overrides, validate, return it."""
    if path is None:
        config = build_config(Config, {}, Path.cwd())
    else:
        path = Path(path)
        config = build_config(Config, read_yaml(path), path.parent.resolve())
    for assignment in overrides:
        apply_override(config, assignment, Path.cwd())
    return config.validate()


def save_config(config: Config, folder: str | os.PathLike) -> Path:
    """Write the resolved config (absolute paths, every key) into `folder`/config.yaml, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = "# Resolved flareseg config: every key, as this run used it.\n"
    text += yaml.safe_dump(to_plain(config), sort_keys=False, default_flow_style=None)
    return atomic_write_text(folder / CONFIG_FILE_NAME, text)


__all__ = ["FLARE_ORGANS", "Config", "ConfigError", "load_config", "save_config", "set_value", "to_plain"]
