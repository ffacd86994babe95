"""`qanot.secrets` as Qanot 2.0.4 has it: a config value may name where a secret lives instead of
holding it (`{"env": "VAR"}`, `{"file": "/run/secrets/x"}`), and `resolve_secret` fetches it.

Plugins see it as `qanot.secrets`. The host resolves the SecretRefs of a plugin's own config before
setup() (qanot_host/secrets.py), with read_secret_file from here, so a worker never needs the
variable or the file; what a plugin resolves itself behaves as in Qanot, messages included.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = ["resolve_secret", "resolve_config_secrets", "read_secret_file", "MAX_SECRET_FILE"]

logger = logging.getLogger("qanot.secrets")

MAX_SECRET_FILE = 64 * 1024
# The top-level fields of Qanot's own config.json that hold secrets.
SECRET_FIELDS = ("api_key", "bot_token", "brave_api_key", "voice_api_key", "image_api_key")


def resolve_secret(value) -> str:
    """A string as it is; {"env": NAME} the variable's value ("" with a warning if unset);
    {"file": PATH} the file's stripped text; anything else falsy is "", truthy is str(value)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "env" in value:
            name = value["env"]
            if not isinstance(name, str) or not name.strip():
                raise ValueError("Secret env var name must be a non-empty string")
            found = os.environ.get(name, "")
            if not found:
                logger.warning("Secret env var %s is empty or not set", name)
            return found
        if "file" in value:
            path = value["file"]
            if not isinstance(path, str) or not path.strip():
                raise ValueError("Secret file path must be a non-empty string")
            return read_secret_file(path)
        raise ValueError(f"Unknown secret format: expected 'env' or 'file' key, got {list(value.keys())!r}")
    return str(value) if value else ""


def read_secret_file(path: str) -> str:
    """The file's text, stripped. Refused: a symlink, a missing file, anything but a regular file,
    more than MAX_SECRET_FILE bytes. A world-readable or empty file is read, with a warning."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"Secret file not found: {path}") from None
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError(f"Secret file is a symlink (security risk): {path}") from None
        raise ValueError(f"Secret file {path} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"Secret path is not a regular file: {path}")
        if info.st_mode & stat.S_IROTH:
            logger.warning("Secret file %s is world-readable (chmod 600 recommended)", path)
        if info.st_size > MAX_SECRET_FILE:
            raise ValueError(f"Secret file {path} is too large ({info.st_size} bytes); "
                             f"maximum allowed is {MAX_SECRET_FILE} bytes")
        data = file.read(MAX_SECRET_FILE + 1)
    if len(data) > MAX_SECRET_FILE:
        raise ValueError(f"Secret file {path} is too large; maximum allowed is {MAX_SECRET_FILE} bytes")
    text = data.decode("utf-8").strip()
    if not text:
        logger.warning("Secret file %s is empty", path)
    return text


def resolve_config_secrets(raw: dict) -> dict:
    """Resolves, in place, the secret fields of a Qanot config.json: the top-level SECRET_FIELDS,
    each provider's api_key and each voice_api_keys value. A failure is a warning; the raw value stays."""
    for name in SECRET_FIELDS:
        if name in raw:
            try:
                raw[name] = resolve_secret(raw[name])
            except Exception as exc:
                logger.warning("Failed to resolve secret %s: %s", name, exc)
    for provider in raw.get("providers", []):
        if isinstance(provider, dict) and "api_key" in provider:
            try:
                provider["api_key"] = resolve_secret(provider["api_key"])
            except Exception as exc:
                logger.warning("Failed to resolve secret for provider %s: %s", provider.get("name", "?"), exc)
    voice = raw.get("voice_api_keys", {})
    if isinstance(voice, dict):
        for name, value in list(voice.items()):
            try:
                voice[name] = resolve_secret(value)
            except Exception as exc:
                logger.warning("Failed to resolve voice secret %s: %s", name, exc)
    return raw
