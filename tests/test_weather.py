"""The document's weather plugin, unedited, against an HTTP server on 127.0.0.1.

Its plugin.json declares aiohttp, which uv installs into the plugin's own environment (from PyPI, or
from uv's cache once warm).
"""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from qanot_host import Host, PluginState

from .conftest import plugin


@pytest.mark.parametrize("grant", ["ports", "hosts"])
async def test_weather_get_against_a_local_server(write_config, grant, request):
    seen = []

    async def current(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        return web.json_response({"city": request.query["city"], "temp_c": 31, "sky": "ochiq"})

    app = web.Application()
    app.router.add_get("/current", current)
    runner = web.AppRunner(app)
    await runner.setup()
    if grant == "ports":  # any host, but never the host itself: the server is on another machine
        outside = request.getfixturevalue("outside_host")
        sock = outside.listen()
        address, port = outside.address, sock.getsockname()[1]
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    if grant == "hosts":
        port = site._server.sockets[0].getsockname()[1]
    try:
        # narrowed to the port, or to the one host and port (by name: the host resolves it too)
        network, base_url = ({"ports": [port]}, f"http://{address}:{port}") if grant == "ports" else \
            ({"hosts": [f"localhost:{port}"]}, f"http://localhost:{port}")
        config = write_config([plugin("weather", api_key="k-123", base_url=base_url)],
                              host={"install_timeout": 300, "plugins": {"weather": {
                                  "permissions": {"network": network}}}})
        async with Host(config) as host:
            assert host.plugins["weather"].state == PluginState.READY, host.plugins["weather"].error
            assert host.plugins["weather"].source.builtin
            result = await host.registry.execute("weather_get", {"city": "Samarkand"})
    finally:
        await runner.cleanup()
    assert json.loads(result) == {"city": "Samarkand", "temp_c": 31, "sky": "ochiq"}
    assert seen == [{"city": "Samarkand", "key": "k-123"}]


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:9", "https://api.weather.example.com"])
async def test_weather_without_the_network_grant_is_told_what_to_grant(write_config, base_url):
    """By name as well (real plugins tried by hand): without a network there is no DNS either, and the
    plugin saw only "Temporary failure in name resolution"."""
    config = write_config([plugin("weather", api_key="k", base_url=base_url)], host={"install_timeout": 300})
    async with Host(config) as host:
        assert "network-namespace" in host.status()[0]["sandbox"]
        error = json.loads(await host.registry.execute("weather_get", {"city": "Tashkent"}))["error"]
    assert "needs the 'network' permission (config.json: host.plugins.weather.permissions)" in error


async def test_weather_without_api_key_starts_with_a_warning_or_is_refused_if_strict(write_config, caplog):
    """Qanot loads a plugin whose required_config is missing, and warns; so does the host, unless
    host.strict_required_config says otherwise."""
    async with Host(write_config([plugin("weather", base_url="http://127.0.0.1:9")])) as host:
        assert host.plugins["weather"].state == PluginState.READY
    assert any("required_config: missing from the plugin's config in config.json: api_key" in r.getMessage()
               and r.levelname == "WARNING" for r in caplog.records)
    strict = write_config([plugin("weather", base_url="http://127.0.0.1:9")], host={"strict_required_config": True})
    async with Host(strict) as host:
        assert host.plugins["weather"].state == PluginState.FAILED
        assert "required_config: missing from the plugin's config in config.json: api_key" in \
            host.plugins["weather"].error
