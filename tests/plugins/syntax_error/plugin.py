from qanot.plugins.base import Plugin
class QanotPlugin(Plugin)
    pass
