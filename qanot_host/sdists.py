"""Finding and fetching the source distribution of a dependency that ships no wheel.

The host only downloads here; it never opens the archive (unpacking it, reading its pyproject.toml
and building it all happen in a sandboxed build job: source_builds.py). What it checks is what it
can without reading the archive: the file's name (project and version), its size, and its sha256
against the index's.
"""

from __future__ import annotations

import hashlib
import html.parser
import ipaddress
import json
import os
import socket
import time
import urllib.parse
import urllib.request
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import Version

from .safe_files import open_regular_file

__all__ = ["SdistNotFound", "wanted_versions", "find_sdist", "PYPI_SIMPLE"]

PYPI_SIMPLE = "https://pypi.org/simple"
MAX_SDIST_BYTES = 256 * 2**20
MAX_INDEX_PAGE_BYTES = 64 * 2**20
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


class SdistNotFound(Exception):
    """No source distribution of that project fits (the message says where it was looked for)."""


def wanted_versions(project: str, requirements: list[str]) -> SpecifierSet:
    """The version constraints the plugin's own requirements put on `project` (none for a project
    only another package depends on: uv then says whether the version built fits)."""
    from packaging.requirements import Requirement
    spec = SpecifierSet()
    for entry in requirements:
        requirement = Requirement(entry)
        if canonicalize_name(requirement.name) == canonicalize_name(project):
            spec &= requirement.specifier
    return spec


def find_sdist(project: str, spec: SpecifierSet, dest_dir: str, *, wheel_dir: str | None,
               index_url: str | None, offline: bool, timeout: float) -> str:
    """The newest fitting sdist of `project`, as a file in dest_dir (copied from wheel_dir, or
    downloaded from the index and checked against its sha256), all within `timeout` seconds.
    SdistNotFound if there is none."""
    deadline = time.monotonic() + timeout
    if wheel_dir is not None:
        candidates = [(name, os.path.join(wheel_dir, name), "") for name in sorted(os.listdir(wheel_dir))]
        where = wheel_dir
    elif offline:
        raise SdistNotFound(f"{project} ships no wheel, and the host is offline with no wheel_dir to "
                            "find its source distribution in")
    else:
        index = index_url or os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or PYPI_SIMPLE
        page = f"{index.rstrip('/')}/{canonicalize_name(project)}/"
        candidates = _index_files(page, deadline)
        where = page
    best: tuple[Version, str, str, str] | None = None
    for filename, url, sha256 in candidates:
        try:
            name, version = parse_sdist_filename(filename)
        except InvalidSdistFilename:
            continue
        if name != canonicalize_name(project) or not list(spec.filter([version])):
            continue
        if best is None or version > best[0]:
            best = (version, filename, url, sha256)
    if best is None:
        wanted = f" ({spec})" if str(spec) else ""
        raise SdistNotFound(f"{project} ships no wheel, and no source distribution of it{wanted} was found "
                            f"in {where}")
    _, filename, url, sha256 = best
    if where != wheel_dir and not _allowed_url(url, where):  # looked up for this one link only
        raise SdistNotFound(f"{project}: the index sends the host to {url}, which it does not fetch from "
                            "(http(s) only, never this machine or a link-local address)")
    target = os.path.join(dest_dir, filename)
    _fetch(url, target, sha256, deadline)
    return target


def _index_files(page: str, deadline: float) -> list[tuple[str, str, str]]:
    """(filename, url, sha256 or "") of every file a PEP 691 (JSON) or PEP 503 (HTML) project page
    lists, yanked ones left out."""
    parsed = urllib.parse.urlparse(page)
    if parsed.scheme == "file" and os.path.isdir(urllib.request.url2pathname(parsed.path)):
        page += "index.html"
    request = urllib.request.Request(page, headers={"Accept": f"{JSON_TYPE}, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=_op_timeout(deadline)) as response:  # noqa: S310 - the operator's
            body = bytearray()
            while chunk := response.read1(1 << 20):  # at most one receive: a trickle meets the deadline
                body += chunk
                if len(body) > MAX_INDEX_PAGE_BYTES or time.monotonic() > deadline:
                    break
            content_type = response.headers.get("Content-Type", "") if hasattr(response, "headers") else ""
            base = response.geturl()
    except OSError as exc:
        raise SdistNotFound(f"the package index could not be read at {page}: {exc}") from None
    if len(body) > MAX_INDEX_PAGE_BYTES:
        raise SdistNotFound(f"{page}: the index page is larger than {MAX_INDEX_PAGE_BYTES} bytes")
    if time.monotonic() > deadline:
        raise SdistNotFound(f"{page}: reading the index page took longer than its deadline")
    if JSON_TYPE in content_type:
        try:
            files = json.loads(body)["files"]
            return [(str(f["filename"]), urllib.parse.urljoin(base, str(f["url"])),
                     str(f.get("hashes", {}).get("sha256", ""))) for f in files if not f.get("yanked")]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SdistNotFound(f"{page}: not a PEP 691 project page ({exc})") from None
    links = _Links()
    links.feed(body.decode("utf-8", "replace"))
    found = []
    for href, text, yanked in links.found:
        url = urllib.parse.urljoin(base, href)
        fragment = urllib.parse.urlparse(url).fragment
        sha256 = fragment[len("sha256="):] if fragment.startswith("sha256=") else ""
        if not yanked:
            found.append((text.strip(), url.split("#", 1)[0], sha256))
    return found


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, bool]] = []  # href, text, yanked
        self._open: tuple[str, bool] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            values = dict(attrs)
            self._open = (values.get("href") or "", "data-yanked" in values)
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            self.found.append((self._open[0], self._text, self._open[1]))
            self._open = None


def _fetch(url: str, target: str, sha256: str, deadline: float) -> None:
    """Copy or download `url` to `target`: at most MAX_SDIST_BYTES, before `deadline`, and matching
    `sha256` if given. A local file must be a regular file (not reached through a link) that any
    user may read: the host hands it to the build job's uid, so it never publishes a file only root
    could read."""
    digest = hashlib.sha256()
    size = 0
    partial = target + ".part"
    try:
        with _open_source(url, deadline) as source, open(partial, "wb") as out:
            while chunk := source.read1(1 << 20):  # at most one receive: a trickle meets the deadline
                size += len(chunk)
                if size > MAX_SDIST_BYTES:
                    raise SdistNotFound(f"{url} is larger than {MAX_SDIST_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise SdistNotFound(f"{url}: fetching it took longer than its deadline")
                digest.update(chunk)
                out.write(chunk)
        if sha256 and digest.hexdigest() != sha256.lower():
            raise SdistNotFound(f"{url}: its sha256 is {digest.hexdigest()}, the index says {sha256}")
        os.chmod(partial, 0o644)  # the build job runs as a uid of its own: it must read it
        os.replace(partial, target)
    except OSError as exc:
        raise SdistNotFound(f"{url} could not be fetched: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _open_source(url: str, deadline: float) -> Any:
    parsed = urllib.parse.urlparse(url)
    if "://" not in url or parsed.scheme == "file":
        path = urllib.request.url2pathname(parsed.path) if "://" in url else url
        fd, info = open_regular_file(path)  # no link followed, a FIFO never waited on
        if not info.st_mode & 0o004:
            os.close(fd)
            raise SdistNotFound(f"{path} is not a regular file that every user may read; it is not fetched")
        return os.fdopen(fd, "rb")
    opener = urllib.request.build_opener(_CheckedRedirects(url))  # each redirect checked as the link was
    return opener.open(url, timeout=_op_timeout(deadline))


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, first: str) -> None:
        self._first = first
        self._hops = 0

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self._hops += 1
        if self._hops > 5 or not _allowed_url(newurl, self._first):
            fp.close()
            raise SdistNotFound(f"{self._first} redirects to {newurl}, which the host does not fetch from")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _op_timeout(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SdistNotFound("the deadline to fetch the source distribution passed")
    return min(left, 30.0)


def _allowed_url(url: str, page: str) -> bool:
    """Where an index page may send the host: http(s) only, to the index's own host, or to a host
    that is not this machine nor link-local (PyPI's files are on another host; the cloud's metadata
    service and a service listening on 127.0.0.1 are not sdists). Never a file from a remote index."""
    target, index = urllib.parse.urlparse(url), urllib.parse.urlparse(page)
    if index.scheme == "file":
        return target.scheme == "file"  # a local index (the operator's directory) links local files
    if target.scheme not in ("http", "https") or not target.hostname:
        return False
    if target.hostname == index.hostname and (target.port or 0) == (index.port or 0):
        return True
    try:
        addresses = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(target.hostname, target.port or 443)}
    except OSError:
        return False
    return bool(addresses) and not any(_internal(ipaddress.ip_address(a)) for a in addresses)


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return (address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast
            or str(address) in _own_addresses())


def _own_addresses() -> set[str]:
    """Every address of this machine's interfaces (a service bound to one is this machine's too)."""
    import psutil
    return {item.address.split("%")[0] for items in psutil.net_if_addrs().values() for item in items
            if item.family in (socket.AF_INET, socket.AF_INET6)}
