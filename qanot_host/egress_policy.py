"""Which addresses a plugin's narrowed network grant reaches: the policy the egress gate
(egress.py) applies to each connect() it is handed.

Host names are matched by address: the host resolves the granted names itself (cached for
RESOLVE_TTL, resolved again when an address does not match, one look-up of a name at a time, on
threads of its own, bounded by DNS_TIMEOUT) and allows an address one of them has. The host's own
addresses, link-local and cloud metadata addresses are never reached by a grant that does not name
them literally.

getaddrinfo() cannot be interrupted: a look-up that goes unanswered keeps its thread until the
resolver gives up (10 s with glibc's defaults). So the look-ups of every plugin's egress are the
host's NameResolver's: a thread each (a daemon: one that never ends does not hold the host's exit),
at most DNS_THREADS in all and DNS_THREADS_PER_PLUGIN per plugin, answered or not, counted per
plugin across its workers (one that crashes itself over and over gets no more). A look-up that
cannot have a thread is not queued behind the others (a queue once made every other plugin's
look-up time out behind one plugin's): it is refused at once, and said so. A look-up that went
unanswered, or was refused, is not taken to mean the name has no address: the name's last known
addresses, kept per plugin across its workers, stay in use until one answers.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import threading
import time

import psutil

from qanot_worker import protocol as p

__all__ = ["EgressPolicy", "NameResolver", "LOCAL_NAMES", "host_addresses", "literal_address"]

log = logging.getLogger("qanot_host.egress")

RESOLVE_TTL = 30.0
REFRESH_AFTER = 1.0  # an address that matches no cached name is looked up again after this long
DNS_TIMEOUT = 5.0  # a look-up of a granted name that takes longer goes unanswered, this time
DNS_THREADS = 64  # look-ups in flight (or hung) for every plugin's egress, apart from the host's other threads
DNS_THREADS_PER_PLUGIN = 2  # of them, one plugin's (across its workers)


class _Names:
    """One plugin's names, as its workers' egress saw them (kept across its workers)."""

    def __init__(self) -> None:
        self.resolved: dict[str, tuple[float, set[str]]] = {}
        self.resolving: dict[str, asyncio.Future] = {}  # one look-up of a name at a time
        self.unanswered: dict[str, tuple[float, str]] = {}  # name -> when and why it could not be resolved


class NameResolver:
    """The host's look-ups of granted names, for every plugin's egress (see the module's doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the counts go down in the look-up's own thread
        self._held: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._names: dict[str, _Names] = {}

    def names(self, plugin: str) -> _Names:
        names = self._names.get(plugin)
        if names is None:
            names = self._names[plugin] = _Names()
        return names

    def lookup(self, plugin: str, host: str, loop: asyncio.AbstractEventLoop) -> "asyncio.Future[list] | str":
        """A look-up of `host` under way in a thread of its own, or why it cannot have one now."""
        with self._lock:
            if self._held[plugin] >= DNS_THREADS_PER_PLUGIN:
                return f"not looked up: {self._held[plugin]} earlier look-ups of its names have not come back"
            if self._total >= DNS_THREADS:
                return f"not looked up: all {DNS_THREADS} of the host's look-up threads are held by look-ups " \
                       "that have not come back (other plugins' names)"
            self._held[plugin] += 1
            self._total += 1
        answer: asyncio.Future[list] = loop.create_future()
        threading.Thread(target=self._look_up, args=(plugin, host, loop, answer), name="qanot-egress-dns",
                         daemon=True).start()
        return answer

    def _look_up(self, plugin: str, host: str, loop: asyncio.AbstractEventLoop, answer: asyncio.Future) -> None:
        try:
            outcome: tuple[list | None, BaseException | None] = (
                socket.getaddrinfo(host, None, type=socket.SOCK_STREAM), None)
        except OSError as exc:
            outcome = (None, exc)
        except Exception as exc:  # noqa: BLE001 - a resolver's oddity is this name's failure, not the thread's end
            outcome = (None, OSError(0, f"{type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._held[plugin] -= 1
                self._total -= 1
        _call_soon(loop, _settle, answer, outcome)


def _settle(answer: asyncio.Future, outcome: tuple) -> None:
    if not answer.done():  # else the caller stopped waiting (its time was up)
        infos, exc = outcome
        if exc is not None:
            answer.set_exception(exc)
        else:
            answer.set_result(infos)


class EgressPolicy:
    """Which (address, port) a plugin may connect to: any host on `ports`, or the `hosts` pairs."""

    def __init__(self, plugin: str, ports: list[int], hosts: list[tuple[str, int]], resolver: NameResolver,
                 nameservers: list[str] | None = None) -> None:
        self.plugin = plugin
        self._resolver = resolver
        self._names = resolver.names(plugin)
        self.ports = set(ports)
        self.hosts = hosts
        # DNS (over TCP) when a name may need resolving: any host on a port, or a granted name
        wants_names = bool(ports) or any(literal_address(host) is None for host, _ in hosts)
        self._dns = {(literal_address(ns), 53) for ns in (nameservers if nameservers is not None else _nameservers())
                     if literal_address(ns) is not None} if wants_names else set()

    @classmethod
    def from_spec(cls, plugin: str, spec: p.SandboxSpec, resolver: NameResolver) -> "EgressPolicy":
        return cls(plugin, list(spec.tcp_ports), [(str(host), int(port)) for host, port in spec.tcp_hosts], resolver)

    def unanswered(self, port: int) -> list[str]:
        """The granted names for `port` that could not be resolved last time, with why: a denial of
        an address they might have had says so, instead of that the address is not granted."""
        unanswered = self._names.unanswered
        return [f"{host} ({unanswered[host][1]})" for host, granted_port in self.hosts
                if granted_port == port and host in unanswered]

    def describe(self) -> str:
        parts = [f"{host}:{port}" for host, port in self.hosts] + [f"any host:{port}" for port in sorted(self.ports)]
        return ", ".join(parts)

    def internal_on_a_granted_port(self, address: str, port: int) -> bool:
        """A denial that a `ports` grant seems to allow: the address is one of the host's own (or
        link-local, metadata, unspecified), which "any host" never covers; its message says so."""
        return port in self.ports and _internal(address)

    async def allows(self, address: str, port: int) -> bool:
        """The host's own addresses (loopback, and every address of its interfaces), link-local and
        the other cloud metadata addresses, and unspecified ones are reached only when the grant
        names them: as an IP literal, or as "localhost". A `ports` grant (any host) and a name
        whose DNS its owner controls do not reach them."""
        if (address, port) in self._dns:
            return True
        internal = _internal(address)
        if port in self.ports and not internal:
            return True
        for refresh in (False, True):
            for host, granted_port in self.hosts:
                if granted_port != port:
                    continue
                named = literal_address(host) is None and host not in LOCAL_NAMES
                if address in await self._addresses(host, refresh) and not (internal and named):
                    return True
        return False

    async def _addresses(self, host: str, refresh: bool) -> set[str]:
        literal = literal_address(host)
        if literal is not None:
            return {literal}
        now = time.monotonic()
        names = self._names
        cached = names.resolved.get(host)
        if cached is not None and now - cached[0] < (REFRESH_AFTER if refresh else RESOLVE_TTL):
            return cached[1]
        failed = names.unanswered.get(host)
        if failed is not None and now - failed[0] < REFRESH_AFTER:  # asked again after a pause, not at every connect
            return cached[1] if cached is not None else set()
        pending = names.resolving.get(host)
        if pending is None:  # every connect that needs this name meanwhile waits for this one look-up
            pending = names.resolving[host] = asyncio.ensure_future(self._resolve(host))
            pending.add_done_callback(lambda _: names.resolving.pop(host, None))
        return await asyncio.shield(pending)

    async def _resolve(self, host: str) -> set[str]:
        lookup = self._resolver.lookup(self.plugin, host, asyncio.get_running_loop())
        if isinstance(lookup, str):
            return self._unresolved(host, lookup)
        try:
            infos = await asyncio.wait_for(lookup, DNS_TIMEOUT)
        except asyncio.TimeoutError:
            return self._unresolved(host, f"the look-up went unanswered: no answer within {DNS_TIMEOUT:g} s")
        except OSError as exc:
            log.warning("plugin %s: granted host %s does not resolve: %s", self.plugin, host, exc)
            addresses: set[str] = set()
        else:
            addresses = {literal_address(str(info[4][0])) or str(info[4][0]) for info in infos}
        self._names.unanswered.pop(host, None)
        self._names.resolved[host] = (time.monotonic(), addresses)
        return addresses

    def _unresolved(self, host: str, why: str) -> set[str]:
        """No answer is not "no address": the name's last known addresses, if any, stay in use."""
        names = self._names
        if host not in names.unanswered:
            log.warning("plugin %s: granted host %s could not be resolved: %s%s", self.plugin, host, why,
                        "; its last known addresses stay in use" if host in names.resolved else "")
        names.unanswered[host] = (time.monotonic(), why)
        cached = names.resolved.get(host)
        return cached[1] if cached is not None else set()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """From a look-up's thread: run `callback` on the host's loop (if it is still there)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop is closed: the host has stopped


LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


# Cloud metadata services outside link-local: AWS's over IPv6 (fd00:ec2::254), Alibaba Cloud's,
# and Azure's wire server. (169.254.169.254, where most keep instance credentials, is link-local.)
METADATA_NETWORKS = [ipaddress.ip_network(n) for n in ("fd00:ec2::/32", "100.100.100.200/32", "168.63.129.16/32")]
OWN_ADDRESSES_TTL = 10.0
_own_addresses: tuple[float, frozenset[str]] = (-OWN_ADDRESSES_TTL, frozenset())


def _internal(address: str) -> bool:
    """The host itself (loopback, and any address of its own interfaces: a service listening on all
    of them is the host's), link-local, cloud metadata, or no address at all: never reached by a
    grant that does not name it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return True
    if any(ip in network for network in METADATA_NETWORKS if network.version == ip.version):
        return True
    return str(ip) in host_addresses()


def host_addresses() -> frozenset[str]:
    """The addresses of this machine's interfaces (in the host's network namespace), refreshed
    every OWN_ADDRESSES_TTL seconds."""
    global _own_addresses
    stamp, addresses = _own_addresses
    now = time.monotonic()
    if now - stamp >= OWN_ADDRESSES_TTL:
        found = set()
        for entries in psutil.net_if_addrs().values():
            for entry in entries:
                if entry.family in (socket.AF_INET, socket.AF_INET6):
                    literal = literal_address(entry.address)
                    if literal is not None:
                        found.add(literal)
        _own_addresses = (now, addresses := frozenset(found))
    return addresses


def literal_address(host: str) -> str | None:
    """The canonical text of an IP address (an IPv4-mapped IPv6 address as IPv4), None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path) as f:
            return [line.split()[1] for line in f if line.startswith("nameserver") and len(line.split()) > 1]
    except OSError:
        return []
