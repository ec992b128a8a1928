"""Strict loading of YAML into typed dataclasses.

Unknown keys and wrong types are errors that name the full dotted key and suggest the closest known key.
Relative paths in a YAML file are relative to that file; relative paths given on the command line
(`--set key=value`, `-o DIR`) are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key."""


def build_config(schema: type, data: dict | None, base_dir: Path, prefix: str = "") -> Any:
    """Build dataclass `schema` from a plain mapping, filling every missing key from the schema's defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"'{prefix.rstrip('.') or '<root>'}' must be a mapping of keys to values, got {_describe(data)}"
        )
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(schema, str(key), names, prefix)
        kwargs[key] = coerce(hints[key], value, base_dir, dotted)
    return schema(**kwargs)


def coerce(kind: Any, value: Any, base_dir: Path, key: str) -> Any:
    """Check `value` against the type annotation `kind` and convert it (lists to tuples, str to Path...)."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(option, value, base_dir, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(
            errors[0] if len(options) == 1 else f"'{key}' expects {_type_name(kind)}, got {_describe(value)}"
        )
    if dataclasses.is_dataclass(kind):
        return build_config(kind, value, base_dir, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = _suggest(str(value), [str(a) for a in args], "", quote=True)
            raise ConfigError(f"'{key}' must be one of {choices}, got {value!r}{hint}")
        return value
    if origin in (tuple, list, dict):
        return _coerce_container(kind, value, base_dir, key)
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"'{key}' expects a path (a string), got {_describe(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' expects true or false, got {_describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' expects an integer, got {_describe(value)}")
        return value
    if kind is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads "3e-3" as a string (YAML 1.1); YAML 1.2 and users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' expects a number, got {_describe(value)}")
        if not math.isfinite(value):  # YAML's .inf and .nan: no setting means them (null means "none")
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' expects a string, got {_describe(value)}")
        return value
    raise TypeError(f"config schema type {kind!r} of '{key}' is not supported")


def _coerce_container(kind: Any, value: Any, base_dir: Path, key: str) -> Any:
    """A list, tuple or dict value, item by item."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' expects a mapping, got {_describe(value)}")
        key_type, value_type = args
        return {
            coerce(key_type, k, base_dir, key): coerce(value_type, v, base_dir, f"{key}.{k}") for k, v in value.items()
        }
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"'{key}' expects a list ({_type_name(kind)}), got {_describe(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
        raise ConfigError(f"'{key}' expects {len(args)} values ({_type_name(kind)}), got {len(value)}: {value!r}")
    item_types = [args[0]] * len(value) if (origin is list or args[-1] is Ellipsis) else list(args)
    items = [coerce(t, v, base_dir, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
    return tuple(items) if origin is tuple else items


def apply_override(config: Any, assignment: str, base_dir: Path) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML ("160" -> 160)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. prepare.workers=4), got {assignment!r}")
    try:
        value = safe_load(text, f"--set {key}", key + ".") if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: cannot parse value {text!r} ({error.problem})") from None
    set_value(config, key, value, base_dir)


def set_value(config: Any, key: str, value: Any, base_dir: Path) -> None:
    """Set the field at dotted `key` in place, type-checked like a YAML value. A mapping of sections (such as
    prepare.grids) is entered by its keys: `prepare.grids.coarse.size` changes one entry, and the last part of a
    key may add an entry (`prepare.grids.lesion={region: labels, ...}`)."""
    parts = key.split(".")
    node, kind = config, type(config)
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth]) + ("." if depth else "")
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            key_type, kind = typing.get_args(kind)
            entry = _dict_key(key_type, part, f"{prefix}{part}")
            if last:
                node[entry] = coerce(kind, value, base_dir, key)
                return
            if entry not in node:
                known = ", ".join(map(str, node)) or "none"
                raise ConfigError(f"'{prefix}{part}' is not an entry of '{prefix.rstrip('.')}' (entries: {known})")
            node = node[entry]
            continue
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"'{prefix.rstrip('.')}' is a value, not a section: cannot set '{key}'")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise _unknown_key(type(node), part, names, prefix)
        kind = _field_type(typing.get_type_hints(type(node))[part])
        if last:
            setattr(node, part, coerce(typing.get_type_hints(type(node))[part], value, base_dir, key))
            return
        node = getattr(node, part)


def _dict_key(key_type: Any, text: str, key: str) -> Any:
    """A mapping's key as written in a dotted key (`keep_components_per_label.14`: the int 14)."""
    if key_type is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"'{key}': the key {text!r} must be an integer") from None
    return text


def _field_type(kind: Any) -> Any:
    """A field's type without `| None`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return options[0] if len(options) == 1 else kind
    return kind


def to_plain(config: Any) -> Any:
    """A dataclass tree as plain YAML/JSON types (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, dict):
        return {k: to_plain(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def read_yaml(path: Path) -> dict:
    """A YAML file's top-level mapping (empty file -> {}), with a clear error for bad syntax."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = safe_load(text, str(path))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {_describe(data)}")
    return data or {}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so `lr: 1e-3` further down a file would quietly override an earlier `lr: 1e-2`."""

    document_source = "<yaml>"  # named in errors
    document_root = ""  # the dotted key of the document's root ("train.loss." for --set train.loss={...})

    def construct_document(self, node: yaml.Node) -> object:
        self._check_duplicates(node, self.document_root, set())
        return super().construct_document(node)

    def _check_duplicates(self, node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or of one of its parents: a recursive alias)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, f"{prefix.rstrip('.')}[{i}].", seen)
        if not isinstance(node, yaml.MappingNode):
            return
        first_line: dict[object, int] = {}
        for key_node, value_node in node.value:
            plain = isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge"
            key = self.construct_object(key_node, deep=True) if plain else None
            if key is not None:
                if key in first_line:
                    raise ConfigError(
                        f"{self.document_source}: line {key_node.start_mark.line + 1}: duplicate key '{prefix}{key}' "
                        f"(first given on line {first_line[key]}; YAML would silently keep the last)"
                    )
                first_line[key] = key_node.start_mark.line + 1
            self._check_duplicates(value_node, f"{prefix}{key}.", seen)


def safe_load(text: str, source: str, prefix: str = "") -> object:
    """yaml.safe_load, rejecting duplicate keys (a ConfigError naming `source`, the line and the dotted key)."""
    loader = _StrictLoader(text)
    loader.document_source, loader.document_root = source, prefix
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _unknown_key(schema: type, key: str, names: list[str], prefix: str) -> ConfigError:
    """The error for a key `schema` does not have: where it moved (the schema's MOVED_KEYS), or the closest key."""
    moved = getattr(schema, "MOVED_KEYS", {}).get(key)
    hint = f"; it is now {moved}" if moved else _suggest(key, names, prefix)
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _suggest(word: str, candidates: list[str], prefix: str, quote: bool = False) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not match:
        known = ", ".join(candidates)
        return f" (known keys{' under ' + prefix.rstrip('.') if prefix else ''}: {known})" if not quote else ""
    return f"; did you mean {match[0]!r}?" if quote else f"; did you mean '{prefix}{match[0]}'?"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is None and hasattr(kind, "__name__"):
        return kind.__name__
    return str(kind).replace("typing.", "").replace("pathlib.", "")
