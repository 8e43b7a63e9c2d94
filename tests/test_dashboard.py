"""The Grafana dashboard (``deploy/grafana/twotower.json``) and a real Prometheus behind it.

The static tests check that the JSON is an importable dashboard whose panels cover what
``docs/dashboard.md`` promises. The slow test starts the server and Debian's
``prometheus`` on loopback (as ``tests/test_prometheus.py`` does: a 1 s scrape with a
bearer token), drives a short load that produces every series the panels read, and
evaluates every panel's PromQL, Grafana variables substituted, through Prometheus' HTTP
query API: each must answer with data. Skipped, with the reason, without ``prometheus``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serving import free_port
from towers.pipeline import TrainResult
from twotower.bundle.layout import USER_TOWER

from .conftest import ROOT
from .test_prometheus import start_prometheus, wait_for, write_scrape_config

DASHBOARD = ROOT / "deploy" / "grafana" / "twotower.json"
# what Grafana would put in place of its variables; `route` is the dashboard's own
# (its "All" value), the others are Grafana's built-ins
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "route": ".*",
}
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
# each panel the dashboard must have, and a word its title holds (lower case)
REQUIRED_PANELS = {
    "QPS (total and by route)": "qps",
    "p50 latency by route": "p50",
    "p99 latency by route": "p99",
    "errors (4xx and 5xx) by route": "error",
    "fallbacks by served_by": "fallback",
    "reloads by outcome": "reload",
    "events rate": "events rate",
    "catalogue size": "catalogue",
    "event-store bytes": "event-store bytes",
    "bundle info": "bundle",
}
SCRAPE_TOKEN = "dashboard-scrape-token"  # read scope: what /metrics needs
ADMIN_TOKEN = "dashboard-admin-token"  # read, write and admin: the load below
SCRAPE_INTERVAL_S = 1


# --------------------------------------------------------------------------- helpers
def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON, parsed."""
    return json.loads(DASHBOARD.read_text())


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel, rows included."""
    panels: list[dict[str, Any]] = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
        for target in panel.get("targets", []):
            yield panel["title"], target.get("refId", "?"), target.get("expr", "")


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables (``$name``, ``${name}``) replaced as Grafana
    would; a ``KeyError`` names a variable this test does not know."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"Grafana variable ${name} in {expr!r} has no test value")
        return GRAFANA_VARIABLES[name]

    return VARIABLE.sub(value, expr)


def call(
    url: str, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one HTTP request; a 4xx or 5xx is returned, not
    raised."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def is_finite(sample: dict[str, Any]) -> bool:
    """Whether an instant-vector sample's value is a finite number (not NaN or Inf)."""
    return math.isfinite(float(sample["value"][1]))


class Prometheus:
    """The HTTP query API of a Prometheus server."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, promql: str) -> dict[str, Any]:
        """The parsed answer of ``/api/v1/query`` (an instant query at now)."""
        status, body = call(f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        assert isinstance(body, dict), f"{status}: {body!r}"
        return body

    def scrapes(self) -> int:
        """Scrapes of the twotower job stored in the last 5 minutes."""
        result = self.query('count_over_time(up{job="twotower"}[5m])')["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def target_up(self) -> bool:
        """Whether the last scrape of the app succeeded (the token was accepted)."""
        result = self.query('up{job="twotower"}')["data"]["result"]
        return bool(result) and result[0]["value"][1] == "1"


class Load:
    """A short load on the app that produces every series the dashboard's panels read."""

    def __init__(self, base: str, user: str) -> None:
        self.base = base
        self.user = user

    def expect(
        self, status: int, method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN
    ) -> Any:
        """One request, which must answer ``status``; the answer's body."""
        got, answer = call(f"{self.base}{path}", method, body, token)
        assert got == status, f"{method} {path}: {got} (expected {status}): {answer!r}"
        return answer

    def run(self, phase: int, bundle: str) -> None:
        """Queries, fallbacks, events, an added item, a good and a failed reload (to
        ``bundle``, then to ``broken``) and two 4xx answers (a 401 and a 422)."""
        user = urllib.parse.quote(self.user)
        found = self.expect(200, "GET", f"/recommend?user_id={user}&k=5")
        items = [i["item_id"] for i in found["items"]]
        self.expect(
            200,
            "POST",
            "/recommend",
            {"users": [{"user_id": self.user}, {"history": items[:2]}], "k": 5},
        )
        self.expect(200, "GET", f"/similar/{urllib.parse.quote(items[0])}?k=5")
        self.expect(200, "GET", "/similar/no-such-item?k=5")  # popularity fallback
        stranger = self.expect(200, "GET", f"/recommend?user_id=dashboard-stranger-{phase}&k=5")
        assert stranger["served_by"] == "popularity"
        newcomer = f"dashboard-newcomer-{phase}"
        events = [
            {"user_id": newcomer, "item_id": items[0], "timestamp": 1_700_000_000 + phase},
            {"user_id": self.user, "item_id": items[1], "timestamp": 1_700_000_000 + phase},
        ]
        assert self.expect(200, "POST", "/events", {"events": events}) == {"accepted": 2}
        history = self.expect(200, "GET", f"/recommend?user_id={newcomer}&k=5")
        assert history["served_by"] == "history"  # a history fallback
        added = {"items": [{"item_id": f"dashboard-item-{phase}", "category": "c1"}]}
        self.expect(200, "POST", "/items", added)
        self.expect(200, "POST", "/admin/reload", {"bundle": bundle})
        self.expect(409, "POST", "/admin/reload", {"bundle": "broken"})
        self.expect(401, "GET", f"/recommend?user_id={user}&k=5", token=None)
        self.expect(422, "GET", f"/recommend?user_id={user}&k=0")


# ----------------------------------------------------------------------- static checks
def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] == "twotower serving"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no target"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r}: an empty query"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_panels_cover_the_serving_signals() -> None:
    titles = [p["title"].lower() for p in load_dashboard()["panels"]]
    missing = [name for name, word in REQUIRED_PANELS.items() if not any(word in t for t in titles)]
    assert not missing, f"no panel for {missing}; titles: {titles}"


def test_dashboard_queries_use_grafana_rate_interval() -> None:
    for title, ref, expr in panel_targets(load_dashboard()):
        windows = re.findall(r"(?<=[}\w])\[([^\]]+)\]", expr)  # range selectors
        assert windows or "rate(" not in expr, (title, ref, expr)
        assert all(w == "$__rate_interval" for w in windows), (title, ref, expr)
        assert "$" not in substitute(expr), (title, ref, expr)


# ---------------------------------------------------------------------- with Prometheus
@pytest.mark.slow
def test_every_panel_query_returns_data_from_prometheus(
    trained: TrainResult, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "Debian's prometheus is not installed (apt-get install prometheus; .ci/run does)"
        )
    targets = list(panel_targets(load_dashboard()))
    root = tmp_path / "bundles"
    for name in ("first", "second", "broken"):
        shutil.copytree(trained.bundle, root / name)
    (root / "broken" / USER_TOWER).write_bytes(b"not an onnx model")  # a reload that fails

    app_port, prom_port = free_port(), free_port()
    server_log = tmp_path / "server.log"
    env = {
        **os.environ,
        "TWOTOWER_API_TOKENS": f"{SCRAPE_TOKEN}:read;{ADMIN_TOKEN}:read+write+admin",
    }
    config = write_scrape_config(
        tmp_path / "prometheus.yml", app_port, SCRAPE_TOKEN, SCRAPE_INTERVAL_S
    )
    base = f"http://127.0.0.1:{app_port}"
    prometheus = Prometheus(prom_port)
    processes: list[subprocess.Popen[bytes]] = []
    with server_log.open("wb") as log:
        try:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "scripts" / "serve.py"),
                        f"bundle_root={root}",
                        "bundle=first",
                        f"port={app_port}",
                        f"state_dir={tmp_path / 'state'}",
                        "log_level=warning",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
            started = wait_for(lambda: call(f"{base}/healthz")[0] == 200, 45)
            assert started, f"the app did not start:\n{server_log.read_text()[-3000:]}"
            processes.append(start_prometheus(binary, config, tmp_path / "tsdb", prom_port))
            assert wait_for(prometheus.target_up, 30), "Prometheus could not scrape the app"

            # Two rounds with scrapes between them: rate() sees each series grow.
            load = Load(base, str(trained.data.test.user_ids[0]))
            for phase, bundle in ((1, "second"), (2, "first")):
                load.run(phase, bundle)
                after = prometheus.scrapes() + 2
                assert wait_for(lambda after=after: prometheus.scrapes() >= after, 20), (
                    "Prometheus did not scrape twice after the load"
                )

            answers: dict[tuple[str, str], dict[str, Any]] = {}

            def all_have_data() -> bool:
                for title, ref, expr in targets:
                    answer = prometheus.query(substitute(expr))
                    answers[title, ref] = answer
                for answer in answers.values():
                    result = answer.get("data", {}).get("result", [])
                    if answer.get("status") != "success" or not any(map(is_finite, result)):
                        return False
                return True

            wait_for(all_have_data, 10)
            ready = call(f"{base}/readyz", token=SCRAPE_TOKEN)[1]
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(timeout=30)

    failures = []
    for (title, ref), answer in answers.items():
        result = answer.get("data", {}).get("result", [])
        if answer.get("status") != "success":
            failures.append(f"{title} [{ref}]: {answer.get('errorType')}: {answer.get('error')}")
        elif not result:
            failures.append(f"{title} [{ref}]: no series")
        elif not any(map(is_finite, result)):
            failures.append(f"{title} [{ref}]: only NaN/Inf values {result}")
    assert not failures, "panels without data:\n" + "\n".join(failures)

    # the panels show what the load did
    def labels(title_word: str, label: str) -> set[str]:
        matched = [a for (t, _), a in answers.items() if title_word in t.lower()]
        return {s["metric"].get(label, "") for a in matched for s in a["data"]["result"]}

    assert {"history", "popularity"} <= labels("fallback", "served_by")
    assert {"ok", "failed"} <= labels("reload", "outcome")
    assert {"401", "422"} <= labels("error", "status")
    assert {"/recommend", "/similar/{item_id}", "/events", "/items"} <= labels("qps", "route")
    served = labels("bundle", "path")
    assert len(served) == 1 and Path(served.pop()).name == "first", served
    catalogue = [a for (t, _), a in answers.items() if "catalogue" in t.lower()]
    assert float(catalogue[0]["data"]["result"][0]["value"][1]) == ready["items"]
