"""The build job: one source distribution into one wheel, run as a plugin worker of its own.

A source distribution's build runs its setup.py (or any PEP 517 backend): arbitrary code. So the
host never builds one itself; it starts this plugin under the same sandbox as any plugin (own uid,
no network, its data directory as the only place it may write, limits, seccomp) with the build
backend's requirements as its environment, and takes the wheel back as the tool's answer: the host
never opens a file the build could have placed.

Everything from the archive on (unpacking, reading pyproject.toml, running the backend) happens
here, inside the sandbox.
"""

import asyncio
import base64
import importlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tomllib
import zipfile

from qanot.plugins.base import Plugin, ToolDef, tool

MAX_UNPACKED = 1024 * 2**20  # bytes an archive may unpack to
MAX_MEMBERS = 50_000


class QanotPlugin(Plugin):
    name = "sdist-build"
    description = "Builds one source distribution into a wheel"

    def __init__(self) -> None:
        self.config: dict = {}

    async def setup(self, config: dict) -> None:
        self.config = config

    def get_tools(self) -> list[ToolDef]:
        return self._collect_tools()

    @tool(name="describe", description="The build-system table of the source distribution (PEP 517/518).")
    async def describe(self, params: dict) -> str:
        return await asyncio.to_thread(_describe, self.config["sdist"])

    @tool(name="build_wheel", description="Build the source distribution into a wheel with the given backend.")
    async def build_wheel(self, params: dict) -> str:
        # in a thread: the worker keeps answering the host's pings through a long build
        try:
            return await asyncio.to_thread(_build, self.config["sdist"], params["backend"], params["backend_path"],
                                           self.config["max_wheel_bytes"])
        except SystemExit as exc:  # setup.py's sys.exit(): the build failed, the worker lives on to say so
            raise RuntimeError(f"the build exited: {exc.code}") from None


def _describe(sdist: str) -> str:
    """PEP 517's defaults where pyproject.toml (or its build-system table) is missing."""
    top = _unpack(sdist, _fresh(os.path.join(os.getcwd(), "source")))
    table = {}
    path = os.path.join(top, "pyproject.toml")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            table = tomllib.load(f).get("build-system", {})
    return json.dumps({"requires": table.get("requires", ["setuptools>=40.8.0"]),
                       "backend": table.get("build-backend", "setuptools.build_meta:__legacy__"),
                       "backend_path": table.get("backend-path", [])})


def _build(sdist: str, backend: str, backend_path: list, max_wheel_bytes: int) -> str:
    place = os.getcwd()  # the worker's data directory: the one place it may write
    top = _unpack(sdist, _fresh(os.path.join(place, "source")))
    out = _fresh(os.path.join(place, "wheel"))
    os.chdir(top)
    for entry in reversed(backend_path):
        sys.path.insert(0, os.path.join(top, entry))
    logging.getLogger().setLevel(logging.WARNING)  # setuptools says every file it copies at INFO
    module, _, attrs = backend.partition(":")
    hooks = importlib.import_module(module)
    for attr in filter(None, attrs.split(".")):
        hooks = getattr(hooks, attr)
    name = hooks.build_wheel(out)
    wheel = os.path.join(out, os.path.basename(name))
    size = os.path.getsize(wheel)
    if size > max_wheel_bytes:
        raise ValueError(f"the wheel built is {size} bytes; at most {max_wheel_bytes} are taken")
    with open(wheel, "rb") as f:
        data = f.read()
    return json.dumps({"filename": os.path.basename(name), "wheel": base64.b64encode(data).decode()})


def _fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _unpack(sdist: str, target: str) -> str:
    """The archive's one top directory, unpacked under `target` (no member outside it, no links
    out of it, no device files: tarfile's "data" filter; zip members checked the same way)."""
    total = 0
    if sdist.endswith(".zip"):
        with zipfile.ZipFile(sdist) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise ValueError(f"the archive holds {len(members)} files; at most {MAX_MEMBERS} are taken")
            for member in members:
                total += member.file_size
                path = os.path.realpath(os.path.join(target, member.filename))
                if not path.startswith(target + os.sep):
                    raise ValueError(f"the archive's member {member.filename!r} lies outside it")
            if total > MAX_UNPACKED:
                raise ValueError(f"the archive unpacks to {total} bytes; at most {MAX_UNPACKED} are taken")
            archive.extractall(target)
    else:
        with tarfile.open(sdist) as archive:
            listed = []
            for entry in archive:
                listed.append(entry)
                total += entry.size
                if len(listed) > MAX_MEMBERS or total > MAX_UNPACKED:
                    raise ValueError(f"the archive holds more than {MAX_MEMBERS} files or "
                                     f"{MAX_UNPACKED} bytes")
            archive.extractall(target, members=listed, filter="data")
    entries = os.listdir(target)
    if len(entries) != 1 or not os.path.isdir(os.path.join(target, entries[0])):
        raise ValueError("a source distribution holds one top directory; this one holds "
                         f"{len(entries)} entries")
    return os.path.join(target, entries[0])
