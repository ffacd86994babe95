"""Tool schemas, checked in the host: a plugin's schema is untrusted input like anything else it sends.

A schema that the host cannot use (not an object, `required` that is not a list of names,
`properties` that is not an object of objects, nesting deeper than MAX_DEPTH, values JSON cannot
hold) refuses that one tool, with a message naming the key; the host and every other tool go on.
A schema that passes is one `json.dumps` takes, so `get_definitions()` never hands its caller
something it cannot serialise.

Params are checked against a schema the way Qanot's validate_tool_params does (required keys, then
basic JSON types; unknown types and extra keys pass), with the schema's walk done once per tool.
"""

from __future__ import annotations

import math
from typing import Any, Callable, cast

__all__ = ["SchemaError", "check_schema", "compile_validator", "json_problem", "compile_params_check",
           "CHECK_OFF_LOOP", "MAX_DEPTH", "MAX_PARAMS_DEPTH", "type_name"]

MAX_DEPTH = 32  # a schema nested deeper than this is refused
MAX_PARAMS_DEPTH = 64  # params nested deeper than this are refused (InvalidParams)
INT64 = 2**63

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    # bool is a subclass of int in Python, but JSON Schema keeps them apart.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}

_QANOT_TYPES = {name: test for name, test in _JSON_TYPES.items() if name != "null"}
# The exact Python types that pass each test at once (its subclasses, bar bool's, are tested)
_EXACT: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                       "boolean": (bool,), "array": (list,), "object": (dict,),
                                       "null": (type(None),)}


class SchemaError(ValueError):
    """A tool's parameters schema the host cannot use; the message names the key at fault."""


def type_name(value: object) -> str:
    """A value's JSON type, as a caller who wrote JSON would name it."""
    if value is None:
        return "null"
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def json_problem(value: object, where: str = "", depth: int = 0, max_depth: int = MAX_DEPTH) -> str | None:
    """Why `value` is not plain JSON (dict with str keys, list, str, int of 64 bits, finite float,
    bool, None, nested at most max_depth), naming the path to the offending value; None if it is."""
    if depth > max_depth:
        return f"{where or '$'}: nested deeper than {max_depth} levels"
    kind = type(value)  # exact types: a bool is not an int here, nor a str subclass a str
    if value is None or kind is bool:
        return None
    if kind is str:
        return _surrogate_problem(cast(str, value), where)
    if kind is int:
        number = cast(int, value)
        return None if -INT64 <= number < INT64 else f"{where or '$'}: integer {number} does not fit in 64 bits"
    if kind is float:
        return None if math.isfinite(cast(float, value)) else f"{where or '$'}: {value} is not a JSON number"
    if kind is dict:
        for key, item in cast(dict, value).items():
            if type(key) is not str:
                return f"{where or '$'}: key {key!r} is not a string"
            problem = _surrogate_problem(key, where) or json_problem(item, f"{where}.{key}", depth + 1, max_depth)
            if problem:
                return problem
        return None
    if kind is list or kind is tuple:
        for index, item in enumerate(cast(list, value)):
            problem = json_problem(item, f"{where}[{index}]", depth + 1, max_depth)
            if problem:
                return problem
        return None
    return f"{where or '$'}: a {kind.__name__} is not JSON"


def _surrogate_problem(text: str, where: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where or '$'}: {text[:40]!r} holds a lone surrogate, which is not valid UTF-8"
    return None


def check_schema(schema: object) -> None:
    """Raise SchemaError if the host cannot use `schema` (see the module's docstring)."""
    if not isinstance(schema, dict):
        raise SchemaError(f"parameters must be a JSON object, got {type_name(schema)}")
    problem = json_problem(schema)
    if problem:
        raise SchemaError(f"parameters{problem.removeprefix('$')}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        raise SchemaError(f"parameters.required must be a list of parameter names, got {required!r:.60}")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise SchemaError(f"parameters.properties must be an object, got {type_name(properties)}")
    for key, prop in properties.items():
        if not isinstance(prop, dict):
            raise SchemaError(f"parameters.properties.{key} must be an object, got {type_name(prop)}")
        kind = prop.get("type")
        if kind is not None and not isinstance(kind, str) and not (
                isinstance(kind, list) and all(isinstance(k, str) for k in kind)):
            raise SchemaError(f"parameters.properties.{key}.type must be a type name or a list of them")


def compile_validator(schema: dict[str, Any]) -> Callable[[dict], list[str]]:
    """A check of params against a schema that passed check_schema, with Qanot's messages in
    Qanot's order: [] if valid, else the missing keys, then each param of the wrong type in the
    params' own order (named by its Python type, as Qanot names it). Valid params (the common
    case) cost a dict lookup per param."""
    required = tuple(schema.get("required", ()))
    checks = _type_checks(schema)

    def validate(params: dict) -> list[str]:
        if type(params) is not dict:
            return [f"Parameters must be a dict, got {type(params).__name__}"]
        errors = [f"Missing required parameter: {key}" for key in required if key not in params] if required else []
        if checks:
            for key, value in params.items():
                check = checks.get(key)
                # a value of exactly an accepted type passes at once; others get the type tests
                if check is not None and type(value) not in check[2] and not _passes(value, check[1]):
                    errors.append(f"Parameter '{key}' expected {check[0]}, got {type(value).__name__}")
        return errors

    return validate


def _type_checks(schema: dict[str, Any]) -> dict[str, tuple[str, tuple[Callable[[Any], bool], ...], frozenset[type]]]:
    """Per property whose values are checked: its types' names, their tests, and the exact Python
    types that pass at once. A single type is Qanot's check ("null" and unknown names pass
    anything); a list of types, which Qanot cannot take, is checked as JSON Schema says (an unknown
    name in it lets anything pass)."""
    checks = {}
    for key, prop in schema.get("properties", {}).items():
        expected = prop.get("type")
        names, known = (expected, _JSON_TYPES) if isinstance(expected, list) else ([expected], _QANOT_TYPES)
        tests = tuple(known[n] for n in names if n in known)
        if tests and len(tests) == len(names):
            checks[key] = (" or ".join(names), tests, frozenset(kind for n in names for kind in _EXACT[n]))
    return checks


def _passes(value: object, tests: tuple[Callable[[Any], bool], ...]) -> bool:
    for test in tests:
        if test(value):
            return True
    return False


# A call's params holding more values than this are checked on a thread, not on the host's event
# loop: the walk costs ~0.2 µs a value, and 9 million floats held the loop for 1.9 s (attack pass 43).
CHECK_ON_LOOP_VALUES = 50_000
# What a check returns for params too large to check on the loop: the caller checks them on a thread
# with the whole check. Truthy, with words, should a caller ever take it for problems found.
CHECK_OFF_LOOP: list[str] = [f"params hold more than {CHECK_ON_LOOP_VALUES} values: checked on a thread"]


def compile_params_check(schema: dict[str, Any], validate: Callable[[dict], list[str]]
                         ) -> tuple[Callable[[dict], list[str]], Callable[[dict], list[str]]]:
    """A plugin tool's whole check of a call's params, in one pass for the usual call: what cannot
    cross the wire (json_problem) and what the schema refuses (`validate`). A flat object of ASCII
    keys and plain values, each of exactly a type its schema names, passes in one loop; anything
    else is decided by those two, in that order, with their words. Every call pays this: the two
    apart, with a generator per typed param, cost 0.3-1.4 µs a call.
    Returns (check, whole): `check` answers CHECK_OFF_LOOP for params of more than
    CHECK_ON_LOOP_VALUES values, which `whole` (the two checks, for any size) then decides."""
    required = tuple(schema.get("required", ()))
    exact = {key: check[2] for key, check in _type_checks(schema).items()}  # as compile_validator reads them

    def whole(params: dict) -> list[str]:
        problem = json_problem(params, "params", max_depth=MAX_PARAMS_DEPTH)
        return [problem] if problem else validate(params)

    def slow(params: dict) -> list[str]:
        return CHECK_OFF_LOOP if _more_values_than(params, CHECK_ON_LOOP_VALUES) else whole(params)

    def check(params: dict) -> list[str]:
        for key, value in params.items():
            kind = type(value)
            if type(key) is not str or not key.isascii():
                return slow(params)
            if kind is str:
                if not value.isascii():
                    return slow(params)
            elif kind is int:
                if not -INT64 <= value < INT64:
                    return slow(params)
            elif kind is float:
                if value - value != 0.0:  # inf or nan
                    return slow(params)
            elif value is not None and kind is not bool:
                return slow(params)  # a container, or what is not JSON: the whole walk
            accepted = exact.get(key)
            if accepted is not None and kind not in accepted:
                return slow(params)
        for key in required:
            if key not in params:
                return slow(params)
        return _NO_PROBLEMS

    return check, whole


def _more_values_than(value: object, limit: int) -> bool:
    """Whether `value` holds more than `limit` values in all (containers and what they hold, to any
    depth), found without walking more than `limit` of them."""
    pending = [value]
    count = 0
    while pending:
        item = pending.pop()
        count += 1
        kind = type(item)
        if kind is dict or kind is list or kind is tuple:
            items = cast(Any, item)
            if count + len(items) > limit:
                return True
            pending.extend(items.values() if kind is dict else items)
        elif count > limit:
            return True
    return False


_NO_PROBLEMS: list[str] = []  # never changed: what a check returns when it finds nothing
