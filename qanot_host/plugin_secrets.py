"""SecretRefs in a plugin's config, resolved by the host, and kept out of everything it prints.

A top-level value of a plugin's `config` may say where a secret lives instead of holding it, as
Qanot's own config.json does for its keys: `{"env": "VAR"}` (the host's environment) or
`{"file": "/run/secrets/x"}` (a file the host reads, with Qanot's rules: no symlink, a regular
file, at most 64 KiB, stripped). The host resolves them before each start, so setup() gets plain
strings and the worker needs neither an env_vars grant nor a file grant; nothing else sees them.

A SecretRef that cannot be resolved (an unset variable, a missing file) fails that plugin's start
with an error naming the config key and the variable or file, never the value. Every resolved
value is then redacted from what the host prints about the plugin: its stdout and stderr lines
and the error messages its worker sends back (a plugin that puts its password in an exception
does not put it in the host's log).
"""

from __future__ import annotations

import json
import errno
import hashlib
import logging
import os
import stat
from typing import Any

from qanot_worker.protocol.secret_forms import replace_secrets, secret_forms

from .safe_files import read_regular_file

__all__ = ["Redactor", "resolve_config_secrets", "is_secret_ref", "is_text", "read_secret_file", "secrets_digest"]

log = logging.getLogger("qanot_host")
MAX_SECRET_FILE = 64 * 1024  # Qanot's own limit
# What went wrong reading a secret file, in Qanot's words (qanot/secrets.py)
_WHY = {errno.ENOENT: "Secret file not found: {path}", errno.ELOOP: "Secret file is a symlink (security risk): {path}",
        errno.EINVAL: "Secret path is not a regular file: {path}",
        errno.EFBIG: f"Secret file {{path}} is too large; maximum allowed is {MAX_SECRET_FILE} bytes"}


def read_secret_file(path: str) -> str:
    """The file's text, stripped, by Qanot's rules; ValueError saying why not, in Qanot's words."""
    try:
        data = read_regular_file(path, MAX_SECRET_FILE)
        if os.stat(path, follow_symlinks=False).st_mode & stat.S_IROTH:
            log.warning("Secret file %s is world-readable (chmod 600 recommended)", path)
        return data.decode("utf-8").strip()
    except OSError as exc:
        known = _WHY.get(exc.errno or 0)
        why = known.format(path=path) if known else f"Secret file {path} cannot be read: {exc.strerror or exc}"
        raise ValueError(why) from None


def secrets_digest(config: Any) -> str:
    """What the config's SecretRefs resolve to now, as a digest (never the values): a plugin's tools
    may depend on them (Qanot's eskiz lists none when its login fails), so its cached tool list does
    too. Read quietly: resolve_config_secrets() says what is wrong when the worker starts."""
    digest = hashlib.sha256()
    for key, value in sorted(config.items()) if isinstance(config, dict) else []:
        if not is_secret_ref(value):
            continue
        try:
            found = os.environ.get(value["env"], "") if "env" in value else \
                read_regular_file(value["file"], MAX_SECRET_FILE).decode("utf-8", "replace").strip()
        except OSError as exc:
            found = f"unreadable ({exc.errno})"
        digest.update(json.dumps([key, found]).encode())
    return digest.hexdigest()


def is_text(value: str) -> bool:
    """Whether an environment variable's value is UTF-8 text: Python reads other bytes as lone
    surrogates, which no frame to a worker can carry (its error named no key: attack pass 60)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_secret_ref(value: Any) -> bool:
    """{"env": NAME} or {"file": PATH}, exactly: a config that happens to have an "env" key among
    others is the plugin's own data."""
    return isinstance(value, dict) and len(value) == 1 and (
        isinstance(value.get("env"), str) or isinstance(value.get("file"), str))


class Redactor:
    """Replaces each secret value in a text with a placeholder naming its config key."""

    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        self._secrets = secret_forms(secrets or {})  # every form a plugin may print one in

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __call__(self, text: str) -> str:
        return replace_secrets(text, self._secrets, "config")


def resolve_config_secrets(config: dict[str, Any], where: str) -> tuple[dict[str, Any], Redactor]:
    """The config with its top-level SecretRefs resolved, and a Redactor for their values. `where`
    names the config in errors ("config.json: plugins[2].config"), the key after it as
    `['api_key']`: `.api_key:` read as a key=value credential to status's redaction, which showed
    "config.api_[credential redacted] environment variable..." (a newcomer, 11-27). ValueError if
    one cannot be, naming every one that cannot (an operator fixing them one start at a time was
    told of the next only at the next start)."""
    resolved = dict(config)
    secrets: dict[str, str] = {}
    problems = []
    for key, value in config.items():
        if not is_secret_ref(value):
            continue
        try:
            resolved[key] = secrets[key] = _resolve(value)
        except ValueError as exc:
            problems.append(f"{where}[{key!r}]: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return resolved, Redactor(secrets)


def _resolve(ref: dict[str, str]) -> str:
    if "env" in ref:
        name = ref["env"]
        found = os.environ.get(name, "") if name.strip() else ""
        if not found:
            raise ValueError(f"the environment variable {name!r} it names is not set (or empty) in the host's "
                             "environment")
        if not is_text(found):
            raise ValueError(f"the environment variable {name!r} it names holds bytes that are not UTF-8")
        return found
    path = ref["file"]
    try:
        found = read_secret_file(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(exc.reason if isinstance(exc, UnicodeDecodeError) else str(exc)) from None
    if not found:
        raise ValueError(f"the secret file {path} is empty")
    return found
