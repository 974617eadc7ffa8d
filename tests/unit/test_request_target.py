"""addons/requesttarget.py: host and URL of a request worked out once, never stale."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from addons.requesttarget import request_target


def _flow(host: str = "www.example.test", path: str = "/a?b=1"):
    flow = tflow.tflow()
    flow.request.host = "198.51.100.80"  # transparent mode: the address, the name is in Host
    flow.request.scheme = "http"
    flow.request.port = 80
    flow.request.path = path
    flow.request.headers["Host"] = host
    return flow


def test_the_same_as_mitmproxy_and_computed_once(monkeypatch):
    flow = _flow()
    first = request_target(flow)
    assert first == (flow.request.pretty_host, flow.request.pretty_url) == ("www.example.test", "http://www.example.test/a?b=1")
    calls = []
    original = type(flow.request).pretty_url
    monkeypatch.setattr(type(flow.request), "pretty_url", property(lambda r: calls.append(1) or original.fget(r)))
    assert request_target(flow) == first and calls == [], "an unchanged request is answered from the memo"


def test_a_rewritten_request_is_judged_and_logged_under_its_new_url():
    flow = _flow()
    request_target(flow)
    flow.request.headers["Host"] = "other.test:8080"
    assert request_target(flow) == ("other.test", "http://other.test:8080/a?b=1")
    flow.request.path = "/elsewhere"
    assert request_target(flow)[1] == "http://other.test:8080/elsewhere"
    flow.request.scheme = "https"
    assert request_target(flow)[1] == "https://other.test:8080/elsewhere"
    del flow.request.headers["Host"]
    assert request_target(flow) == (flow.request.pretty_host, flow.request.pretty_url)
    assert request_target(flow)[0] == "198.51.100.80"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["host", "path", "scheme", "port", "header"]),
                          st.sampled_from(["a.test", "b.test:81", "/x", "/y?z", "http", "https", "81", "443"])),
                max_size=8))
def test_any_sequence_of_edits_matches_mitmproxy(edits):
    flow = _flow()
    for what, value in edits:
        assert request_target(flow) == (flow.request.pretty_host, flow.request.pretty_url)
        req = flow.request
        if what == "host":
            req.host = value.split(":")[0]
        elif what == "path" and value.startswith("/"):
            req.path = value
        elif what == "scheme" and value in ("http", "https"):
            req.scheme = value
        elif what == "port" and value.isdigit():
            req.port = int(value)
        elif what == "header":
            req.headers["Host"] = value
    assert request_target(flow) == (flow.request.pretty_host, flow.request.pretty_url)
