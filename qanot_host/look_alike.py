"""Tool names of different plugins that differ only in case, `-`, `.` or `_` (`calc-eval` beside
`calc_eval`): both are allowed (MCP's rule allows them, and Qanot registers both), but a model reading
the list may call one for the other, and a plugin may pick such a name to be called instead of
another's tool. The operator is told, once for each pair (attack pass 55 found them served side by
side without a word)."""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["LookAlikes", "shape"]

_SEPARATORS = re.compile(r"[-._]+")
# names a plugin offers anew at every restart would pile up: past this many, it starts again (a pair
# may then be told once more)
MAX_KEPT = 65_536


def shape(name: str) -> str:
    """What a name looks like to a reader: case and runs of separators not told apart."""
    return _SEPARATORS.sub("_", name.casefold())


class LookAlikes:
    def __init__(self) -> None:
        self._first: dict[str, str] = {}  # a shape -> the first registered name of that shape
        self._said: set[tuple[str, str]] = set()

    def added(self, name: str, plugin: str, owner: Callable[[str], str | None]) -> tuple[str, str] | None:
        """A tool registered for `plugin`: (another plugin's registered tool it looks like, that
        plugin) the first time the two are seen together, else None. `owner(name)` is the plugin
        a name is registered to now (None: to none)."""
        if len(self._first) > MAX_KEPT or len(self._said) > MAX_KEPT:
            self._first.clear()
            self._said.clear()
        key = shape(name)
        other = self._first.get(key)
        other_plugin = owner(other) if other is not None else None
        if other is None or other_plugin is None:
            self._first[key] = name
            return None
        if other == name or other_plugin == plugin:
            return None
        pair = (min(name, other), max(name, other))
        if pair in self._said:
            return None
        self._said.add(pair)
        return other, other_plugin
