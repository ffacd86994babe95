"""The functions every out-of-host contender runs, so all do the same work."""

import json


def echo(params: dict) -> str:
    return json.dumps(params)


def blob(size: int) -> str:
    return "x" * size
