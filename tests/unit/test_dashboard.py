"""The Grafana dashboard queries only metrics a2bd exports, by their exposition names."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from a2bd.observability import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\ba2bd_[a-z0-9_]+")


def exported() -> set[str]:
    """Every sample name a2bd's registry exposes (counters as _total, histograms as _bucket/_sum/_count)."""
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_every_panel_queries_an_exported_metric() -> None:
    board = json.loads(DASHBOARD.read_text())
    queried = {name for p in board["panels"] for t in p["targets"] for name in METRIC.findall(t["expr"])}
    assert queried, "the dashboard queries nothing"
    assert queried <= exported(), sorted(queried - exported())


def test_the_file_is_what_the_script_writes() -> None:
    spec = importlib.util.spec_from_file_location("grafana_dashboard", DASHBOARD.with_name("grafana_dashboard.py"))
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert json.loads(DASHBOARD.read_text()) == script.dashboard()
