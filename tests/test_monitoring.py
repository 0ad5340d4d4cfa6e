"""deploy/monitoring: the alert rules and the Grafana dashboard.

The rules pass `promtool check rules` and their unit tests
(alerts.test.yaml); every PromQL expression of the dashboard passes the
same checker; and every metric either names is one a running proxy
actually exposes, so a renamed metric cannot leave a silent alert."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import yaml

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\b((?:etagproxy|process|python)_[a-z_]+)\b")
# Grafana's macros and variables, as a query would see them.
GRAFANA = {"$__rate_interval": "5m", "$job": ".*"}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: run the test command in README.md, which installs it (Debian: prometheus)"
    return found


def alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> dict[str, str]:
    out = {}
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for macro, value in GRAFANA.items():
                expr = expr.replace(macro, value)
            out[f"{panel['title']} ({target['refId']})"] = expr
    return out


def test_alert_rules_pass_promtool_and_their_unit_tests():
    checked = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yaml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    # promtool parses a recording rule's expression like any query.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs().values())
    ]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_is_well_formed():
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


async def test_every_metric_the_alerts_and_dashboard_use_is_exposed(make_proxy, recording_upstream):
    proxy = await make_proxy(
        "admin_listen: 127.0.0.1:0\nupstream: {upstream}\nroutes:\n  - path: /api/items/{id}/\n",
        upstream=recording_upstream.url,
    )
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    exposed = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) (\w+)", text, re.M)}
    families = {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\w+)", text, re.M)}
    names = set(exposed)
    for name, kind in families.items():
        if kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
    used = {
        m.group(1): where
        for exprs in (alert_exprs(), dashboard_exprs())
        for where, expr in exprs.items()
        for m in METRIC.finditer(expr)
    }
    assert used, "no metric found in the rules"
    missing = {name: where for name, where in used.items() if name not in names}
    assert missing == {}
