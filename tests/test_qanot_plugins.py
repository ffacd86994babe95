"""Qanot's own bundled plugins (the `plugins/` of the qanot==2.0.4 wheel, installed by the test extra,
never copied here), run unchanged in qanot-host, each listing exactly the tools Qanot's own loader
lists with the same config: the test runs both. Plugins that log in at setup() meet a small fake
API on 127.0.0.1 (granted to them literally)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from qanot_host import Host

qanot_loader = pytest.importorskip("qanot.plugins.loader", reason="the test extra installs qanot==2.0.4")
BUNDLED = Path(qanot_loader.BUILTIN_PLUGINS_DIR)
# The first test builds the plugins' environments (aiohttp, aiomysql) from the package index.
pytestmark = pytest.mark.timeout(600)
NAMES = ["absmarket", "absvision", "amocrm", "bito", "bitrix24", "cloud_reporter", "eskiz", "ibox", "moysklad",
         "mysql_query", "onec"]

# Qanot's loader, many plugins in turn: what they all import is imported once, then each plugin is loaded
# in a fork of its own (Qanot's registries are global), which costs its own code only, not ~1 s of imports.
REFERENCE_MANY = """
import asyncio, json, os, sys
import aiohttp, aiomysql  # noqa: F401 - what the plugins import
from qanot.config import Config, PluginConfig
from qanot.plugins.loader import get_plugin_manager, load_plugins, shutdown_plugins
from qanot.registry import ToolRegistry
async def one(name, config, workspace, plugins_dir, calls):
    registry = ToolRegistry()
    await load_plugins(Config(workspace_dir=workspace, plugins_dir=plugins_dir,
                              plugins=[PluginConfig(name=name, config=config)]), registry)
    loaded = name in get_plugin_manager().loaded_plugins
    answers = [await registry.execute(tool, params) for tool, params in calls]
    await shutdown_plugins()
    return {"loaded": loaded, "tools": registry.tool_names, "answers": answers}
answers = []
for job in json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        with os.fdopen(write_end, "w") as out:
            json.dump(asyncio.run(one(*job)), out)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as got:
        text = got.read()
    _, status = os.waitpid(pid, 0)
    answers.append(json.loads(text) if status == 0 else {"failed": status})
print(json.dumps(answers))
"""


def qanot_lists_many(jobs: list[tuple[str, dict, list]], scratch: Path) -> list[dict]:
    """What Qanot's own loader makes of each plugin (name, config, calls), and what its registry answers
    to the calls ((tool, params) pairs): each plugin loaded alone, in a process of its own."""
    (scratch / "workspace").mkdir(parents=True, exist_ok=True)
    (scratch / "empty").mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(scratch)}  # ~/.qanot/plugins: empty
    request = [[name, config, str(scratch / "workspace"), str(scratch / "empty"), calls] for name, config, calls in jobs]
    done = subprocess.run([sys.executable, "-c", REFERENCE_MANY], input=json.dumps(request), capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [a for a in answers if "failed" in a], (answers, done.stderr)
    return answers


def qanot_lists(name: str, config: dict, scratch: Path, calls: list | None = None) -> dict:
    return qanot_lists_many([(name, config, calls or [])], scratch)[0]


async def host_lists(configs: dict[str, dict], grants: dict[str, dict], tmp: Path, state: Path) -> dict[str, dict]:
    data = {"plugins": [{"name": name, "config": config} for name, config in configs.items()],
            "plugins_dir": str(tmp / "empty"), "workspace_dir": str(tmp / "workspace"),
            "host": {"state_dir": str(state), "search_path": [str(BUNDLED)], "install_timeout": 300,
                     "plugins": {name: {"permissions": grant} for name, grant in grants.items()}}}
    (tmp / "empty").mkdir(exist_ok=True)
    path = tmp / "config.json"
    path.write_text(json.dumps(data))
    async with Host(str(path)) as host:
        return {name: {"loaded": sup.state == "ready", "tools": list(sup.tools), "error": sup.error}
                for name, sup in host.plugins.items()}


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """One state directory for the module: the plugins' environments (aiohttp, aiomysql) are built once."""
    return tmp_path_factory.mktemp("qanot-plugins-state")


async def test_every_bundled_plugin_with_an_empty_config_lists_what_qanot_lists(tmp_path, state):
    ours = await host_lists({name: {} for name in NAMES}, {}, tmp_path, state)
    references = await asyncio.to_thread(qanot_lists_many, [(name, {}, []) for name in NAMES], tmp_path / "ref")
    for name, theirs in zip(NAMES, references, strict=True):
        assert ours[name]["loaded"] == theirs["loaded"], (name, ours[name], theirs)
        assert ours[name]["tools"] == theirs["tools"], (name, ours[name], theirs)
    assert ours["cloud_reporter"]["tools"] == ["report_usage"]
    if sys.version_info < (3, 12):  # its plugin.py is a SyntaxError before 3.12, in Qanot too
        assert "syntax error" in ours["bito"]["error"]


@pytest.fixture
async def fake_api():
    """absmarket's and absvision's login endpoints (what their setup() calls)."""
    def answer(body: dict):
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(body)
        return handler

    app = web.Application()
    app.router.add_post("/api/v2/auth/login", answer({"data": {"token": "t-abs"}}))
    app.router.add_post("/api/v1/auth/login", answer({"data": {"access_token": "t-vis", "refresh_token": "r"}}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def test_configured_bundled_plugins_list_exactly_what_qanot_lists(tmp_path, state, fake_api):
    address = fake_api.removeprefix("http://")
    configs = {
        "absmarket": {"api_url": fake_api, "email": "a@b.c", "password": "p"},
        "absvision": {"api_url": fake_api, "phone": "998", "password": "p"},
        "amocrm": {"subdomain": "demo", "client_id": "c", "client_secret": "s", "access_token": "a",
                   "refresh_token": "r", "redirect_uri": "https://example.invalid/cb"},
        "bitrix24": {"domain": "demo.bitrix24.invalid", "user_id": "1", "webhook_code": "w"},
        "onec": {"base_url": "https://onec.invalid", "username": "u", "password": "p"},
        "cloud_reporter": {},
    }
    grants = {"absmarket": {"network": {"hosts": [address]}}, "absvision": {"network": {"hosts": [address]}}}
    ours = await host_lists(configs, grants, tmp_path, state)
    expected = {"absmarket": 31, "absvision": 28, "amocrm": 34, "bitrix24": 30, "onec": 18, "cloud_reporter": 1}
    # in a thread: the fake API answers from this event loop
    references = await asyncio.to_thread(qanot_lists_many, [(name, config, []) for name, config in configs.items()],
                                         tmp_path / "ref")
    for name, theirs in zip(configs, references, strict=True):
        assert ours[name]["tools"] == theirs["tools"], (name, ours[name], theirs)
        assert len(theirs["tools"]) == expected[name], (name, theirs)



MARIADB = ("127.0.0.1", 3306)
DB = {"db_host": MARIADB[0], "db_port": MARIADB[1], "db_user": "qanot", "db_password": "qanot-test-pw",
      "db_name": "qanot_test"}


def mariadb_table() -> None:
    """A small table of known rows; blocking pymysql (aiomysql's own driver) in a thread of its own."""
    import pymysql

    with pymysql.connect(host=DB["db_host"], port=DB["db_port"], user=DB["db_user"], password=DB["db_password"],
                         database=DB["db_name"], connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS fruit")
        cur.execute("CREATE TABLE fruit (id INT PRIMARY KEY, name VARCHAR(20))")
        cur.executemany("INSERT INTO fruit VALUES (%s, %s)", [(1, "olma"), (2, "nok"), (3, "uzum")])
        conn.commit()


@pytest.fixture
async def mariadb():
    """The MariaDB .ci/run starts on 127.0.0.1:3306 (user qanot, database qanot_test). Elsewhere the test is
    skipped, unless QANOT_HOST_REQUIRE_MARIADB=1 says the machine must have it (CI)."""
    try:
        await asyncio.to_thread(mariadb_table)
    except Exception as exc:  # noqa: BLE001 - any failure means "no database here"
        if os.environ.get("QANOT_HOST_REQUIRE_MARIADB") == "1":
            raise
        pytest.skip(f"no MariaDB for the test on 127.0.0.1:3306 ({exc})")
    return DB


async def test_database_plugins_query_a_real_mariadb_through_a_database_grant(tmp_path, state, mariadb, fake_api):
    """Both plugins start each query with MySQL's `SET SESSION MAX_EXECUTION_TIME`, which MariaDB answers with
    error 1193: an answer only a server that accepted the plugin's login gives, the same Qanot gets."""
    grant = {"database": {"hosts": [f"{MARIADB[0]}:{MARIADB[1]}"]}}
    absmarket = {**mariadb, "api_url": fake_api, "email": "a@b.c", "password": "p"}
    data = {"plugins": [{"name": "mysql_query", "config": mariadb},
                        {"name": "absmarket", "config": absmarket}],
            "plugins_dir": str(tmp_path / "empty"), "workspace_dir": str(tmp_path / "workspace"),
            "host": {"state_dir": str(state), "search_path": [str(BUNDLED)], "install_timeout": 300,
                     "plugins": {"mysql_query": {"permissions": grant}, "absmarket": {"permissions": {
                         **grant, "network": {"hosts": [fake_api.removeprefix("http://")]}}}}}}
    (tmp_path / "empty").mkdir()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    select = ("mysql_query", {"query": "SELECT id, name FROM fruit ORDER BY id"})
    refused = ("mysql_query", {"query": "DELETE FROM fruit"})
    async with Host(str(path)) as host:
        assert host.plugins["mysql_query"].tools == ["mysql_query"], host.plugins["mysql_query"].error
        ours = [await host.registry.execute(*call) for call in (select, refused)]
        tools = list(host.plugins["absmarket"].tools)
        assert len(tools) == 32 and "absmarket_query" in tools, tools
        count = ("absmarket_query", {"query": "SELECT COUNT(*) FROM fruit"})
        abs_answer = await host.registry.execute(*count)
    theirs = await asyncio.to_thread(qanot_lists, "mysql_query", mariadb, tmp_path / "ref", [select, refused])
    assert ours == theirs["answers"], (ours, theirs)
    theirs = await asyncio.to_thread(qanot_lists, "absmarket", absmarket, tmp_path / "ref-abs", [count])
    assert theirs["tools"] == tools and theirs["answers"] == [abs_answer], (theirs, abs_answer)
    assert "1193" in ours[0] and "MAX_EXECUTION_TIME" in ours[0], ours[0]
    assert "SELECT" in json.loads(ours[1])["error"]
    assert "1193" in abs_answer, abs_answer
    # Without the grant the plugin reaches nothing: its pool fails and it lists no tools, as in Qanot.
    data["host"]["plugins"] = {}
    data["plugins"] = data["plugins"][:1]
    path.write_text(json.dumps(data))
    async with Host(str(path)) as host:
        assert host.plugins["mysql_query"].tools == []


# eskiz, ibox and moysklad call hard-coded https:// names. Both loaders run in a mount namespace of their own
# where /etc/hosts points those names at an outside host (its own network namespace) and the system's CA
# bundle is a test CA's, so the plugins' unchanged code logs in to the fake API there over real TLS.
NAMED = {"eskiz": ("notify.eskiz.uz", {"email": "a@b.c", "password": "p"}),
         "ibox": ("demo.ibox.io", {"tenant": "demo", "login": "l", "password": "p"}),
         "moysklad": ("api.moysklad.ru", {"login": "l", "password": "p"})}

OURS = """
import asyncio, json, sys
from qanot_host import Host
async def main():
    async with Host(sys.argv[1]) as host:
        print(json.dumps({name: {"tools": list(sup.tools), "error": sup.error} for name, sup in host.plugins.items()}))
asyncio.run(main())
"""


def make_test_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA (as the bundle the loaders trust) and a certificate for the hard-coded names, signed by it."""
    names = ",".join(f"DNS:{host}" for host, _ in NAMED.values())
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=qanot-host test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=fake-api", "-keyout", "api.key", "-out", "api.csr")
    (tmp / "san.cnf").write_text(f"subjectAltName={names}\n")
    run("x509", "-req", "-in", "api.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.cnf", "-out", "api.pem")
    return tmp / "ca.pem", tmp / "api.pem", tmp / "api.key"


def in_mount_namespace(tmp: Path, hosts: Path, ca: Path, *command: str) -> dict:
    """The last JSON line `command` prints (and its stderr), run where /etc/hosts and the CA bundle are the test's."""
    script = tmp / "enter.sh"
    script.write_text(f'set -e\nmount --bind "{hosts}" /etc/hosts\n'
                      f'mount --bind "{ca}" /etc/ssl/certs/ca-certificates.crt\nexec "$@"\n')
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(script), *command],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return {**(answer if isinstance(answer, dict) else {"answers": answer}), "_stderr": done.stderr}


async def test_plugins_with_hard_coded_https_names_list_what_qanot_lists(tmp_path, state, outside_host):
    import ssl
    ca, cert, key = await asyncio.to_thread(make_test_ca, tmp_path)
    seen: list[str] = []

    def answer(body: dict):
        async def handler(request: web.Request) -> web.Response:
            seen.append(f"{request.host.split(':')[0]} {request.method} {request.path}")
            return web.json_response(body)
        return handler

    app = web.Application()
    app.router.add_post("/api/auth/login", answer({"data": {"token": "t-eskiz"}}))
    app.router.add_post("/api/user/login", answer({"token": "t-ibox", "filials": [{"id": 1}]}))
    app.router.add_get("/api/remap/1.2/entity/employee", answer({"rows": []}))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, outside_host.listen(port=443), ssl_context=tls).start()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{outside_host.address} {host}\n" for host, _ in NAMED.values()))
    try:
        data = {"plugins": [{"name": name, "config": config} for name, (_, config) in NAMED.items()],
                "plugins_dir": str(tmp_path / "empty"), "workspace_dir": str(tmp_path / "workspace"),
                "host": {"state_dir": str(state), "search_path": [str(BUNDLED)], "install_timeout": 300,
                         "plugins": {name: {"permissions": {"network": {"hosts": [f"{host}:443"]}}}
                                     for name, (host, _) in NAMED.items()}}}
        (tmp_path / "empty").mkdir()
        (tmp_path / "config.json").write_text(json.dumps(data))
        ours = await asyncio.to_thread(in_mount_namespace, tmp_path, hosts, ca, sys.executable, "-c", OURS,
                                       str(tmp_path / "config.json"))
        log = ours.pop("_stderr")[-3000:]
        expected = {"eskiz": 14, "ibox": 27, "moysklad": 30}
        ref = tmp_path / "ref"
        (ref / "workspace").mkdir(parents=True)
        (ref / "empty").mkdir()
        jobs = [[name, config, str(ref / "workspace"), str(ref / "empty"), []] for name, (_, config) in NAMED.items()]
        references = await asyncio.to_thread(in_mount_namespace, tmp_path, hosts, ca, sys.executable, "-c",
                                             REFERENCE_MANY, json.dumps(jobs))
        for name, theirs in zip(NAMED, references["answers"], strict=True):
            assert ours[name]["tools"] == theirs["tools"], (name, ours[name], theirs, seen, log)
            assert len(theirs["tools"]) == expected[name], (name, theirs, seen)
        assert {line.split()[0] for line in seen} == {host for host, _ in NAMED.values()}, seen
    finally:
        await runner.cleanup()
