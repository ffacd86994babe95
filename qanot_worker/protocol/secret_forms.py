"""The forms a secret takes in text a plugin prints by accident, so that each is taken out: the host's
redactor uses them on everything it prints about a plugin, and the MCP bridge on the stderr it quotes
before it cuts a line (a cut through the URL-quoted form of a token gave its start away: attack pass
59). Defined once, in the package both the host and the worker import (the seam)."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

__all__ = ["secret_forms", "replace_secrets", "MIN_REDACTED"]

MIN_REDACTED = 4  # shorter values would blank out ordinary words; they are not redacted


def secret_forms(secrets: dict[str, str]) -> list[tuple[str, str]]:
    """(form, key) for each secret: as it is; escaped as repr(), ascii(), a bytes repr and JSON
    escape it (print(config), json.dumps(config), JSON inside JSON); quoted as in a URL (a database
    DSN); and, for a secret of several lines, each line (output is logged line by line). Longest
    first, so a secret that contains another is replaced whole."""
    forms: dict[str, str] = {}
    for key, value in secrets.items():
        once = json.dumps(value)[1:-1]
        variants = {value, repr(value)[1:-1], ascii(value)[1:-1], repr(value.encode())[2:-1], once,
                    json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(once)[1:-1],
                    quote(value, safe=""), quote_plus(value), quote(value)}
        variants |= {line for line in value.splitlines() if len(line.strip()) >= MIN_REDACTED}
        for variant in variants:
            if len(variant) >= MIN_REDACTED:
                forms.setdefault(variant, key)
    return sorted(forms.items(), key=lambda pair: -len(pair[0]))


def replace_secrets(text: str, forms: list[tuple[str, str]], label: str) -> str:
    """`text` with each of secret_forms()' forms replaced by "[secret LABEL.KEY]"."""
    for value, key in forms:
        if value in text:
            text = text.replace(value, f"[secret {label}.{key}]")
    return text
