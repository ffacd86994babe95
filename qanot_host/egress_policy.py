"""Which addresses a plugin's narrowed network grant reaches: the policy the egress gate
(egress.py) applies to each connect() it is handed.

Host names are matched by address: the host resolves the granted names itself (cached for
RESOLVE_TTL, resolved again when an address does not match, one look-up of a name at a time, on
threads of its own, bounded by DNS_TIMEOUT) and allows an address one of them has. The host's own
addresses, link-local and cloud metadata addresses are never reached by a grant that does not name
them literally.

getaddrinfo() cannot be interrupted: a look-up that times out keeps its thread until the resolver
gives up. So each plugin may hold only DNS_THREADS_PER_PLUGIN of the shared threads, answered or not
(a plugin whose own names' DNS never answers, connecting in a loop, once held all four there were
and every other plugin's look-up timed out behind it), and a look-up that went unanswered is not
taken to mean the name has no address: the name's last addresses stay in use until one answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import socket
import time

import psutil

from qanot_worker import protocol as p

__all__ = ["EgressPolicy", "LOCAL_NAMES", "host_addresses", "literal_address"]

log = logging.getLogger("qanot_host.egress")

RESOLVE_TTL = 30.0
REFRESH_AFTER = 1.0  # an address that matches no cached name is looked up again after this long
DNS_TIMEOUT = 5.0  # a look-up of a granted name that takes longer goes unanswered, this time
DNS_THREADS = 32  # name look-ups for every plugin's egress, apart from the host's other threads (made as needed)
DNS_THREADS_PER_PLUGIN = 2  # of them, held by one plugin's look-ups that have not come back


class EgressPolicy:
    """Which (address, port) a plugin may connect to: any host on `ports`, or the `hosts` pairs."""

    def __init__(self, plugin: str, ports: list[int], hosts: list[tuple[str, int]],
                 nameservers: list[str] | None = None) -> None:
        self.plugin = plugin
        self.ports = set(ports)
        self.hosts = hosts
        # DNS (over TCP) when a name may need resolving: any host on a port, or a granted name
        wants_names = bool(ports) or any(literal_address(host) is None for host, _ in hosts)
        self._dns = {(literal_address(ns), 53) for ns in (nameservers if nameservers is not None else _nameservers())
                     if literal_address(ns) is not None} if wants_names else set()
        self._resolved: dict[str, tuple[float, set[str]]] = {}
        self._resolving: dict[str, asyncio.Future] = {}  # one look-up of a name at a time
        self._threads_held = 0  # look-ups of ours still in a thread (timed out or not)
        self._unanswered: dict[str, tuple[float, str]] = {}  # name -> when and why its last look-up went unanswered

    @classmethod
    def from_spec(cls, plugin: str, spec: p.SandboxSpec) -> "EgressPolicy":
        return cls(plugin, list(spec.tcp_ports), [(str(host), int(port)) for host, port in spec.tcp_hosts])

    def unanswered(self, port: int) -> list[str]:
        """The granted names for `port` whose latest look-up went unanswered, with why: a denial of
        an address they might have had says so, instead of that the address is not granted."""
        return [f"{host} ({self._unanswered[host][1]})" for host, granted_port in self.hosts
                if granted_port == port and host in self._unanswered]

    def describe(self) -> str:
        parts = [f"{host}:{port}" for host, port in self.hosts] + [f"any host:{port}" for port in sorted(self.ports)]
        return ", ".join(parts)

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
        cached = self._resolved.get(host)
        if cached is not None and now - cached[0] < (REFRESH_AFTER if refresh else RESOLVE_TTL):
            return cached[1]
        failed = self._unanswered.get(host)
        if failed is not None and now - failed[0] < REFRESH_AFTER:  # asked again after a pause, not at every connect
            return cached[1] if cached is not None else set()
        pending = self._resolving.get(host)
        if pending is None:  # every connect that needs this name meanwhile waits for this one look-up
            pending = self._resolving[host] = asyncio.ensure_future(self._resolve(host))
            pending.add_done_callback(lambda _: self._resolving.pop(host, None))
        return await asyncio.shield(pending)

    async def _resolve(self, host: str) -> set[str]:
        if self._threads_held >= DNS_THREADS_PER_PLUGIN:
            return self._went_unanswered(host, f"{self._threads_held} earlier look-ups of its names have not come back")
        loop = asyncio.get_running_loop()
        lookup = _dns_executor().submit(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
        self._threads_held += 1
        lookup.add_done_callback(lambda _: _call_soon(loop, self._thread_back))
        try:
            infos = await asyncio.wait_for(asyncio.wrap_future(lookup, loop=loop), DNS_TIMEOUT)
        except asyncio.TimeoutError:
            return self._went_unanswered(host, f"no answer within {DNS_TIMEOUT:g} s")
        except OSError as exc:
            log.warning("plugin %s: granted host %s does not resolve: %s", self.plugin, host, exc)
            addresses: set[str] = set()
        else:
            addresses = {literal_address(str(info[4][0])) or str(info[4][0]) for info in infos}
        self._unanswered.pop(host, None)
        self._resolved[host] = (time.monotonic(), addresses)
        return addresses

    def _thread_back(self) -> None:
        self._threads_held -= 1

    def _went_unanswered(self, host: str, why: str) -> set[str]:
        """No answer is not "no address": the name's last known addresses, if any, stay in use."""
        if host not in self._unanswered:
            log.warning("plugin %s: the look-up of granted host %s went unanswered: %s%s", self.plugin, host, why,
                        "; its last known addresses stay in use" if host in self._resolved else "")
        self._unanswered[host] = (time.monotonic(), why)
        cached = self._resolved.get(host)
        return cached[1] if cached is not None else set()


def _call_soon(loop: asyncio.AbstractEventLoop, callback) -> None:
    """From a DNS thread: run `callback` on the host's loop (if it is still there)."""
    try:
        loop.call_soon_threadsafe(callback)
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


@functools.lru_cache(maxsize=1)
def _dns_executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="qanot-egress-dns")


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
