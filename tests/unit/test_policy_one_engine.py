"""Issue #22, "one engine": the gateway decides an HTTP request through the very calls that
bench/engine.py measures (``request_query`` then ``snapshot.decide``), and on the URL corpus
(tests/corpus/urls.yaml) the addon's verdicts are the reference engine's (the operator
tools' ``decide(query_for_url(...))``) and the corpus' expectations."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

import addons.policy as addon_module
from gateway.proxy.flowstate import METADATA_VERDICT
from addons.policy import PolicyDecider, PolicyHolder
from gateway.proxy.connections import LiveConnections
from gateway.policy import DeviceContext, PolicySnapshot, load_policy, query_for_url
from gateway.policy import query as query_module
from tests.unit.test_policy_corpus import load_corpus

ROOT = Path(__file__).resolve().parents[2]
# The device `kanmon policy test` decides for by default (the corpus' expectations are for it).
DEVICE = DeviceContext("policy-test", frozenset(), "org")
NOW = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)


def _bench_engine():
    spec = importlib.util.spec_from_file_location("bench_engine_under_test", ROOT / "bench" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def snapshot() -> PolicySnapshot:
    return load_policy(ROOT / "policies" / "example.yaml", NOW)


def _decider(snap: PolicySnapshot) -> PolicyDecider:
    decider = PolicyDecider(PolicyHolder(snap, "example.yaml"), LiveConnections())
    decider._device = lambda client: DEVICE  # the identity addon's part: every flow is this device
    return decider


def _flow(url: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = http.Request.make("GET", url)
    del flow.request.headers["content-length"]  # Request.make adds "0"; a browser's GET has none
    flow.server_conn.address = None  # no upstream address yet: the addon then uses the request's port
    return flow


def test_the_addon_and_the_benchmark_call_the_same_functions():
    bench = _bench_engine()
    assert bench.request_query is addon_module.request_query is query_module.request_query


def test_the_addon_and_the_benchmark_give_decide_the_same_query(snapshot, monkeypatch):
    bench = _bench_engine()
    seen: list = []
    real = PolicySnapshot.decide

    def spy(self, query):
        seen.append(query)
        return real(self, query)

    monkeypatch.setattr(PolicySnapshot, "decide", spy)
    decider = _decider(snapshot)
    urls = [e["url"] for e in load_corpus()]
    for url in urls:
        flow = _flow(url)
        decider.requestheaders(flow)
        assert len(seen) == 1, url
        from_addon = seen.pop()
        verdict = bench.gateway_decision(snapshot, DEVICE, url, NOW)
        assert len(seen) == 1, url
        from_bench = seen.pop()
        # The same query but for the clock (the addon reads it, the bench passes one).
        assert from_addon._replace(now=None) == from_bench._replace(now=None), url
        assert type(from_addon.url) is type(from_bench.url)  # both marked as normalized already
        recorded = flow.metadata[METADATA_VERDICT]
        assert (verdict.action, verdict.rule_id) == (recorded.action, recorded.rule_id), url


def test_the_addon_path_agrees_with_the_reference_engine_on_the_corpus(snapshot):
    decider = _decider(snapshot)
    entries = load_corpus()
    wrong = []
    for entry in entries:
        flow = _flow(entry["url"])
        decider.requestheaders(flow)
        got = flow.metadata[METADATA_VERDICT]
        reference = snapshot.decide(query_for_url(entry["url"], DEVICE, now=datetime.now(UTC)))
        if (got.action, got.rule_id) != (reference.action, reference.rule_id):
            wrong.append(f"{entry['url']}: addon {got.action}/{got.rule_id}, reference {reference.action}/{reference.rule_id}")
        elif str(got.action) != entry["expect"] or (entry.get("rule") is not None and got.rule_id != entry["rule"]):
            wrong.append(f"{entry['url']}: addon {got.action}/{got.rule_id}, corpus expects {entry['expect']}/{entry.get('rule')}")
    assert len(entries) >= 300
    assert not wrong, f"{len(wrong)} of {len(entries)}:\n" + "\n".join(wrong)
