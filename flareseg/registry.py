"""Named builders for the open sets of the framework (networks, losses): registration and clear lookup errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from flareseg.config import ConfigError

T = TypeVar("T", bound=Callable)


class Registry(dict, Generic[T]):
    """name -> builder. `config_key` names the setting that selects one, for error messages."""

    def __init__(self, kind: str, config_key: str):
        super().__init__()
        self.kind, self.config_key = kind, config_key

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add a builder under `name` (names are unique)."""

        def add(builder: T) -> T:
            if name in self:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self[name] = builder
            return builder

        return add

    def lookup(self, name: str) -> T:
        """The builder registered as `name`; a ConfigError with a did-you-mean and the known names otherwise."""
        if name not in self:
            close = difflib.get_close_matches(name, self, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{self.config_key}: {name}'{hint} (known: {', '.join(sorted(self))})"
            )
        return self[name]
