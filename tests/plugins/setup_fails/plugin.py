from qanot.plugins.base import Plugin


class QanotPlugin(Plugin):
    async def setup(self, config: dict) -> None:
        raise ConnectionError("database at db.invalid refused the connection")
