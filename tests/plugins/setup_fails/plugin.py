from qanot.plugins.base import Plugin


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        raise ConnectionError("database at db.invalid refused the connection")
