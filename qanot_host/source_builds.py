"""Wheels for dependencies that ship only a source distribution, built inside the sandbox.

Building an sdist runs its code (setup.py, or any PEP 517 backend). The host never does that itself:
a build job is a worker like any plugin's (qanot_worker/sdist_builder), with a uid, data directory,
disk, cgroup, seccomp filter and limits of its own, no network and no grant but reading the one
archive (and running programs, for compilers). It runs twice: once with no environment, to read the
archive's build-system table; then in an environment of the build requirements (wheels only, never
built from source in turn), to build the wheel, which it hands back as its answer. The wheel is kept
per plugin, so the next environment of that plugin takes it without a build.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

import msgspec

from .discovery import PluginSource
from .errors import DependencyError, PluginError
from .manifest import Manifest
from .output import printable
from .settings import Config, FilesystemGrant, Permissions, PluginEntry, PluginSettings, RestartSettings
from .supervisor import PluginSupervisor

if TYPE_CHECKING:
    from .environments import EnvironmentBuilder
    from .worker_factory import WorkerFactory

__all__ = ["SourceBuilds", "build_job_name"]

log = logging.getLogger("qanot_host.environments")

MAX_WHEEL_BYTES = 40 * 2**20  # what a build may hand back (base64 in one frame)
WHEEL_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+!-]{0,250}\.whl")
# A PEP 517 backend is an importable object path: module(.module)*(:attr(.attr)*)
BACKEND = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")


def build_job_name(plugin: str) -> str:
    """The build job's own name (its uid, data directory, disk and cgroup): one per plugin, so no
    plugin's build touches another's, and never a plugin's name (config.json refuses ':' in one:
    a plugin named so would be the job, and could rewrite the source while it is built)."""
    return f"sdist-build:{plugin}"


class SourceBuilds:
    def __init__(self, factory: WorkerFactory, config: Config, envs: EnvironmentBuilder) -> None:
        self._factory = factory
        self._config = config  # the host's, which the environments are built for
        self._envs = envs

    async def wheel(self, plugin: str, sdist: str, wheel_dir: str) -> str:
        """Build `sdist` in plugin's build job; the wheel's path in wheel_dir. DependencyError if not."""
        name = build_job_name(plugin)
        sdist_name = os.path.basename(sdist)
        log.info("plugin %s: building %s from source, in a sandboxed build job (%s)", plugin, sdist_name, name)
        described = await self._run(name, sdist, [], "describe", {}, plugin)
        requires, backend, backend_path = _build_system(plugin, sdist_name, described)
        try:
            site_dirs = await self._envs.site_dirs(name, requires, from_source=False)
        except DependencyError as exc:
            raise DependencyError(plugin, f"{sdist_name}: its build requirements: {exc.detail}") from None
        answer = await self._run(name, sdist, site_dirs, "build_wheel",
                                 {"backend": backend, "backend_path": backend_path}, plugin)
        return _keep_wheel(plugin, sdist_name, answer, wheel_dir)

    async def _run(self, name: str, sdist: str, site_dirs: list[str], tool: str, params: dict[str, Any],
                   plugin: str) -> str:
        config = self._job_config(name, sdist)
        builder = os.path.realpath(os.path.join(self._factory.import_root, "qanot_worker", "sdist_builder"))
        source = PluginSource(name, builder, os.path.join(builder, "plugin.py"), True, Manifest(name=name))
        job = PluginSupervisor(config.plugins[-1], config, source, self._factory, lambda _: None)
        try:
            await job.start(site_dirs)
            return await job.call(tool, params)
        except PluginError as exc:
            raise DependencyError(plugin, f"building {os.path.basename(sdist)} from source failed: "
                                          f"{exc.detail}") from None
        finally:
            await asyncio.shield(job.stop())

    def _job_config(self, name: str, sdist: str) -> Config:
        """The host's config, plus the build job as one more plugin: read the archive's directory,
        run programs (compilers), nothing else; never restarted; the host's install timeout."""
        config = self._config
        settings = PluginSettings(
            permissions=Permissions(filesystem=FilesystemGrant(read=[os.path.dirname(sdist)]), subprocess=True),
            call_timeout=config.host.install_timeout, restart=RestartSettings(policy="never"), workspace=False,
            activation="eager")  # never lazy (it would start twice), never idle-stopped
        entry = PluginEntry(name, True, {"sdist": sdist, "max_wheel_bytes": MAX_WHEEL_BYTES})
        host = msgspec.structs.replace(config.host, plugins={**config.host.plugins, name: settings})
        return msgspec.structs.replace(config, plugins=[*config.plugins, entry], host=host)


def _build_system(plugin: str, sdist_name: str, answer: str) -> tuple[list[str], str, list[str]]:
    """The build job's reading of pyproject.toml, checked as plugin.json's dependencies are: the
    archive is the plugin's, so what it asks the host to install is held to the same rules."""
    from .environments import MAX_REQUIREMENTS, requirement_problem
    where = f"{sdist_name}: pyproject.toml: build-system"
    try:
        table = json.loads(answer)
        requires, backend, backend_path = table["requires"], table["backend"], table["backend_path"]
    except (ValueError, KeyError, TypeError):
        raise DependencyError(plugin, f"{where}: the build job's answer is not understood") from None
    if not isinstance(requires, list) or len(requires) > MAX_REQUIREMENTS:
        raise DependencyError(plugin, f"{where}.requires: a list of at most {MAX_REQUIREMENTS} requirements")
    for index, requirement in enumerate(requires):
        problem = requirement_problem(requirement)
        if problem:  # the archive's words: no forged log line
            raise DependencyError(plugin, f"{where}.requires[{index}]: {printable(problem, 500)}")
    if not isinstance(backend, str) or not BACKEND.fullmatch(backend):
        raise DependencyError(plugin, f"{where}.build-backend: {printable(str(backend), 100)!r} is not an "
                                      "object path")
    if not isinstance(backend_path, list) or not all(
            isinstance(p, str) and p and not os.path.isabs(p) and ".." not in p.split("/") for p in backend_path):
        raise DependencyError(plugin, f"{where}.backend-path: relative paths inside the archive only")
    return requires, backend, backend_path


def _keep_wheel(plugin: str, sdist_name: str, answer: str, wheel_dir: str) -> str:
    """The wheel the build job answered with, written where uv will find it: its name must be a
    wheel's name for the project and version that was built, and nothing else is taken from it."""
    from packaging.utils import InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename
    try:
        reply = json.loads(answer)
        filename, data = str(reply["filename"]), base64.b64decode(reply["wheel"], validate=True)
        if not WHEEL_FILENAME.fullmatch(filename):
            raise ValueError(f"{printable(filename, 200)!r} is not a wheel's file name")
        wheel_name, wheel_version, _, _ = parse_wheel_filename(filename)
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidWheelFilename) as exc:
        raise DependencyError(plugin, f"building {sdist_name}: the build job's answer is not a wheel ({exc})") from None
    if len(data) > MAX_WHEEL_BYTES:
        raise DependencyError(plugin, f"building {sdist_name} gave a wheel of {len(data)} bytes; at most "
                                      f"{MAX_WHEEL_BYTES} are taken")
    project, version = parse_sdist_filename(sdist_name)
    if (wheel_name, wheel_version) != (project, version):
        raise DependencyError(plugin, f"building {sdist_name} gave {filename!r}, a wheel of another project "
                                      "or version")
    os.makedirs(wheel_dir, exist_ok=True)
    path = os.path.join(wheel_dir, filename)
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    log.info("plugin %s: %s built (%.1f MB)", plugin, filename, len(data) / 2**20)
    return path
