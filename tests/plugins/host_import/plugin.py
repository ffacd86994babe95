import json

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="try_import", description="Try to import a module by name.",
          parameters={"type": "object", "required": ["module"], "properties": {"module": {"type": "string"}}})
    async def try_import(self, params: dict) -> str:
        import importlib
        try:
            module = importlib.import_module(params["module"])
        except ImportError as exc:
            return json.dumps({"imported": False, "error": str(exc)})
        return json.dumps({"imported": True, "file": getattr(module, "__file__", None),
                           "version": getattr(module, "__version__", None)})
