"""setup.py of the qhtest-source sdist the tests build (tests/test_source_builds.py): while it is
built, it tries what a hostile setup.py would, and records what it could do in the module it builds.
ESCAPE, SECRET and PORT are filled in by the test."""

import json
import os
import socket

from setuptools import setup

ESCAPE, SECRET, PORT = "@ESCAPE@", "@SECRET@", int("@PORT@")
seen = {"uid": os.getuid()}
try:
    with open(ESCAPE, "w") as f:
        f.write("written by a build")
    seen["wrote_outside"] = True
except OSError as exc:
    seen["wrote_outside"] = exc.strerror
try:
    with open(SECRET) as f:
        seen["secret"] = f.read()
except OSError:
    seen["secret"] = False
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    seen["connected"] = True
except OSError:
    seen["connected"] = False

os.makedirs("qhtest_source", exist_ok=True)
with open("qhtest_source/__init__.py", "w") as f:
    f.write(f"BUILD = {json.dumps(seen)!r}\nimport json as _json\nBUILD = _json.loads(BUILD)\n")
setup(name="qhtest-source", version="1.0", packages=["qhtest_source"])
