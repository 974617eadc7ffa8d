"""gateway/reports/generate.py: the report code path the CLI and the console share (issue
#21). Its output is the CLI's output for the same inputs; bad inputs raise bilingual errors."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest

from gateway.cli.report import register
from gateway.reports.charts import ChartMaker
from gateway.reports.generate import (ReportInputError, incident_html, incident_inputs, review_html, review_inputs)
from tests.unit.test_reports_aggregation import write_month

NOW = datetime(2026, 2, 2, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("logs")
    write_month(directory)
    return directory


def charts():
    return ChartMaker(None)


def test_review_is_what_the_cli_writes(logs, tmp_path):
    html = review_html(review_inputs("2026-01", "Asia/Tokyo", 30, logs), NOW, charts)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "r.html"
    args = parser.parse_args(["report", "review", "--month", "2026-01", "--logs", str(logs), "--out", str(out),
                              "--tz", "Asia/Tokyo"])
    args.now = lambda: NOW
    assert args.func(args) == 0
    assert "2026-01" in html
    # charts embed PNG bytes whose font may differ: compare the text of the tables
    strip = lambda s: s.split("<img")[0]  # noqa: E731
    assert strip(out.read_text(encoding="utf-8")) == strip(html)


def test_incident_for_a_device(logs):
    inputs = incident_inputs("d1", "2026-01-01", "2026-02-01", "UTC", 50, NOW, {"reporter": "sato"})
    html = incident_html(inputs, logs, NOW, charts)
    assert "d1" in html and "sato" in html


@pytest.mark.parametrize("call", [
    lambda logs: review_inputs("2026-13", "UTC", 30, logs),
    lambda logs: review_inputs("2026-01", "Mars/Base", 30, logs),
    lambda logs: review_inputs("2026-01", "UTC", -1, logs),
    lambda logs: review_inputs("2026-01", "UTC", 30, logs / "missing"),
    lambda logs: review_html(review_inputs("2025-06", "UTC", 30, logs), NOW, charts),
    lambda logs: incident_inputs("d1", "2026-02-01", "2026-01-01", "UTC", 50, NOW, {}),
    lambda logs: incident_inputs("d1", "yesterday", None, "UTC", 50, NOW, {}),
    lambda logs: incident_inputs("d1", "2026-01-01", None, "UTC", 0, NOW, {}),
    lambda logs: incident_html(incident_inputs("nobody", "2026-01-01", None, "UTC", 5, NOW, {}), logs, NOW, charts),
])
def test_bad_inputs_raise_bilingual_errors(logs, call):
    with pytest.raises(ReportInputError) as exc:
        call(logs)
    assert exc.value.text.ja and exc.value.text.en and exc.value.text.ja != exc.value.text.en
