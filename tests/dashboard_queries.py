"""The Grafana dashboard's queries as Prometheus can run them: every panel target's
expression with the dashboard's template variables replaced by concrete values (what Grafana
does before it sends a query). Shared by the unit test (an empty Prometheus) and the two-node
lab test (tests/e2e/test_dashboard_e2e.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "observability" / "grafana-dashboard.json"

# Grafana's built-in interval variables, as Grafana would fill them for a short scrape
# interval: $__rate_interval is at least four scrape intervals.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query target of every panel (rows included, none have any)."""
    return [(panel, target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def substitute(expr: str, instance: str = ".*") -> str:
    """`expr` with $instance (a regex: ".*" is the "All" value) and the built-in intervals
    filled in. An unknown variable raises: the dashboard may only use variables it defines."""
    values = dict(BUILTINS, instance=instance)

    def fill(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown template variable ${name} in {expr}")
        return values[name]
    return _VARIABLE.sub(fill, expr)
