"""Finding and fetching the source distribution of a dependency that ships no wheel.

The host only downloads here; it never opens the archive (unpacking it, reading its pyproject.toml
and building it all happen in a sandboxed build job: source_builds.py). What it checks is what it
can without reading the archive: the file's name (project and version), its size, and its sha256
against the index's.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import urllib.parse
import urllib.request

from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import Version

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
    downloaded from the index and checked against its sha256). SdistNotFound if there is none."""
    if wheel_dir is not None:
        candidates = [(name, os.path.join(wheel_dir, name), "") for name in sorted(os.listdir(wheel_dir))]
        where = wheel_dir
    elif offline:
        raise SdistNotFound(f"{project} ships no wheel, and the host is offline with no wheel_dir to "
                            "find its source distribution in")
    else:
        index = index_url or os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or PYPI_SIMPLE
        page = f"{index.rstrip('/')}/{canonicalize_name(project)}/"
        candidates = _index_files(page, timeout)
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
    target = os.path.join(dest_dir, filename)
    _fetch(url, target, sha256, timeout)
    return target


def _index_files(page: str, timeout: float) -> list[tuple[str, str, str]]:
    """(filename, url, sha256 or "") of every file a PEP 691 (JSON) or PEP 503 (HTML) project page
    lists, yanked ones left out."""
    parsed = urllib.parse.urlparse(page)
    if parsed.scheme == "file" and os.path.isdir(urllib.request.url2pathname(parsed.path)):
        page += "index.html"
    request = urllib.request.Request(page, headers={"Accept": f"{JSON_TYPE}, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the operator's index
            body = response.read(MAX_INDEX_PAGE_BYTES + 1)
            content_type = response.headers.get("Content-Type", "") if hasattr(response, "headers") else ""
            base = response.geturl()
    except OSError as exc:
        raise SdistNotFound(f"the package index could not be read at {page}: {exc}") from None
    if len(body) > MAX_INDEX_PAGE_BYTES:
        raise SdistNotFound(f"{page}: the index page is larger than {MAX_INDEX_PAGE_BYTES} bytes")
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


def _fetch(url: str, target: str, sha256: str, timeout: float) -> None:
    """Copy or download `url` to `target`: at most MAX_SDIST_BYTES, and matching `sha256` if given."""
    digest = hashlib.sha256()
    size = 0
    partial = target + ".part"
    source = url if "://" in url else "file://" + urllib.request.pathname2url(os.path.abspath(url))
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response, open(partial, "wb") as out:  # noqa: S310
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > MAX_SDIST_BYTES:
                    raise SdistNotFound(f"{url} is larger than {MAX_SDIST_BYTES} bytes")
                digest.update(chunk)
                out.write(chunk)
        if sha256 and digest.hexdigest() != sha256.lower():
            raise SdistNotFound(f"{url}: its sha256 is {digest.hexdigest()}, the index says {sha256}")
        os.chmod(partial, 0o644)  # the build job runs as a uid of its own: it must read it
        os.replace(partial, target)
    except OSError as exc:
        raise SdistNotFound(f"{url} could not be fetched: {exc}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
