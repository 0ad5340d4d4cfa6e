"""The proxy under the environment Kubernetes gives a pod (service links)."""

from __future__ import annotations

import os
import subprocess
import sys

import aiohttp
import pytest

from etagproxy.config import ConfigError, parse_config, service_link
from tests.ports import free_port
from tests.proxy_processes import REPO, start_proxy

# What the Services of deploy/kubernetes inject: etagproxy-redis (redis.yaml)
# and inventory-api (service.yaml), plus a Service named etagproxy.
K8S_ENV = {
    "ETAGPROXY_REDIS_SERVICE_HOST": "10.96.0.12",
    "ETAGPROXY_REDIS_SERVICE_PORT": "6379",
    "ETAGPROXY_REDIS_SERVICE_PORT_REDIS": "6379",
    "ETAGPROXY_REDIS_PORT": "tcp://10.96.0.12:6379",
    "ETAGPROXY_REDIS_PORT_6379_TCP": "tcp://10.96.0.12:6379",
    "ETAGPROXY_REDIS_PORT_6379_TCP_PROTO": "tcp",
    "ETAGPROXY_REDIS_PORT_6379_TCP_PORT": "6379",
    "ETAGPROXY_REDIS_PORT_6379_TCP_ADDR": "10.96.0.12",
    "ETAGPROXY_SERVICE_HOST": "10.96.0.10",
    "ETAGPROXY_SERVICE_PORT": "8080",
    "ETAGPROXY_SERVICE_PORT_HTTP": "8080",
    "ETAGPROXY_PORT": "tcp://10.96.0.10:8080",
    "ETAGPROXY_PORT_8080_TCP": "tcp://10.96.0.10:8080",
    "ETAGPROXY_PORT_8080_TCP_PROTO": "tcp",
    "ETAGPROXY_PORT_8080_TCP_PORT": "8080",
    "ETAGPROXY_PORT_8080_TCP_ADDR": "10.96.0.10",
    "INVENTORY_API_SERVICE_HOST": "10.96.0.11",
    "INVENTORY_API_PORT": "tcp://10.96.0.11:80",
}
CONFIG = "upstream: http://127.0.0.1:9\nroutes:\n  - path: /a/{id}\n"


def test_service_links_are_ignored_and_typos_still_reported() -> None:
    for name, value in K8S_ENV.items():
        if name.startswith("ETAGPROXY_"):
            assert service_link(name, value), name
    parse_config(CONFIG, filename="c.yaml", env=K8S_ENV)
    for name, value in (("ETAGPROXY_LISTN", "127.0.0.1:1"), ("ETAGPROXY_PORT", "8080"),
                        ("ETAGPROXY_UPSTREAM_PORT", "80")):
        with pytest.raises(ConfigError) as info:
            parse_config(CONFIG, filename="c.yaml", env={**K8S_ENV, name: value})
        assert f"env {name}" in str(info.value)
    assert not service_link("ETAGPROXY_LISTEN", "tcp://1.2.3.4:5")


def test_check_config_passes_under_the_pod_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "etagproxy.yaml"
    path.write_text(CONFIG)
    env = {**os.environ, **K8S_ENV}
    run = [sys.executable, "-m", "etagproxy", "check-config", str(path)]
    assert subprocess.run(run, cwd=REPO, env=env, capture_output=True, timeout=60).returncode == 0
    bad = subprocess.run(run, cwd=REPO, env={**env, "ETAGPROXY_LISTN": "x"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ETAGPROXY_LISTN" in bad.stderr + bad.stdout


@pytest.mark.slow
async def test_the_proxy_starts_under_the_pod_environment(tmp_path, recording_upstream) -> None:  # type: ignore[no-untyped-def]
    admin = free_port()
    text = (f"listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:{admin}\nupstream: {recording_upstream.url}\n"
            "routes:\n  - path: /a/{id}\n")
    proxy = await start_proxy(text, tmp_path, env=K8S_ENV)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin}/healthz") as r:
                assert r.status == 200
            async with s.get(f"{proxy.url}/a/1") as r:
                assert r.status == 200 and r.headers["ETag"]
    finally:
        await proxy.stop()
