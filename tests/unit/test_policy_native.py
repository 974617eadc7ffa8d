"""The native fast path of the decision (gateway/policy/_fastpath.cpp) against the Python
engine: the same Verdict for every URL, device and stage, on every policy the project ships
or tests with and on hypothesis-made URLs; the switch back to Python; the extension is
really built and used in CI.
"""

from __future__ import annotations

import os
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy import DeviceContext, compile_text, load_policy, native, query_for_url
from gateway.verdict import Stage

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILES = sorted(
    [ROOT / "policies" / "example.yaml", ROOT / "tests" / "replay" / "policy.yaml",
     *(ROOT / "tests" / "e2e" / "policies").glob("*.yaml")]
)
IN_CI = os.environ.get("CI", "").lower() == "true"
NOW = datetime(2026, 6, 10, 3, 0, tzinfo=timezone.utc)
DEVICES = (
    DeviceContext("d-staff", frozenset({"staff"}), "org", user="sato", platform="ios", os_version="17.4"),
    DeviceContext("d-byod", frozenset({"byod"}), "byod", user="suzuki", platform="android", os_version="12"),
    DeviceContext("d-it", frozenset({"it", "staff"}), "org", user="tanaka", platform="windows", status="quarantined"),
    DeviceContext("d-jb", frozenset(), "byod", platform="android", os_version="9", jailbroken=True, signed_in=True,
                  mfa=True, auth_time=NOW - timedelta(hours=1)),
)
STAGES = (Stage.REQUEST, Stage.RESPONSE, Stage.DNS, Stage.TLS, Stage.TCP)


def needs_native() -> None:
    """Outside CI a machine without the built extension skips; in CI it fails (the build
    is required there, setup.py)."""
    if not native.available():
        if IN_CI:
            pytest.fail(f"CI=true but the native policy engine is not built: {native.IMPORT_ERROR}")
        pytest.skip(f"native policy engine not built here: {native.IMPORT_ERROR}")


def fields(v):
    return (v.action, v.rule_id, v.explain, v.stage, v.headers, v.category)


def same(snap_native, snap_python, url, device, stage, now=NOW, **extra):
    """decide_url == decide(query_for_url) on the same snapshot == the pure-Python
    snapshot's verdict (equal fields); where the native path decides, its answer is the
    very Verdict object decide returns."""
    got = snap_native.decide_url(url, device, stage, now=now, **extra)
    ref = snap_native.decide(query_for_url(url, device, stage, now=now, **extra))
    assert fields(got) == fields(ref), (url, device.device_id, stage, fields(got), fields(ref))
    direct = snap_native.native_verdict(url, device, stage, now=now)
    if direct is not None:
        assert direct is ref and got is ref, (url, device.device_id, stage)
    py = snap_python.decide(query_for_url(url, device, stage, now=now, **extra))
    assert fields(got) == fields(py), (url, device.device_id, stage)
    return got


# -- the extension is there and in use ----------------------------------------------------------


def test_extension_is_built_and_used():
    needs_native()
    snap = compile_text("version: 1\nrules:\n  - {id: a, action: block, match: {domain: a.test}}\n")
    assert snap.engine == ("python" if native.switched_off() else "native")
    forced = compile_text("version: 1\nrules: []\n", native=True)
    assert forced.engine == "native" and forced.native_problem == ""
    if snap.engine == "native":  # built on first use: the addons' decide() never pays for it
        assert snap._native is None
        assert snap.decide_url("https://x.a.test/", DEVICES[0]).rule_id == "a"
        assert snap._native is not None and snap.native_verdict("https://x.a.test/", DEVICES[0]).rule_id == "a"


def test_a_policy_the_native_engine_refuses_stays_on_python(monkeypatch):
    needs_native()
    from gateway.policy.snapshot import PolicySnapshot

    def refuse(*_args, **_kwargs):
        raise ValueError("RE2 refused pattern 0")

    monkeypatch.setattr(PolicySnapshot, "_native_engine", refuse)
    monkeypatch.delenv("KANMON_NATIVE", raising=False)
    snap = compile_text("version: 1\nrules:\n  - {id: a, action: block, match: {domain: a.test}}\n")
    assert snap.decide_url("https://a.test/", DEVICES[0]).rule_id == "a"
    assert snap.engine == "python" and "RE2 refused" in snap.native_problem
    with pytest.raises(ValueError):
        compile_text("version: 1\nrules: []\n", native=True)


def test_kanmon_native_0_switches_to_python(monkeypatch):
    monkeypatch.setenv("KANMON_NATIVE", "0")
    text = "version: 1\nrules:\n  - {id: a, action: block, match: {domain: a.test}}\n"
    snap = compile_text(text)
    assert snap.engine == "python" and "KANMON_NATIVE" in snap.native_problem
    assert snap.native_verdict("https://a.test/", DEVICES[0]) is None
    v = snap.decide_url("https://a.test/", DEVICES[0])
    assert (v.action, v.rule_id) == ("block", "a")
    monkeypatch.setenv("KANMON_NATIVE", "1")
    assert compile_text(text, native=False).engine == "python"
    if native.available():
        assert compile_text(text).engine == "native"


def test_native_true_without_the_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(native, "_MODULE", None)
    with pytest.raises(RuntimeError, match="not built"):
        compile_text("version: 1\nrules: []\n", native=True)
    assert compile_text("version: 1\nrules: []\n").engine == "python"  # the gateway still runs


# -- differential: shipped and test policies ------------------------------------------------------


def _hosts_of(snap) -> list[str]:
    hosts = set(list(snap._exact)[:200]) | set(list(snap._suffix)[:200])
    return sorted(h for h in hosts if h)


def _url_variants(host: str) -> list[str]:
    return [
        f"https://{host}/", f"http://{host}/index.html", f"https://www.{host}/upload/a.apk?x=1",
        f"https://{host.upper()}:443/Path/%7Euser/%2Fx", f"http://{host}:8080/a%41b%zz", f"{host}/no-scheme",
        f"https://{host}./trailing", f"https://user:pw@{host}/login", f"wss://{host}:443/socket",
        f"https://{host}/download/app.apk", f"https://{host}/upload/x", f"https://{host}/#frag",
    ]


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_policy_file_same_verdicts(path):
    needs_native()
    snap_n = load_policy(path, now=NOW)
    snap_p = compile_text(path.read_text(encoding="utf-8"), _list_texts(path), filename=str(path),
                          compiled_at=NOW, native=False)
    assert snap_n.engine == "native" or native.switched_off(), snap_n.native_problem
    urls = [u for h in _hosts_of(snap_n) + ["example.com", "unlisted.example.org", "192.0.2.10"] for u in _url_variants(h)]
    urls += ["https://[2001:db8::5]/admin", "https://例え.jp/x", "https://xn--r8jz45g.jp/x", "https:///nohost"]
    for device in DEVICES:
        for url in urls:
            for stage in STAGES:
                same(snap_n, snap_p, url, device, stage)
            same(snap_n, snap_p, url, device, Stage.RESPONSE, response_content_type="application/vnd.android.package-archive")
            same(snap_n, snap_p, url, device, Stage.REQUEST, method="POST", request_content_type="multipart/form-data",
                 body_size=50_000_000)


def _list_texts(path: Path) -> dict[str, tuple[str, str]]:
    from gateway.policy.compiler import parse_policy

    _doc, sources = parse_policy(path.read_text(encoding="utf-8"), str(path))
    return {s.name: (str(path.parent / s.file), (path.parent / s.file).read_text(encoding="utf-8")) for s in sources}


# -- differential: what the native code evaluates itself ------------------------------------------

# Every kind of rule the native path decides (host tables, list regexes, keyed and free URL
# patterns, more than LAZY_URL_RULES URL-routed rules, device groups through the view, an
# expiry), with rules it does not (unless, method, time) in between.
NATIVE_POLICY = textwrap.dedent("""
    version: 1
    settings: {default_action: allow}
    lists:
      mail: {file: mail.txt}
    rule_groups:
      - name: byod
        applies_to: {ownership: byod}
        rules:
          - {id: byod-storage, action: block, match: {domain: [storage.test]}}
    rules:
      - {id: allow-ok, action: allow, match: {domain_exact: [ok.blocked.test]}}
      - {id: blocked, action: block, match: {domain: [blocked.test, 例え.jp]}}
      - {id: mail, action: block, reason: webmail, match: {list: mail}}
      - {id: expired, action: block, expires: 2026-01-01, match: {domain: [old.test]}}
      - {id: current, action: monitor, expires: 2026-12-31, match: {domain: [old.test, new.test]}}
      - {id: keyed, action: block, match: {url: ["files.test/secret/*", "*.docs.test/private*", "https://[2001:db8::5]/admin*"]}}
      - {id: keyed-parts, action: monitor, match: {url: ["http://files.test:8080/a*b*c", "files.test/q?x=*", "*.docs.test/x/*/y",
                                                       "HTTPS://files.test:443/tls", "ftp://docs.test", "files.test/Ex%41ct"]}}
      - {id: staff-only, action: monitor, match: {device_group: staff, domain: [staff.test]}}
      - {id: unless, action: block, match: {domain: [unless.test]}, unless: {device_group: it}}
      - {id: post, action: block, match: {domain: [post.test], method: POST}}
      - {id: free-rx, action: block, match: {url_regex: ["/upload/[0-9]+", "tracking=1", "/DownLoad/", "=evil&"]}}
""")
FREE_RULES = "".join(f"  - {{id: free-{i}, action: block, match: {{url_regex: ['/f{i}/']}}}}\n" for i in range(20))
MAIL = "mail.test\n/webmail-[a-z]+\\.test/\n"


def _compile(body: str, native_flag: bool):
    return compile_text(body, {"mail": ("mail.txt", MAIL)}, filename="p.yaml", compiled_at=NOW, native=native_flag)


HOSTS = ["blocked.test", "a.blocked.test", "ok.blocked.test", "例え.jp", "xn--r8jz45g.jp", "mail.test", "webmail-x.test",
         "storage.test", "old.test", "new.test", "files.test", "docs.test", "a.docs.test", "staff.test",
         "unless.test", "post.test", "other.test", "192.0.2.1"]
PATHS = ["/", "/secret/x", "/private", "/privateer?q=1", "/upload/123", "/a?tracking=1", "/f3/", "/F19/x", "/%73ecret/x",
         "/admin", "/a1b2c", "/axbyc?z", "/abcb", "/q?x=1", "/Q?X=", "/x/any/y", "/x/y", "/x/a/y#f", "/x/a/yz", "/download/z",
         "/?q=evil&x", "/tls", "/ExAct", "/exact?a", "/%2Fdownload/"]


@pytest.mark.parametrize("lazy", [False, True], ids=["few-url-rules", "many-url-rules"])
def test_native_rules_same_verdicts_and_decided_natively(lazy):
    needs_native()
    body = NATIVE_POLICY + (FREE_RULES if lazy else "")
    snap_n, snap_p = _compile(body, True), _compile(body, False)
    natively = 0
    for device in DEVICES:
        for host in HOSTS:
            for path in PATHS:
                url = f"https://{host}{path}"
                for now in (NOW, datetime(2027, 6, 1, tzinfo=timezone.utc), None):
                    v = same(snap_n, snap_p, url, device, Stage.REQUEST, now=now)
                    direct = snap_n.native_verdict(url, device, Stage.REQUEST, now=now)
                    if direct is not None:
                        natively += 1
                        assert direct is v
    assert natively > 500  # the fast path really decides most of these


def test_native_decides_simple_urls_and_hands_back_the_rest():
    needs_native()
    snap = _compile(NATIVE_POLICY, True)
    staff = DEVICES[0]
    for url in ["https://blocked.test/", "https://files.test/secret/a", "http://OTHER.test:8080/x%2fy%41",
                "other.test/x", "https://files.test:443/secret/a"]:
        assert snap.native_verdict(url, staff, now=NOW) is not None, url
    for url in ["https://例え.jp/", "https://user@blocked.test/", "https://[2001:db8::5]/admin",
                "https://blocked.test./", "https://blocked.test:abc/", "https://unless.test/", "https://post.test/",
                "https://blocked.t%65st/"]:
        assert snap.native_verdict(url, staff, now=NOW) is None, url
    assert snap.native_verdict("https://blocked.test/", staff, Stage.DNS) is None  # stages without a URL


def test_device_view_with_a_failing_device_condition_goes_to_python():
    needs_native()
    body = """
    version: 1
    rules:
      - {id: old-os, action: block, match: {os_version_below: {ios: "17"}, domain: [a.test]}}
    """
    snap_n, snap_p = _compile(textwrap.dedent(body), True), _compile(textwrap.dedent(body), False)
    odd = DeviceContext("d-odd", frozenset(), "org", platform="ios", os_version="x.y")
    for device in (odd, *DEVICES):
        same(snap_n, snap_p, "https://a.test/", device, Stage.REQUEST)


# -- hypothesis: URL spellings --------------------------------------------------------------------

_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
_HOST = st.one_of(
    st.sampled_from(HOSTS),
    st.builds(lambda a, b: f"{a}.{b}", _LABEL, st.sampled_from(HOSTS)),
    st.sampled_from(["[2001:db8::5]", "[2001:DB8:0::5]", "[::1]", "例え.JP", "ＥＸＡＭＰＬＥ.test", "blocked.test。"]),
    st.text(alphabet="abcXYZ.-_ %@:[]例", min_size=0, max_size=12),
)
_CASE = st.sampled_from([str.lower, str.upper, str.title])


@st.composite
def _url(draw) -> str:
    scheme = draw(st.sampled_from(["https://", "http://", "HTTPS://", "ws://", "wss://", "ftp://", "", "1x://", "a+b://"]))
    user = draw(st.sampled_from(["", "", "user@", "u:p@", "@"]))
    host = draw(_CASE)(draw(_HOST)) if draw(st.booleans()) else draw(_HOST)
    dots = draw(st.sampled_from(["", "", ".", ".."]))
    port = draw(st.sampled_from(["", "", ":443", ":80", ":8080", ":", ":0x1", ":²", ": 80", ":08080"]))
    path = draw(st.lists(st.sampled_from(PATHS + ["%7e", "%7E", "%2F", "%2f", "%41", "%zz", "%4", "%", "~", "例",
                                                   "?q=%61", "#f", " "]), max_size=4))
    return scheme + user + host + dots + port + "".join(path)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=_url(), device=st.sampled_from(DEVICES), stage=st.sampled_from([Stage.REQUEST, Stage.RESPONSE]))
def test_hypothesis_urls_same_verdicts(url, device, stage):
    needs_native()
    same(_SNAPS[0], _SNAPS[1], url, device, stage)
    same(_SNAPS[2], _SNAPS[3], url, device, stage)


@settings(max_examples=400, deadline=None)
@given(url=_url())
def test_hypothesis_native_normalization_is_query_for_urls(url):
    needs_native()
    from gateway.policy import _fastpath

    got = _fastpath.normalize(url)
    if got is None:
        return  # not the simple form: Python decides
    q = query_for_url(url, DEVICES[0])
    assert got == (str(q.url), q.host)


_SNAPS = (
    (_compile(NATIVE_POLICY, native.available()), _compile(NATIVE_POLICY, False),
     _compile(NATIVE_POLICY + FREE_RULES, native.available()), _compile(NATIVE_POLICY + FREE_RULES, False))
)


def test_snapshot_and_native_engine_are_freed():
    """The engine calls back into its snapshot (fallback, device views): a reference cycle
    the collector must break, or every policy reload would leak the old tables."""
    import gc
    import weakref

    snap = _compile(NATIVE_POLICY, native.available())
    snap.decide_url("https://blocked.test/", DEVICES[0])
    ref = weakref.ref(snap)
    del snap
    gc.collect()
    assert ref() is None
