"""One reading of "a JSON object" for everything an operator or a plugin hands the host as text
(config.json, plugin.json, a call's params), so each says what is wrong in the same words."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_json_object"]


def parse_json_object(raw: bytes | str, where: str) -> dict[str, Any]:
    """`raw` as a dict; ValueError("WHERE: why") when it is not JSON, is nested deeper than the
    parser goes, or holds something else than an object."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must hold a JSON object, not {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")
