"""Per-plugin Python environments, built with uv from plugin.json's "dependencies".

Each plugin gets its own virtual environment, keyed by its requirement list, built once and reused
until that list changes, and never installed into the host's environment. Its files are hard links
into uv's cache (measured: plugins needing aiohttp add 0.15 MB of files of their own each, not a copy
each), which no plugin can write: root's files, mounted read-only in the sandbox (Landlock read-only
without a root of its own). Environments are built in a scratch directory and renamed into place, so
a crash mid-build never leaves a half environment that looks finished; a lock file keeps two hosts
from building the same one at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .children import die_with_host
from .errors import DependencyError

if TYPE_CHECKING:
    from .source_builds import SourceBuilds

log = logging.getLogger("qanot_host.environments")

__all__ = ["EnvironmentBuilder", "find_uv", "requirement_problem", "sweep_partial_builds", "MAX_REQUIREMENTS"]

COMPLETE_MARK = ".qanot-host-env.json"
MAX_REQUIREMENT = 500  # characters of one plugin.json dependency (name, extras, versions, markers)
MAX_REQUIREMENTS = 100  # dependencies of one plugin
MAX_SOURCE_BUILDS = 10  # projects one environment may need built from source
# uv's word for a project it found no wheel of (with --no-build)
NEEDS_BUILD = re.compile(r"Wheels are required for `([^`]+)` because building from source is disabled")


class UvFailed(DependencyError):
    def __init__(self, plugin: str, detail: str, output: str) -> None:
        super().__init__(plugin, detail)
        self.output = output


def requirement_problem(entry: object) -> str | None:
    """Why a plugin.json dependency is refused, or None: only a name with version constraints,
    extras and markers is taken. A URL, a path, `file:`, `git+` or an option would have the host
    fetch or run whatever the plugin names, from wherever it names."""
    if not isinstance(entry, str) or not entry.strip():
        return f"{entry!r} is not a requirement"
    if len(entry) > MAX_REQUIREMENT:
        return f"{entry[:40]!r}... is {len(entry)} characters long; a requirement takes at most {MAX_REQUIREMENT}"
    if entry.lstrip().startswith("-"):
        return f"{entry!r}: options are not taken from plugin.json (the host decides where packages come from)"
    # imported here, by the plugins that have dependencies: 35 ms at every command's start otherwise
    from packaging.requirements import InvalidRequirement, Requirement
    try:
        requirement = Requirement(entry)
    except InvalidRequirement as exc:
        # packaging's first line: the two after it draw a caret under the entry (one line is promised)
        why = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
        return f"{entry!r} is not a plain requirement ({why}); give a name and version constraints"
    if requirement.url:
        return f"{entry!r}: a direct reference (URL or path) is refused; give a name and version constraints"
    return None


def find_uv() -> str | None:
    try:
        from uv import find_uv_bin  # the `uv` wheel ships its binary and this helper
        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


class EnvironmentBuilder:
    def __init__(self, state_dir: str, wheel_dir: str | None, offline: bool, timeout: float,
                 index_url: str | None = None, install_seconds: dict[str, float] | None = None) -> None:
        self._root = os.path.join(state_dir, "envs")
        self._wheel_dir = wheel_dir
        self._index_url = index_url
        self._offline = offline
        self._timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        # plugin -> time its environments took to build, in all (the caller's dict, kept across builders)
        self.install_seconds: dict[str, float] = install_seconds if install_seconds is not None else {}
        # builds an sdist-only dependency in a sandboxed build job; None: such a dependency fails
        self.source_builds: SourceBuilds | None = None
        self._state_dir = state_dir

    async def site_dirs(self, plugin: str, requirements: list[str], from_source: bool = True) -> list[str]:
        """The site-packages directories the plugin's worker adds; [] for a plugin with no deps.
        `from_source`: a dependency with no wheel is built from its sdist in the sandbox (never for
        a build job's own requirements: no build within a build)."""
        if not requirements:
            return []
        if len(requirements) > MAX_REQUIREMENTS:
            raise DependencyError(plugin, f"plugin.json: dependencies: {len(requirements)} given; at most "
                                          f"{MAX_REQUIREMENTS} are taken")
        for index, req in enumerate(requirements):
            problem = requirement_problem(req)
            if problem:
                raise DependencyError(plugin, f"plugin.json: dependencies[{index}]: {problem}")
        env_dir = os.path.join(self._root, f"{plugin}-{self._key(requirements)}")
        lock = self._locks.setdefault(env_dir, asyncio.Lock())
        async with lock:
            if not os.path.exists(os.path.join(env_dir, COMPLETE_MARK)):
                await self._build_locked(plugin, env_dir, requirements, from_source)
        return _site_packages(env_dir)

    def _key(self, requirements: list[str]) -> str:
        material = json.dumps([sys.version, sys.executable, sorted(requirements), self._wheel_dir,
                               self._offline, self._index_url])
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    async def _build_locked(self, plugin: str, env_dir: str, requirements: list[str], from_source: bool) -> None:
        os.makedirs(self._root, exist_ok=True)
        lock_file = await asyncio.to_thread(open, env_dir + ".lock", "w")
        try:
            # Another host process may be building the same environment: wait for it.
            await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
            if not os.path.exists(os.path.join(env_dir, COMPLETE_MARK)):
                await self._build(plugin, env_dir, requirements, from_source)
        finally:
            lock_file.close()

    async def _build(self, plugin: str, env_dir: str, requirements: list[str], from_source: bool) -> None:
        uv = find_uv()
        if uv is None:
            raise DependencyError(plugin, "needs dependencies but uv is not installed (pip install uv)")
        scratch = f"{env_dir}.building-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        # A long install is never silent: a line when it starts, one when it ends, uv's own at DEBUG.
        log.info("plugin %s: installing %d dependenc%s with uv", plugin, len(requirements),
                 "y" if len(requirements) == 1 else "ies")
        began = time.monotonic()
        verbosity = "--verbose" if log.isEnabledFor(logging.DEBUG) else "--quiet"
        deadline = time.monotonic() + self._timeout
        try:
            # install_timeout bounds the whole environment: uv, and each source build it needs
            async with asyncio.timeout(self._timeout):
                await asyncio.to_thread(_make_environment, scratch)
                await self._install(plugin, [uv, "pip", "install", verbosity, "--python",
                                             os.path.join(scratch, "bin", "python"), "--link-mode", "hardlink"],
                                    requirements, from_source, deadline)
            mark = json.dumps({"plugin": plugin, "requirements": requirements})
            await asyncio.to_thread(Path(scratch, COMPLETE_MARK).write_text, mark)
            await asyncio.to_thread(shutil.rmtree, env_dir, True)
            os.rename(scratch, env_dir)
        except TimeoutError:
            raise DependencyError(plugin, f"installing its dependencies took longer than install_timeout="
                                          f"{self._timeout:g} s") from None
        finally:  # also when the host stops meanwhile: no half environment is left behind
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, True))
        seconds = time.monotonic() - began
        self.install_seconds[plugin] = self.install_seconds.get(plugin, 0.0) + seconds
        size = await asyncio.to_thread(_tree_bytes, env_dir)
        log.info("plugin %s: dependencies installed in %.1f s (%.1f MB)", plugin, seconds, size / 2**20)
        self._remove_stale(plugin, env_dir)

    async def _install(self, plugin: str, install: list[str], requirements: list[str], from_source: bool,
                       deadline: float) -> None:
        """uv, wheels only; each project uv finds no wheel of is built from source in the sandbox
        (source_builds.py) and uv tries again with that wheel. Wheels built for this plugin before are
        offered to uv only once it finds no other: a wheel the operator puts in wheel_dir (or the
        index gains) later wins over an old build."""
        built_dir = os.path.join(self._state_dir, "built-wheels", plugin)
        built: set[str] = set()
        use_built = False
        while True:
            extra = []
            if use_built and os.path.isdir(built_dir):
                # uv's cache knows a find-links wheel by its directory and file name, not its content:
                # a project built again (the same name, other code) installed the first build's files,
                # even after built-wheels/ and envs/ were wiped (attack pass 56)
                refresh = [f"--refresh-package={name}" for name in _wheel_projects(built_dir)]
                extra = ["--find-links", built_dir, *refresh]
            try:
                await self._uv(plugin, [*install, *self._index_args(), *extra, *requirements])
                return
            except UvFailed as exc:
                match = NEEDS_BUILD.search(exc.output)
                if match is None or not from_source or self.source_builds is None:
                    raise
                project = match.group(1)
                if not use_built and _has_wheel(built_dir, project):
                    use_built = True  # built before: offered now, and built again only if it does not fit
                    continue
                if project in built:  # built, and uv still wants another: the built one does not fit
                    raise
                if len(built) >= MAX_SOURCE_BUILDS:
                    raise DependencyError(plugin, f"more than {MAX_SOURCE_BUILDS} dependencies need building "
                                                  f"from source; {project} is one too many") from None
            built.add(project)
            use_built = True
            await self._build_from_source(plugin, project, requirements, built_dir, deadline)

    async def _build_from_source(self, plugin: str, project: str, requirements: list[str], built_dir: str,
                                 deadline: float) -> None:
        from .sdists import SdistNotFound, find_sdist, wanted_versions
        assert self.source_builds is not None
        sdist_dir = os.path.join(self._state_dir, "sdists", plugin)
        await asyncio.to_thread(_fresh_directory, sdist_dir)
        try:
            sdist = await asyncio.to_thread(
                find_sdist, project, wanted_versions(project, requirements), sdist_dir, wheel_dir=self._wheel_dir,
                index_url=self._index_url, offline=self._offline,
                timeout=max(0.001, min(deadline - time.monotonic(), 300.0)))
        except SdistNotFound as exc:
            raise DependencyError(plugin, str(exc)) from None
        try:
            await self.source_builds.wheel(plugin, sdist, built_dir)
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, sdist_dir, True))

    def _index_args(self) -> list[str]:
        args = ["--no-build"]  # wheels only: building an sdist runs its code in the host, unsandboxed
        if self._wheel_dir is not None:
            args += ["--no-index", "--find-links", self._wheel_dir]
        elif self._index_url is not None:
            args += ["--index-url", self._index_url]
        if self._offline:
            args.append("--offline")
        return args

    async def _uv(self, plugin: str, argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, cwd=self._root, env=_uv_environment(), start_new_session=True,
                preexec_fn=die_with_host())
        except OSError as exc:
            raise DependencyError(plugin, f"uv could not be started: {exc.strerror or exc}") from None
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), self._timeout)
        except asyncio.TimeoutError:
            await _end(proc)
            raise DependencyError(plugin, f"uv took longer than {self._timeout:g} s") from None
        except BaseException:  # the host is stopping: uv and whatever it started go too
            await asyncio.shield(_end(proc))
            raise
        if log.isEnabledFor(logging.DEBUG):
            for line in output.decode(errors="replace").splitlines():
                log.debug("plugin %s: uv: %s", plugin, line)
        if proc.returncode != 0:
            text = " ".join(output.decode(errors="replace").split())
            raise UvFailed(plugin, f"installing dependencies failed: {text[-4000:]}", output.decode(errors="replace"))

    def _remove_stale(self, plugin: str, keep: str) -> None:
        """Environments of older requirement lists of this plugin are dead weight."""
        for path in glob.glob(os.path.join(self._root, glob.escape(plugin) + "-" + "?" * 16)):
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                try:
                    os.unlink(path + ".lock")
                except FileNotFoundError:
                    pass


def _wheel_projects(directory: str) -> list[str]:
    """The projects of the wheels in `directory`, by their file names."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted({name.split("-", 1)[0] for name in names if name.endswith(".whl") and "-" in name})


def _has_wheel(directory: str, project: str) -> bool:
    from packaging.utils import canonicalize_name
    prefix = canonicalize_name(project).replace("-", "_") + "-"
    try:
        return any(name.lower().startswith(prefix) and name.endswith(".whl") for name in os.listdir(directory))
    except OSError:
        return False


def _fresh_directory(path: str) -> None:
    """An empty directory only the host writes, that a build job's uid may read."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o755)
    os.chmod(path, 0o755)


def _tree_bytes(path: str) -> int:
    """Disk space the files under `path` take (each hard-linked file once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


async def _end(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()


def sweep_partial_builds(state_dir: str) -> list[str]:
    """Scratch environments (NAME-KEY.building-PID) of hosts that are gone: removed."""
    removed = []
    for path in glob.glob(os.path.join(state_dir, "envs", "*.building-*")):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _make_environment(path: str) -> None:
    """An empty virtual environment of the host's interpreter for uv to install into: a pyvenv.cfg,
    bin/python and site-packages, all a worker (which only adds site-packages) and uv need. `uv venv`
    took 120 ms here to make it, a third of a plugin's first start from uv's warm cache."""
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    version = sys.version_info
    os.makedirs(os.path.join(path, "lib", f"python{version.major}.{version.minor}", "site-packages"))
    os.makedirs(os.path.join(path, "bin"))
    os.symlink(base, os.path.join(path, "bin", "python"))
    with open(os.path.join(path, "pyvenv.cfg"), "w") as f:
        f.write(f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\n"
                f"version = {version.major}.{version.minor}.{version.micro}\n")


def _site_packages(env_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(env_dir), "lib", "python*", "site-packages")))


def _uv_environment() -> dict[str, str]:
    """uv must not pick up a VIRTUAL_ENV or project of the host's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}
    env["UV_NO_CONFIG"] = "1"
    return env
