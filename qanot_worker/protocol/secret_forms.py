"""The forms a secret takes in text a plugin prints by accident, so that each is taken out: the host's
redactor uses them on everything it prints about a plugin, and the MCP bridge on the stderr it quotes
before it cuts a line (a cut through the URL-quoted form of a token gave its start away: attack pass
59). Defined once, in the package both the host and the worker import (the seam)."""

from __future__ import annotations

import base64
import html
import json
import re
from urllib.parse import quote, quote_plus

__all__ = ["secret_forms", "replace_secrets", "MIN_REDACTED"]

MIN_REDACTED = 4  # shorter values would blank out ordinary words; they are not redacted
_PERCENT = re.compile(r"%[0-9A-F]{2}")


def secret_forms(secrets: dict[str, str]) -> list[tuple[str, str]]:
    """(form, key) for each secret: as it is; escaped as repr(), ascii(), a bytes repr and JSON
    escape it (print(config), json.dumps(config), JSON inside JSON), and as Go's encoder (and some
    JavaScript serializers) escape <, > and & in JSON (\\u0026); quoted as in a URL (a database DSN), in upper and
    lower case hex; escaped for HTML; in base64; and, for a secret of several lines, each line
    (output is logged line by line). Longest first, so a secret that contains another is replaced
    whole. (Attack pass 60 printed a token in the forms this list did not have.)"""
    forms: dict[str, str] = {}
    for key, value in secrets.items():
        if len(value) < MIN_REDACTED:  # its longer forms too (`&` as `&amp;` blanked every `&amp;`: the
            continue  # review of 11-27)
        once = json.dumps(value)[1:-1]
        quoted = {quote(value, safe=""), quote_plus(value), quote(value)}
        encoded = value.encode("utf-8", "surrogatepass")
        as_json = {once, json.dumps(value, ensure_ascii=False)[1:-1]}
        variants = {value, repr(value)[1:-1], ascii(value)[1:-1], repr(encoded)[2:-1], *as_json,
                    json.dumps(once)[1:-1],
                    *(form.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
                      for form in as_json),
                    *_html_forms(value),
                    base64.b64encode(encoded).decode().rstrip("="),
                    base64.urlsafe_b64encode(encoded).decode().rstrip("="), *quoted,
                    *(_PERCENT.sub(lambda m: m.group().lower(), form) for form in quoted)}
        variants |= {line for line in value.splitlines() if len(line.strip()) >= MIN_REDACTED}
        for variant in variants:
            if len(variant) >= MIN_REDACTED:
                forms.setdefault(variant, key)
    return sorted(forms.items(), key=lambda pair: -len(pair[0]))


def _html_forms(value: str) -> set[str]:
    """Escaped for HTML as Python's html.escape() does it, as Jinja/markupsafe and Go's templates do
    (&#39; &#34;) and as PHP does (&#039;)."""
    plain = html.escape(value, quote=False)
    return {plain, html.escape(value), *(plain.replace('"', double).replace("'", single)
                                          for double, single in (("&#34;", "&#39;"), ("&quot;", "&#039;")))}


def replace_secrets(text: str, forms: list[tuple[str, str]], label: str) -> str:
    """`text` with each of secret_forms()' forms replaced by "[secret LABEL.KEY]"."""
    for value, key in forms:
        if value in text:
            text = text.replace(value, f"[secret {label}.{key}]")
    return text
