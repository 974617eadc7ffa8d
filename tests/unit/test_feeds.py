"""Category feeds (issue #17): every feed format, integrity (sha256, Ed25519), sanity
refusals (empty, shrink, public suffixes), the last good copy (also after a restart),
exceptions with expiry, conditional requests against a local HTTP server, and the gateway's
refresher swapping the policy when a copy changes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.availability import unavailable
from gateway.feeds import formats
from gateway.feeds.formats import FeedFormatError, parse_text, ut1_files_from_tar
from gateway.feeds.runner import FeedRunner
from gateway.feeds.store import load_snapshot, load_state
from gateway.feeds.update import update_feed
from gateway.metrics import GatewayMetrics
from gateway.policy import DeviceContext
from gateway.policy.compiler import parse_policy
from gateway.policy.loader import load_policy
from gateway.verdict import Action
from gateway.yamlsource import SourceErrors

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 5, 3, 0, tzinfo=timezone.utc)
STAFF = DeviceContext("d-staff", frozenset({"staff"}), "org")


# -- helpers -------------------------------------------------------------------------------

def write_policy(tmp: Path, feed: str, rule_list: str = "f") -> Path:
    p = tmp / "policy.yaml"
    p.write_text("version: 1\nlists:\n  f:\n" + textwrap.indent(textwrap.dedent(feed), "    ")
                 + f"rules:\n  - id: feed-block\n    action: block\n    match: {{list: {rule_list}}}\n")
    return p


def spec_of(policy: Path):
    _doc, sources = parse_policy(policy.read_text(), str(policy))
    return next(s.feed for s in sources if s.feed is not None)


def verdict(policy: Path, state: Path, host: str, now: datetime = NOW):
    snap = load_policy(policy, now=now, feeds_dir=state)
    return snap.decide_url(f"https://{host}/", STAFF, now=now).action


def make_ut1_tree(root: Path, cats: dict[str, tuple[str, str | None]]) -> Path:
    for cat, (domains, urls) in cats.items():
        (root / cat).mkdir(parents=True)
        (root / cat / "domains").write_text(domains)
        if urls is not None:
            (root / cat / "urls").write_text(urls)
    return root


def make_tar(cats: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for cat, text in cats.items():
            data = text.encode()
            info = tarfile.TarInfo(f"blacklists/{cat}/domains")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- formats -------------------------------------------------------------------------------

def test_domains_format_normalizes_skips_and_counts():
    cat = parse_text("# comment\nExample.COM.\nfaß.de  # trailing\nnot a domain\nbad/path\n\n*.wild\nok.example\n", "domains")
    assert cat.domains == {"example.com", "xn--fa-hia.de", "ok.example"}
    assert cat.skipped == 3


def test_hosts_format_takes_names_after_the_address():
    cat = parse_text("127.0.0.1 localhost\n0.0.0.0 ads.example tracker.example # c\n::1 ip6-localhost\n"
                     "notanip host.example\n0.0.0.0\n", "hosts")
    assert cat.exact == {"ads.example", "tracker.example"}
    assert not cat.domains
    assert cat.skipped == 2  # the line without an address, the address without a name


def test_abp_takes_only_plain_domain_blocks_and_counts_the_rest():
    text = "\n".join([
        "[Adblock Plus 2.0]", "! Title: test", "||ads.example^", "||Tracker.Example^",
        "||opt.example^$third-party", "@@||allowed.example^", "example.org##.banner",
        "/banner/*", "||path.example/ads^", "|https://x.example/|", "###ad",
    ])
    cat = parse_text(text, "abp")
    assert cat.domains == {"ads.example", "tracker.example"}
    assert cat.skipped == 7  # options, exception, cosmetic x2, path, anchor, path rule


def test_a_line_over_the_cap_is_skipped_not_parsed():
    cat = parse_text("a" * (formats.MAX_LIST_LINE_CHARS + 1) + "\nok.example\n", "domains")
    assert cat.domains == {"ok.example"} and cat.skipped == 1


def test_ut1_tar_takes_only_asked_categories():
    files = ut1_files_from_tar(make_tar({"webmail": "mail.example\n", "adult": "x.example\n"}), ("webmail",))
    assert files == {("webmail", "domains"): "mail.example\n"}


def test_ut1_tar_refuses_garbage_and_stops_a_gzip_bomb():
    with pytest.raises(FeedFormatError) as exc:
        ut1_files_from_tar(b"not a tar at all", ("webmail",))
    assert exc.value.reason == "format"
    bomb = make_tar({"webmail": "a.example\n" * 200_000})  # 2 MB unpacked, a few kB packed
    with pytest.raises(FeedFormatError) as exc:
        ut1_files_from_tar(bomb, ("webmail",), unpacked_limit=100_000)
    assert exc.value.reason == "too-large"


def test_ut1_directory_with_urls_compiles_and_blocks(tmp_path):
    tree = make_ut1_tree(tmp_path / "ut1", {
        "webmail": ("mail.example\noffice365.example\n", "portal.example/webmail/\n"),
        "gambling": ("casino.example\n", None),
    })
    policy = write_policy(tmp_path, f"url: {tree}\nformat: ut1\ncategories: [webmail]\n", "f/webmail")
    state = tmp_path / "state"
    result = update_feed(spec_of(policy), state)
    assert result.outcome == "updated"
    assert verdict(policy, state, "www.mail.example") is Action.BLOCK
    assert verdict(policy, state, "casino.example") is Action.ALLOW  # category not taken
    snap = load_policy(policy, now=NOW, feeds_dir=state)
    assert snap.decide_url("https://portal.example/webmail/inbox", STAFF, now=NOW).action is Action.BLOCK
    assert snap.decide_url("https://portal.example/news", STAFF, now=NOW).action is Action.ALLOW


def test_real_ut1_snapshot_webmail(tmp_path):
    # shared/ lies beside the checkout (CI lays a copy there too)
    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "ut1-2026-08-17"
    if not data.is_dir():
        unavailable(f"UT1 snapshot not found at {data}")
    policy = write_policy(tmp_path, f"url: {data}\nformat: ut1\ncategories: [webmail]\n", "f/webmail")
    result = update_feed(spec_of(policy), tmp_path / "state")
    assert result.outcome == "updated" and result.snapshot.total() > 300
    assert verdict(policy, tmp_path / "state", "outlook.office365.com") is Action.BLOCK  # listed: office365.com


# -- integrity -----------------------------------------------------------------------------

def test_pinned_sha256(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("bad.example\n")
    good = hashlib.sha256(feed.read_bytes()).hexdigest()
    policy = write_policy(tmp_path, f"url: {feed}\nsha256: {good}\n")
    assert update_feed(spec_of(policy), tmp_path / "state").outcome == "updated"
    feed.write_text("bad.example\nmore.example\n")  # changed: no longer the pinned file
    result = update_feed(spec_of(policy), tmp_path / "state")
    assert (result.outcome, result.reason) == ("refused", "integrity")
    assert "sha256" in result.message.en and "sha256" in result.message.ja
    assert load_snapshot(tmp_path / "state", "f").total() == 1


def test_ed25519_signature(tmp_path):
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    feed, sig = tmp_path / "f.txt", tmp_path / "f.txt.sig"
    feed.write_text("bad.example\n")
    sig.write_bytes(base64.b64encode(key.sign(feed.read_bytes())))
    policy = write_policy(tmp_path, f"url: {feed}\npublic_key: {pub}\n")
    state = tmp_path / "state"
    assert update_feed(spec_of(policy), state).outcome == "updated"
    feed.write_text("bad.example\ninjected.example\n")  # tampered: signature over the old bytes
    result = update_feed(spec_of(policy), state)
    assert (result.outcome, result.reason) == ("refused", "integrity")
    other = Ed25519PrivateKey.generate()
    sig.write_bytes(other.sign(feed.read_bytes()))  # signed, but by someone else
    assert update_feed(spec_of(policy), state).reason == "integrity"
    sig.unlink()
    assert update_feed(spec_of(policy), state).outcome == "refused"
    assert verdict(policy, state, "bad.example") is Action.BLOCK
    assert verdict(policy, state, "injected.example") is Action.ALLOW


def test_a_bad_public_key_is_a_policy_error(tmp_path):
    policy = write_policy(tmp_path, f"url: {tmp_path}/f.txt\npublic_key: bm90IGEga2V5\n")
    with pytest.raises(SourceErrors) as exc:
        spec_of(policy)
    assert "Ed25519" in str(exc.value.errors[0]) and "公開鍵" in exc.value.errors[0].ja


# -- sanity --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,reason", [
    ("# nothing\n\n", "empty"),
    ("ok.example\ncom\n", "public-suffix"),
    ("ok.example\nco.jp\n", "public-suffix"),
])
def test_sanity_refusals_keep_the_last_good_copy(tmp_path, text, reason):
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\n")
    state = tmp_path / "state"
    assert update_feed(spec_of(policy), state).outcome == "updated"
    feed.write_text(text)
    result = update_feed(spec_of(policy), state)
    assert (result.outcome, result.reason) == ("refused", reason)
    assert load_state(state, "f").failures == {reason: 1}
    assert verdict(policy, state, "old.example") is Action.BLOCK
    assert verdict(policy, state, "ok.example") is Action.ALLOW


def test_shrink_beyond_the_fraction_is_refused(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("".join(f"h{i}.example\n" for i in range(100)))
    policy = write_policy(tmp_path, f"url: {feed}\nmax_shrink: 0.3\n")
    state = tmp_path / "state"
    update_feed(spec_of(policy), state)
    feed.write_text("".join(f"h{i}.example\n" for i in range(60)))  # -40 %
    assert update_feed(spec_of(policy), state).reason == "shrink"
    feed.write_text("".join(f"h{i}.example\n" for i in range(75)))  # -25 %: allowed
    assert update_feed(spec_of(policy), state).outcome == "updated"


def test_accepted_public_suffix(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("casino.example\nbet.br\n")
    policy = write_policy(tmp_path, f"url: {feed}\naccept_public_suffixes: [bet.br]\n")
    assert update_feed(spec_of(policy), tmp_path / "state").outcome == "updated"
    assert verdict(policy, tmp_path / "state", "x.bet.br") is Action.BLOCK


def test_too_many_entries_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_FEED_ENTRIES", 10)
    feed = tmp_path / "f.txt"
    feed.write_text("".join(f"h{i}.example\n" for i in range(11)))
    policy = write_policy(tmp_path, f"url: {feed}\n")
    assert update_feed(spec_of(policy), tmp_path / "state").reason == "too-many"


# -- last good copy, offline, restart --------------------------------------------------------

def test_without_a_copy_the_policy_does_not_compile(tmp_path):
    policy = write_policy(tmp_path, f"url: {tmp_path}/missing.txt\n")
    with pytest.raises(SourceErrors) as exc:
        load_policy(policy, feeds_dir=tmp_path / "state")
    err = exc.value.errors[0]
    assert "kanmon lists update" in err.message and "フィード" in err.ja


def test_unreachable_feed_keeps_the_copy_across_a_restart(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\n")
    state = tmp_path / "feeds"  # the feeds dir of the state dir tmp_path
    update_feed(spec_of(policy), state)
    feed.unlink()
    assert update_feed(spec_of(policy), state).reason == "unreachable"
    # A new process (a restarted gateway, or `kanmon policy test` on the same machine) reads
    # the copy from disk, offline.
    env = dict(os.environ, PYTHONPATH=str(ROOT), KANMON_STATE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", "--policy", str(policy),
                           "https://www.old.example/", "https://new.example/"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("block\tfeed-block") and lines[1].startswith("allow")
    status = subprocess.run([sys.executable, "-m", "gateway.cli", "lists", "status", "--policy", str(policy),
                             "--state-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert "all: 1 entries" in status.stdout and "cannot be read" in status.stdout


# -- exceptions ----------------------------------------------------------------------------

def test_allow_exception_overrides_the_feed_until_it_expires(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("office365.example\noutlook.example\n")
    policy = write_policy(tmp_path, f"""\
        url: {feed}
        allow:
          - {{host: outlook.office365.example, reason: "Microsoft 365 (contract)", expires: 2026-12-31}}
        """)
    state = tmp_path / "state"
    update_feed(spec_of(policy), state)
    assert verdict(policy, state, "outlook.office365.example") is Action.ALLOW
    assert verdict(policy, state, "a.outlook.office365.example") is Action.ALLOW
    assert verdict(policy, state, "office365.example") is Action.BLOCK
    assert verdict(policy, state, "outlook.example") is Action.BLOCK
    # Through the last day (Asia/Tokyo), not after it.
    assert verdict(policy, state, "outlook.office365.example", datetime(2026, 12, 31, 14, 0, tzinfo=timezone.utc)) is Action.ALLOW
    assert verdict(policy, state, "outlook.office365.example", datetime(2026, 12, 31, 15, 1, tzinfo=timezone.utc)) is Action.BLOCK


def test_file_and_url_together_is_a_bilingual_error(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nlists:\n  f: {file: a.txt, url: 'https://x.example/f'}\n  g: {format: ut1, url: /x}\n"
                 "  h: {file: a.txt, refresh: 1h}\n")
    with pytest.raises(SourceErrors) as exc:
        parse_policy(p.read_text(), str(p))
    text = "\n".join(str(e) + e.ja for e in exc.value.errors)
    assert "either file" in text and "categories is required" in text and "only used with a feed" in text
    assert "どちらか" in text


# -- conditional requests --------------------------------------------------------------------

class _FeedServer:
    def __init__(self, body: bytes):
        self.body, self.etag, self.requests, self.not_modified = body, '"v1"', [], 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(dict(self.headers))
                if self.headers.get("If-None-Match") == outer.etag:
                    outer.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", outer.etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", outer.etag)
                self.send_header("Last-Modified", "Sat, 05 Dec 2026 00:00:00 GMT")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/feed.txt"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_conditional_requests_and_size_cap(tmp_path):
    server = _FeedServer(b"bad.example\n")
    try:
        policy = write_policy(tmp_path, f"url: {server.url}\ntimeout: 5s\n")
        state = tmp_path / "state"
        assert update_feed(spec_of(policy), state).outcome == "updated"
        assert "If-None-Match" not in server.requests[0]
        result = update_feed(spec_of(policy), state)
        assert result.outcome == "unchanged"
        assert server.requests[1]["If-None-Match"] == '"v1"'
        assert server.requests[1]["If-Modified-Since"] == "Sat, 05 Dec 2026 00:00:00 GMT"
        assert server.not_modified == 1 and load_state(state, "f").last_error is None
        server.etag, server.body = '"v2"', b"bad.example\nnew.example\n"
        assert update_feed(spec_of(policy), state).outcome == "updated"
        assert verdict(policy, state, "new.example") is Action.BLOCK
        server.etag, server.body = '"v3"', b"x.example\n" * 2000
        capped = write_policy(tmp_path, f"url: {server.url}\nmax_bytes: 1000\n")
        assert update_feed(spec_of(capped), state).reason == "too-large"
        assert len(server.requests) == 4
    finally:
        server.close()


def test_http_error_status_is_refused(tmp_path):
    server = _FeedServer(b"")
    try:
        policy = write_policy(tmp_path, f"url: {server.url}\n")
        server.httpd.RequestHandlerClass.do_GET = lambda self: (self.send_error(503))
        result = update_feed(spec_of(policy), tmp_path / "state")
        assert (result.outcome, result.reason) == ("refused", "http-status")
        assert "503" in result.message.en
    finally:
        server.close()


# -- the gateway's refresher ------------------------------------------------------------------

def test_runner_swaps_on_a_new_copy_only(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\nrefresh: 1s\n")
    metrics = GatewayMetrics()
    reloads = []

    async def reload():
        reloads.append(1)
        return True

    runner = FeedRunner(tmp_path / "state" / "feeds", lambda: policy, metrics, reload)
    runner.fetch_missing()
    assert load_snapshot(runner.directory, "f").total() == 1
    assert metrics.registry.get_sample_value("kanmon_list_entries", {"list": "f", "category": "all"}) == 1
    runner._due["f"] = 0
    assert asyncio.run(runner.tick()) is False  # same bytes: no reload
    feed.write_text("old.example\nnew.example\n")
    runner._due["f"] = 0
    assert asyncio.run(runner.tick()) is True and reloads == [1]
    feed.write_text("com\n")
    runner._due["f"] = 0
    assert asyncio.run(runner.tick()) is False and reloads == [1]
    assert metrics.registry.get_sample_value("kanmon_list_update_failures_total",
                                             {"list": "f", "reason": "public-suffix"}) == 1
    age = metrics.registry.get_sample_value("kanmon_list_age_seconds", {"list": "f"})
    assert 0 <= age < 600


# -- bounds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,make_line", [
    ("domains", lambda i: "a." * 120 + f"x{i}"),  # long dotted names (labels the pattern walks)
    ("abp", lambda i: "||" + "a-" * 100 + f"{i}^$third-party"),
    ("hosts", lambda i: "0.0.0.0 " + " ".join(f"h{i}-{j}.example" for j in range(20))),
    ("domains", lambda i: "-" * 4000),  # nearly over the cap, not a name
])
def test_feed_parsing_is_linear_in_the_number_of_lines(fmt, make_line):
    from tests.fuzz.cost import assert_linear
    assert_linear(lambda text: parse_text(text, fmt), lambda n: "\n".join(make_line(i) for i in range(n)), 300)


# -- operator commands -------------------------------------------------------------------------

def test_lists_diff_shows_what_an_update_adds_and_removes_and_stores_nothing(tmp_path, capsys):
    from gateway.cli import main
    feed = tmp_path / "f.txt"
    feed.write_text("keep.example\ngone.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\n")
    args = ["--policy", str(policy), "--state-dir", str(tmp_path)]
    assert main(["lists", "update", *args]) == 0
    feed.write_text("keep.example\nnew.example\n")
    capsys.readouterr()
    assert main(["lists", "diff", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "+ f/all new.example" in out and "- f/all gone.example" in out
    assert not any("keep.example" in line for line in out)
    assert load_snapshot(tmp_path / "feeds", "f").categories["all"].domains == {"keep.example", "gone.example"}
    assert main(["lists", "status", "--json", *args]) == 0
    import json
    status = json.loads(capsys.readouterr().out)[0]
    assert status["entries"] == {"all": 2} and status["last_error"] is None and status["age_seconds"] >= 0
    feed.write_text("com\n")
    assert main(["lists", "update", *args]) == 1
    assert "public-suffix" in capsys.readouterr().out
    assert main(["lists", "status", "--json", *args]) == 0
    status = json.loads(capsys.readouterr().out)[0]
    assert status["last_error_reason"] == "public-suffix" and "公開接尾辞" in status["last_error"]


def test_a_damaged_copy_stops_the_compile_with_a_bilingual_error(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\n")
    state = tmp_path / "state"
    update_feed(spec_of(policy), state)
    (state / "f.json").write_text('{"name": "f", "categories": 5}')
    with pytest.raises(SourceErrors) as exc:
        load_policy(policy, feeds_dir=state)
    err = exc.value.errors[0]
    assert "damaged feed copy" in err.message and "壊れています" in err.ja
    # The next good fetch replaces it.
    assert update_feed(spec_of(policy), state).outcome == "updated"
    assert verdict(policy, state, "old.example") is Action.BLOCK


def test_one_oversized_member_is_refused_before_it_is_read_whole(monkeypatch):
    monkeypatch.setattr(formats, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(FeedFormatError) as exc:
        ut1_files_from_tar(make_tar({"webmail": "a.example\n" * 200}), ("webmail",))
    assert exc.value.reason == "too-large" and "webmail/domains" in str(exc.value)
    assert ut1_files_from_tar(make_tar({"webmail": "a.example\n" * 50}), ("webmail",))


def test_a_list_named_like_a_feed_category_is_an_error(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nlists:\n  ut1: {url: /x, format: ut1, categories: [webmail]}\n"
                 "  ut1/webmail: {file: a.txt}\n")
    with pytest.raises(SourceErrors) as exc:
        parse_policy(p.read_text(), str(p))
    assert "category of feed ut1" in str(exc.value.errors[0]) and "カテゴリ" in exc.value.errors[0].ja


def test_policy_test_with_config_reads_the_gateways_copies(tmp_path, capsys):
    from gateway.cli import main
    from tests.unit.test_load_bounds import CONFIG
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\n")
    config = tmp_path / "kanmon.yaml"
    config.write_text(CONFIG.format(state=tmp_path / "gw-state"))
    update_feed(spec_of(policy), tmp_path / "gw-state" / "feeds")
    assert main(["policy", "test", "--policy", str(policy), "--config", str(config), "https://old.example/"]) == 0
    assert capsys.readouterr().out.startswith("block\tfeed-block")


def test_a_redirect_away_from_http_is_refused(tmp_path):
    server = _FeedServer(b"")

    def redirect(self):
        self.send_response(302)
        self.send_header("Location", "ftp://127.0.0.1/feed.txt")
        self.end_headers()

    server.httpd.RequestHandlerClass.do_GET = redirect
    try:
        result = update_feed(spec_of(write_policy(tmp_path, f"url: {server.url}\n")), tmp_path / "state")
        assert (result.outcome, result.reason) == ("refused", "http-status")
    finally:
        server.close()


def test_runner_reloads_for_a_copy_written_by_kanmon_lists_update(tmp_path):
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\nrefresh: 1d\n")
    reloads = []

    async def reload():
        reloads.append(1)
        return True

    runner = FeedRunner(tmp_path / "state" / "feeds", lambda: policy, GatewayMetrics(), reload)
    runner.fetch_missing()
    assert asyncio.run(runner.tick()) is False  # not due for a day, nothing new
    feed.write_text("old.example\nnew.example\n")
    assert update_feed(spec_of(policy), runner.directory).outcome == "updated"  # what the command does
    assert asyncio.run(runner.tick()) is True and reloads == [1]
    assert asyncio.run(runner.tick()) is False and reloads == [1]


def test_cluster_policy_bundle_carries_list_files_but_not_feeds(tmp_path, monkeypatch):
    from gateway.registry.postgres import policy_bundle
    feed = tmp_path / "f.txt"
    feed.write_text("old.example\n")
    (tmp_path / "local.txt").write_text("local.example\n")
    policy = write_policy(tmp_path, f"url: {feed}\n")
    policy.write_text(policy.read_text().replace("lists:\n", "lists:\n  local: {file: local.txt}\n"))
    update_feed(spec_of(policy), tmp_path / "feeds")
    monkeypatch.setenv("KANMON_STATE_DIR", str(tmp_path))
    version, text, lists = policy_bundle(policy)
    assert lists == {"local.txt": "local.example\n"} and "url:" in text
