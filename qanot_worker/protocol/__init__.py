"""The wire protocol between the supervisor and a worker, written down once.

Both sides import this package (and nothing else of each other's); neither defines a message of
its own. A frame is a 4-byte big-endian length followed by that many bytes of msgpack. Every
message is a tagged msgspec Struct, so a frame of the wrong shape fails in msgspec's decoder with
an error that says what was expected.

Conversation::

    worker -> host   Hello(protocol, pid)              first frame, before any plugin code runs
    host -> worker   Load(id, ...)       -> Loaded      import plugin.py, find the Plugin class
    host -> worker   Setup(id, config)   -> Done        plugin.setup(config)
    host -> worker   GetTools(id)        -> ToolList    plugin.get_tools()
    host -> worker   Call(id, tool, params) -> Result | Failure   many in flight at once
    host -> worker   Cancel(id)                         the host gave up on call `id`
    host -> worker   Ping(id)            -> Pong        liveness of the worker's event loop
    host -> worker   Teardown(id)        -> Done        plugin.teardown(), then the worker exits

Any request may be answered with Failure(id, kind, message) instead.

The package holds the messages (`messages`), their framing (`framing`) and the write policy
(`outbox`); everything is re-exported here, so both sides write ``from qanot_worker import
protocol as p`` and name ``p.Call``, ``p.FrameBuffer``, ``p.Outbox``.
"""

from .framing import *  # noqa: F403
from .framing import __all__ as _framing
from .messages import *  # noqa: F403
from .messages import __all__ as _messages
from .outbox import *  # noqa: F403
from .outbox import __all__ as _outbox

__all__ = [*_messages, *_framing, *_outbox]
