import json

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="dep_v1_version", description="Which qhtest-dep this plugin sees.")
    async def version(self, params: dict) -> str:
        import qhtest_dep
        return json.dumps({"version": qhtest_dep.__version__, "file": qhtest_dep.__file__})
