"""Write docs/grafana-dashboard.json: the a2bd dashboard for Grafana, built on the metrics a2bd exports.

    .venv/bin/python docs/grafana_dashboard.py

Import the JSON in Grafana (Dashboards > Import) and pick the Prometheus data source that scrapes a2bd's
/metrics. tests/unit/test_dashboard.py checks that every metric a panel queries is one a2bd exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana-dashboard.json"

# (title, unit, [(PromQL, legend)], width) — a row of the grid is 24 wide.
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Authorizations by status", "reqps",
     [("sum by (status) (rate(a2bd_authorizations_total[1m]))", "{{status}}")], 12),
    ("Authorization latency", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(a2bd_authorize_seconds_bucket[5m])))", "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(a2bd_authorize_seconds_bucket[5m])))", "p99"),
      ("histogram_quantile(0.99, sum by (le) (rate(a2bd_loop_lag_seconds_bucket[5m])))", "event loop lag p99")],
     12),
    ("Live calls", "short", [("sum by (state) (a2bd_live_calls)", "{{state}}")], 8),
    ("Calls rated into the ledger", "ops", [("rate(a2bd_calls_rated_total[1m])", "calls/s")], 8),
    ("FastAGI connections shed", "ops",
     [("sum by (reason) (rate(a2bd_agi_rejected_total[5m]))", "{{reason}}")], 8),
    ("Ledger commit latency and backlog", "s",
     [("histogram_quantile(0.99, sum by (le) (rate(a2bd_ledger_commit_seconds_bucket[5m])))", "commit p99"),
      ("a2bd_ledger_backlog", "backlog (calls)")], 12),
    ("Ledger retries and refusals", "ops",
     [("sum by (reason) (rate(a2bd_ledger_retries_total[5m]))", "retry: {{reason}}"),
      ("rate(a2bd_ledger_rejected_total[5m])", "rejected")], 12),
    ("Credit guard hangups", "ops",
     [("rate(a2bd_guard_hangups_total[5m])", "hangups/s"), ("a2bd_guard_accounts", "accounts watched")], 12),
    ("Credit guard lateness", "s",
     [("histogram_quantile(0.99, sum by (le) (rate(a2bd_guard_lateness_seconds_bucket[15m])))", "p99")], 12),
    ("AMI connection per server", "short",
     [("a2bd_ami_connected", "{{server}}"),
      ("sum by (server) (increase(a2bd_ami_reconnects_total[15m]))", "reconnects {{server}}")], 12),
    ("Reconciliation fixes", "short",
     [("sum by (action) (increase(a2bd_reconcile_fixes_total[1h]))", "{{action}}")], 12),
    ("Notices recorded", "short", [("sum by (kind) (increase(a2bd_notices_total[1h]))", "{{kind}}")], 12),
    ("Tariff prefixes in memory", "short", [("a2bd_tariff_prefixes", "{{tariff}}")], 12),
]


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]], width: int, x: int, y: int
          ) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict[str, Any]:
    panels = []
    x = y = 0
    for index, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(index, title, unit, targets, width, x, y))
        x += width
    return {
        "title": "a2bd",
        "uid": "a2bd-overview",
        "tags": ["a2bd", "asterisk", "billing"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def main() -> None:
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
