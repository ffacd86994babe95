import json

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    """pyaes ships on PyPI as a source distribution only (as Qanot's userbot plugin needs it)."""

    def get_tools(self):
        return self._collect_tools()

    @tool(name="aes_vector", description="FIPS-197's AES-128 example through pyaes.")
    async def aes_vector(self, params: dict) -> str:
        import pyaes
        cipher = pyaes.AES(bytes(range(16)))
        out = cipher.encrypt(list(bytes.fromhex("00112233445566778899aabbccddeeff")))
        return json.dumps({"ciphertext": bytes(out).hex(), "file": pyaes.__file__})
