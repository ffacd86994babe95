"""Which addresses a plugin's narrowed network grant reaches: the policy the egress gate
(egress.py) applies to each connect() it is handed.

Host names are matched by address: the host resolves the granted names itself (cached for
RESOLVE_TTL, resolved again when an address does not match, one look-up of a name at a time, on
threads of its own, bounded by DNS_TIMEOUT) and allows an address one of them has. The host's own
addresses, link-local and cloud metadata addresses are never reached by a grant that does not name
them literally.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import socket
import time
from functools import partial

import psutil

from qanot_worker import protocol as p

__all__ = ["EgressPolicy", "LOCAL_NAMES", "host_addresses", "literal_address"]

log = logging.getLogger("qanot_host.egress")

RESOLVE_TTL = 30.0
REFRESH_AFTER = 1.0  # an address that matches no cached name is looked up again after this long
DNS_TIMEOUT = 5.0  # a granted name that takes longer to resolve does not resolve, this time
DNS_THREADS = 4  # name look-ups for every plugin's egress, apart from the host's other threads


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

    @classmethod
    def from_spec(cls, plugin: str, spec: p.SandboxSpec) -> "EgressPolicy":
        return cls(plugin, list(spec.tcp_ports), [(str(host), int(port)) for host, port in spec.tcp_hosts])

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
        pending = self._resolving.get(host)
        if pending is None:  # every connect that needs this name meanwhile waits for this one look-up
            pending = self._resolving[host] = asyncio.ensure_future(self._resolve(host))
            pending.add_done_callback(lambda _: self._resolving.pop(host, None))
        return await asyncio.shield(pending)

    async def _resolve(self, host: str) -> set[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.run_in_executor(
                _dns_executor(), partial(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)), DNS_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("plugin %s: granted host %s does not resolve: %s", self.plugin, host,
                        exc if isinstance(exc, OSError) else f"no answer within {DNS_TIMEOUT:g} s")
            addresses: set[str] = set()
        else:
            addresses = {literal_address(str(info[4][0])) or str(info[4][0]) for info in infos}
        self._resolved[host] = (time.monotonic(), addresses)
        return addresses


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
