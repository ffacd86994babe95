import json

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="dep_source_build", description="What qhtest-source's setup.py could do while it was built.")
    async def build(self, params: dict) -> str:
        import qhtest_source
        return json.dumps({"build": qhtest_source.BUILD, "file": qhtest_source.__file__})
