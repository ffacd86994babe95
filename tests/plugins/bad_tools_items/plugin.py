from qanot.plugins.base import Plugin


class QanotPlugin(Plugin):
    def get_tools(self):
        return ["just a string"]
