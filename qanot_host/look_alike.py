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
    """What a name looks like to a reader: case and separators (present or not) not told apart."""
    return _SEPARATORS.sub("", name.casefold())


class LookAlikes:
    def __init__(self) -> None:
        self._names: dict[str, set[str]] = {}  # a shape -> the names of that shape registered so far
        self._said: set[tuple[tuple[str, str], ...]] = set()  # pairs of (name, its plugin) told of

    def added(self, name: str, plugin: str, owner: Callable[[str], str | None]) -> list[tuple[str, str]]:
        """A tool registered for `plugin`: each (other plugin's registered tool it looks like, that
        plugin) the first time the two are seen together. `owner(name)` is the plugin a name is
        registered to now (None: to none)."""
        if len(self._names) > MAX_KEPT or len(self._said) > MAX_KEPT:
            self._names.clear()
            self._said.clear()
        names = self._names.setdefault(shape(name), set())
        names.add(name)
        found = []
        for other in sorted(names - {name}):  # all of them: one tool may look like two (attack pass 63)
            other_plugin = owner(other)
            if other_plugin is None:
                names.discard(other)
                continue
            if other_plugin == plugin:
                continue
            key = tuple(sorted([(name, plugin), (other, other_plugin)]))
            if key not in self._said:
                self._said.add(key)
                found.append((other, other_plugin))
        return found
