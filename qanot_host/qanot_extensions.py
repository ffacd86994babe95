"""What a worker's plugin returned from its extension points, made safe for Qanot's own process.

The drop-in loader hands these to Qanot's loader code, which runs them in the agent's process: WAL
patterns on every user message, template variables replaced in every system prompt, names and
categories written to its log, tools_md and soul_append to files. A plugin is not trusted, so each
is bounded here first. Found by attackers, each a way to hang, bloat or confuse the agent:
- a WAL pattern with nested repetition held the agent for hours under `re` (now the `regex` engine,
  with one time budget per plugin per message, and a compile that takes long leaves the rest out);
- template variables whose values hold other keys grew the prompt ~32x per variable until
  MemoryError (now no value holds any key, and a key never appears in a value given earlier);
- names, categories and text carried terminal escapes and line breaks into Qanot's log and files.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from .output import one_line, plain_text
from .workspace import MAX_BLOCK

__all__ = ["one_line", "plain_text", "capped", "wal_patterns", "time_wal_patterns", "template_vars", "flat_dicts",
           "forget_template_vars"]

log = logging.getLogger("qanot_host.qanot_loader")

MAX_PATTERN = 1000  # characters of one WAL pattern
MAX_PATTERNS = 16  # WAL patterns of one plugin (Qanot's own plugins have none to two)
WAL_COMPILE_SECONDS = 0.02  # a pattern that takes longer to compile stops the plugin's list there
# What one pattern may come to with its counted repeats written out, as the `regex` engine compiles
# them (about 250 bytes each: `(?:x{60000}){60000}`, 19 characters, took the agent past 24 GB), and
# all of a plugin's together (attack pass 45). Qanot's own patterns come to a few dozen.
MAX_PATTERN_UNITS = 20_000
MAX_PLUGIN_UNITS = 50_000
WAL_SEARCH_SECONDS = 0.05  # all of one plugin's patterns on one message
MAX_TEMPLATE_KEY, MIN_TEMPLATE_KEY, MAX_TEMPLATE_VALUE = 100, 3, 256
MAX_SECTION_TEXT = 64 * 1024  # characters of all of one plugin's prompt sections (or cron jobs)
# re's flags that the regex module reads the same way (IGNORECASE, MULTILINE, DOTALL, VERBOSE, UNICODE, ASCII)
_SHARED_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE | re.UNICODE | re.ASCII
# every template variable the loader has given Qanot, across plugins: Qanot replaces them all in one prompt
_given_vars: dict[str, str] = {}


def capped(plugin: str, what: str, value: str) -> str:
    value = plain_text(value)
    if len(value.encode()) <= MAX_BLOCK:
        return value
    log.warning("Plugin %s: %s is over %d bytes; the rest is left out", plugin, what, MAX_BLOCK)
    return value.encode()[:MAX_BLOCK].decode(errors="ignore")


def wal_patterns(plugin: str, patterns: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    """The patterns Qanot may compile. Compiled here first as Qanot compiles them (IGNORECASE, so
    that Qanot's own compile is re's cache hit), timed: past one slow compile the rest are left out."""
    kept = []
    units = 0
    for index, (pattern, category, durable) in enumerate(patterns):
        if index == MAX_PATTERNS:
            log.warning("Plugin %s: %d WAL patterns; the first %d are taken", plugin, len(patterns), MAX_PATTERNS)
            break
        began = time.perf_counter()
        try:
            if len(pattern) > MAX_PATTERN:
                raise ValueError(f"longer than {MAX_PATTERN} characters")
            re.compile(pattern, re.IGNORECASE)
            size = _expanded_size(pattern, min(MAX_PATTERN_UNITS, MAX_PLUGIN_UNITS - units))
            if size > MAX_PATTERN_UNITS:
                raise ValueError(f"its counted repeats come to over {MAX_PATTERN_UNITS} elements written out")
            if units + size > MAX_PLUGIN_UNITS:
                raise ValueError(f"the plugin's patterns come to over {MAX_PLUGIN_UNITS} elements written out")
            units += size
        except (re.error, ValueError, RecursionError) as exc:
            log.warning("Plugin %s: WAL pattern %.60r left out: %s", plugin, pattern, exc)
            continue
        if time.perf_counter() - began > WAL_COMPILE_SECONDS:
            log.warning("Plugin %s: WAL pattern %.60r took over %g s to compile; it and the plugin's later "
                        "patterns are left out", plugin, pattern, WAL_COMPILE_SECONDS)
            break
        kept.append((pattern, one_line(category), durable))
    return kept


def _expanded_size(pattern: str, limit: int) -> int:
    """How many elements `pattern` comes to with every counted repeat written out (the body of
    `x{m,n}` n times, of `x{m,}` m times), counted no further than just past `limit`. Read from the
    syntax tree of Python's own parser, which has just accepted the pattern."""
    from re import _parser  # type: ignore[attr-defined]

    repeats = (_parser.MAX_REPEAT, _parser.MIN_REPEAT, _parser.POSSESSIVE_REPEAT)

    def size(items: Any, budget: int) -> int:
        total = 0
        for op, av in items:
            if op in repeats:
                low, high, body = av
                times = max(1, low, high if high != _parser.MAXREPEAT else 0)
                total += times * size(body, budget // times + 1)
            elif op is _parser.SUBPATTERN:
                total += size(av[3], budget)
            elif op is _parser.BRANCH:
                total += sum(size(branch, budget) for branch in av[1])
            elif op is _parser.ATOMIC_GROUP:
                total += size(av, budget)
            elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
                total += size(av[1], budget)
            elif op is _parser.GROUPREF_EXISTS:
                total += size(av[1], budget) + (size(av[2], budget) if av[2] else 0)
            else:
                total += 1
            if total > budget:
                return total
        return total

    return size(_parser.parse(pattern, re.IGNORECASE), limit)


class _Budget:
    """One plugin's time on one message, shared by its patterns (wal_scan runs them one after another
    on the same text)."""

    def __init__(self) -> None:
        self.text: str | None = None
        self.left = WAL_SEARCH_SECONDS
        self.warned = False


class TimedPattern:
    """A plugin's WAL pattern as Qanot's `wal_scan` uses it (`.search()` on every user message, in the
    agent's process), run by the `regex` engine, which takes a timeout (`re` cannot be interrupted).
    What runs out of the plugin's budget for the message finds nothing, said once in the log."""

    def __init__(self, plugin: str, compiled: re.Pattern, budget: _Budget) -> None:
        import regex  # only the drop-in loader needs it

        self.plugin = plugin
        self.pattern = compiled.pattern
        self.flags = compiled.flags
        self._compiled = regex.compile(compiled.pattern, (compiled.flags & _SHARED_FLAGS) | regex.V0)
        self._budget = budget

    def search(self, string: str, *args: Any) -> Any:
        budget = self._budget
        if budget.text is not string:
            budget.text, budget.left = string, WAL_SEARCH_SECONDS
        if budget.left <= 0:
            return None
        began = time.perf_counter()
        try:
            return self._compiled.search(string, *args, timeout=budget.left)
        except TimeoutError:
            if not budget.warned:
                budget.warned = True
                log.warning("Plugin %s: its WAL patterns took over %g s on a message and matched nothing "
                            "(and will each time they do)", self.plugin, WAL_SEARCH_SECONDS)
            return None
        finally:
            budget.left -= time.perf_counter() - began


def time_wal_patterns(plugin: str, patterns: list, first: int) -> None:
    """The plugin's patterns that Qanot has just compiled (from `first` on) run under its budget."""
    kept = []
    budget = _Budget()
    for compiled, category in patterns[first:]:
        try:
            kept.append((TimedPattern(plugin, compiled, budget), category))
        except Exception as exc:  # noqa: BLE001 - a pattern re takes and regex does not
            log.warning("Plugin %s: WAL pattern %.60r left out: %s", plugin, compiled.pattern, exc)
    patterns[first:] = kept


def template_vars(plugin: str, variables: dict[str, str]) -> dict[str, str]:
    """Qanot replaces each key by its value in the prompt, one after another: a value holding a key
    would be expanded again. Kept: keys of 3 to 100 characters, values of at most 256, no value
    holding any key, no key inside a value given before."""
    kept: dict[str, str] = {}
    for key, value in variables.items():
        key, value = one_line(key), plain_text(value)
        known = {**_given_vars, **kept, key: value}
        if not MIN_TEMPLATE_KEY <= len(key) <= MAX_TEMPLATE_KEY or len(value) > MAX_TEMPLATE_VALUE:
            why = f"a key of {MIN_TEMPLATE_KEY} to {MAX_TEMPLATE_KEY} characters and a value of at most " \
                  f"{MAX_TEMPLATE_VALUE} are taken"
        elif any(other in value for other in known):
            why = "its value holds a template key, which Qanot would replace again"
        elif any(key in other for other in known.values()):
            why = "a value given earlier holds this key, which Qanot would replace again"
        else:
            kept[key] = value
            continue
        log.warning("Plugin %s: template variable %.60r left out: %s", plugin, key, why)
    _given_vars.update(kept)
    return kept


def forget_template_vars() -> None:
    """At shutdown: a later load starts with none given."""
    _given_vars.clear()


def flat_dicts(plugin: str, what: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt sections or cron jobs: strings cleaned ("name" on one line), MAX_SECTION_TEXT in all."""
    kept, left = [], MAX_SECTION_TEXT
    for item in items:
        size = sum(len(v) for v in item.values() if isinstance(v, str))
        if size > left:
            log.warning("Plugin %s: %s past %d characters in all are left out", plugin, what, MAX_SECTION_TEXT)
            break
        left -= size
        kept.append({one_line(k): (one_line(v) if k == "name" else plain_text(v)) if isinstance(v, str) else v
                     for k, v in item.items()})
    return kept
