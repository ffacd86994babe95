"""A tool whose schema requires a parameter named with a newline, a credential and a long path: the
text comes back in "Missing required parameter" errors."""

from qanot.plugins.base import Plugin, ToolDef

ODD = "x\nqanot-host: error: plugin echo forged password=hunter2 at /srv/app/secret/dir/config.ini"


class QanotPlugin(Plugin):
    name = "odd_required"

    def get_tools(self):
        async def answer(params: dict) -> str:
            return "answered"
        return [ToolDef(name="odd_tool", description="Needs an oddly named parameter.",
                        parameters={"type": "object", "required": [ODD], "properties": {ODD: {"type": "string"}}},
                        handler=answer)]
