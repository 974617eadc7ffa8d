"""Issue #14 "No bypass", generated: hypothesis varies the first segment and the authority of
a request (leading whitespace/CRLF, method case, absolute-form vs origin-form, Host port
spellings and case, TCP segmentation points, and for TLS the SNI, ClientHello cut points
and record version byte), sends each one from a device through the tunnel to the recording
fake internet (gateway/lab/recorder.py), and checks one invariant:

* nothing that names the blocked host (SNI, request target, Host) lets it reach an upstream;
* whatever does reach an upstream carries only well-formed Host fields naming the allowed
  host;
* a plain, well-formed request for the allowed host reaches the upstream (whatever the
  ClientHello's segmentation or record version), so the property cannot hold by everything
  being refused.

Bounded and deterministic: 60 examples, derandomized, no shrinking (each example is a real
connection through the lab; the failing example is printed as it was generated).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from gateway.lab.topology import WEB4
from tests.e2e.bypass_tools import (
    ALLOWED, BLOCKED, BypassLab, Observer, bypass_lab, describe, host_headers, leaked, new_marker,
)
from tests.e2e.conftest import require_lab

pytestmark = pytest.mark.e2e

PORT_SPELLINGS = ["", "", ":{port}", ":80x", ":", ":99999", ":+80", ": 80", ":-1", ":0x50"]
PREFIXES = ["", "", "", "\r\n", "\n", "\r\n\r\n", " ", "\t"]
METHODS = ["GET", "GET", "get", "Get"]
_STRICT_AUTHORITY = re.compile(r"^([a-z0-9.-]+?)\.?(?::([1-9][0-9]{0,4}))?$")


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    require_lab()
    with bypass_lab(tmp_path_factory, "test_bypass_property") as lab:
        yield lab, Observer(lab)


@st.composite
def attempts(draw) -> dict:
    tls = draw(st.booleans())
    port = 443 if tls else 80
    a = {
        "tls": tls,
        "port": port,
        "host": draw(st.sampled_from([ALLOWED, ALLOWED, BLOCKED])),
        "form": draw(st.sampled_from(["origin", "origin", "absolute"])),
        "target_host": draw(st.sampled_from([ALLOWED, ALLOWED, BLOCKED])),
        "port_spelling": draw(st.sampled_from(PORT_SPELLINGS)).format(port=port),
        "upper": draw(st.booleans()),
        "trailing_dot": draw(st.sampled_from([False, False, True])),
        "prefix": draw(st.sampled_from(PREFIXES)),
        "method": draw(st.sampled_from(METHODS)),
        "scheme_upper": draw(st.booleans()),
        "cuts": draw(st.sampled_from([[], [], [], [1], [2], [3], [4], [1, 3], [2, 6]])),
        "sni": draw(st.sampled_from([ALLOWED, ALLOWED, None, BLOCKED])) if tls else None,
        "record_version": draw(st.sampled_from([None, None, "0301", "0300", "0304", "0305"])) if tls else None,
        "hello_cuts": draw(st.sampled_from([[], [], [1], [2], [5], [1, 3]])) if tls else [],
    }
    return a


def build(a: dict, marker: str) -> tuple[dict, bool, bool]:
    """The probe spec; whether the attempt names the blocked host anywhere; whether it is a
    plain, well-formed request for the allowed host (which must get through)."""
    host = a["host"].upper() if a["upper"] else a["host"]
    host += "." if a["trailing_dot"] else ""
    authority = host + a["port_spelling"]
    path = f"/{marker}"
    target = path
    if a["form"] == "absolute":
        scheme = "https" if a["tls"] else "http"
        target = f"{scheme.upper() if a['scheme_upper'] else scheme}://{a['target_host']}{path}"
    text = f"{a['prefix']}{a['method']} {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    cuts = [c for c in a["cuts"] if c < len(text)]
    segments, start = [], 0
    for cut in sorted(cuts):
        segments.append(text[start:cut])
        start = cut
    segments.append(text[start:])
    spec: dict = {"dst": WEB4, "port": a["port"], "segments": segments, "read_timeout": 3}
    if a["tls"]:
        spec["tls"] = {"sni": a["sni"], "split": a["hello_cuts"]}
        if a["record_version"]:
            spec["tls"]["record_version"] = a["record_version"]
    names_blocked = (a["host"] == BLOCKED or (a["form"] == "absolute" and a["target_host"] == BLOCKED)
                     or a["sni"] == BLOCKED)
    well_formed = (a["prefix"] == "" and a["method"] == "GET" and not cuts and not names_blocked
                   and a["port_spelling"] in ("", f":{a['port']}") and not a["trailing_dot"]
                   and (not a["tls"] or a["sni"] == ALLOWED))
    return spec, names_blocked, well_formed


def allowed_authority(value: str) -> bool:
    m = _STRICT_AUTHORITY.match(value.strip().lower())
    return bool(m) and m.group(1) == ALLOWED and (m.group(2) is None or 1 <= int(m.group(2)) <= 65535)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(attempt=attempts())
def test_blocked_host_never_reaches_and_allowed_requests_do(plab, attempt):
    lab, observer = plab
    marker = new_marker()
    spec, names_blocked, well_formed = build(attempt, marker)
    note(f"attempt: {attempt}\nspec: {spec}")
    obs = observer.run(lab.devices[0], spec)
    hits = leaked(obs.upstream, (BLOCKED,))
    assert not hits, "BYPASS: " + "\n".join(hits) + "\n" + describe(obs)
    for conn in obs.upstream.values():
        for value in host_headers(conn["data"]):
            assert allowed_authority(value), f"upstream got Host {value!r}: {conn['data'][:300]!r}\n" + describe(obs)
    if names_blocked:
        assert not any(marker.encode() in c["data"] for c in obs.upstream.values()), describe(obs)
    if well_formed:
        reached = [c for c in obs.upstream.values() if marker.encode() in c["data"]]
        assert len(reached) == 1, "an allowed, well-formed request did not reach the upstream\n" + describe(obs)
        if attempt["tls"]:
            assert obs.result["peer_cert_sha256"] != lab.recorder_cert_sha256, \
                "BYPASS: TLS relayed uninspected (the device saw the upstream's certificate)\n" + describe(obs)
