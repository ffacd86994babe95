"""Hostile fixture (attack pass 29): take huge pages from the machine's pool, which an operator
reserves for a database and no memory cgroup of the plugin's counts. Returns "ESCAPED ..." if the
attack worked; otherwise raises what stopped it (on a machine with no huge pages reserved, the
kernel's ENOMEM; the sandbox answers EPERM first)."""

import ctypes
import os

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, MAP_HUGETLB = 0x3, 0x22, 0x40000


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_hugetlb", description="map huge pages from the machine's pool")
    async def escape(self, params: dict) -> str:
        address = libc.mmap(None, 2 << 20, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS | MAP_HUGETLB, -1, 0)
        if address not in (None, ctypes.c_void_p(-1).value):
            return "ESCAPED: 2 MiB of huge pages mapped"
        raise PermissionError(f"mmap(MAP_HUGETLB): {os.strerror(ctypes.get_errno())}")
