"""The download-scanning addon and automatic quarantine's block observer, at the mitmproxy
hook level (tflow), plus the asyncio clamd client against a real clamd (our own signature,
offline; skipped outside CI when clamd is missing, a failure in CI)."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import os
import zipfile

import pytest
from mitmproxy.test import tflow

from addons.autoquarantine import BlockObserver
from addons.blockpage import Helpdesk, block_response
from gateway.proxy.flowstate import METADATA_SIGNATURE, METADATA_VERDICT
from gateway.proxy.flowstate import METADATA_DEVICE
from addons.scan import DownloadScanner, _StreamGuard
from gateway.autoquarantine.service import AutoQuarantiner
from gateway.autoquarantine.triggers import AutoQuarantineSettings, Trigger, TriggerEngine
from gateway.proxy.connections import LiveConnections
from gateway.lab.clamd import TEST_MARKER, TEST_SIGNATURE, LabClamd, clamd_binary
from gateway.mail.scanner import ScannerUnavailable, ScanResult
from gateway.metrics import GatewayMetrics
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.registry.sqlite import SqliteRegistry
from gateway.scan.clamdclient import AsyncClamd
from gateway.scan.decide import ScanSettings
from gateway.scan.filetype import SNIFF_BYTES
from gateway.verdict import Action, Stage, Verdict
from tests.availability import unavailable

PE = b"MZ" + b"\0" * 62 + b"PE\0\0" + b"\0" * 200
DEVICE = DeviceRecord("dev-1", "k", ipaddress.ip_address("10.77.0.2"), owner="alice@example.test")
ALLOW = Verdict(Action.ALLOW, "r1", "ok", Stage.REQUEST)


class FakeClamd:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.scanned = result, error, []

    async def scan(self, data):
        self.scanned.append(bytes(data))
        if self.error:
            raise self.error
        return self.result


class Sink:
    def __init__(self):
        self.records = []

    def append(self, stream, record):
        self.records.append((stream, record))


def block_http(flow, verdict):   # as Enforcer.block_http does it
    flow.metadata[METADATA_VERDICT] = verdict
    flow.response = block_response(verdict, url=flow.request.url, device_id="dev-1",
                                   helpdesk=Helpdesk("情報システム課", "IT desk", "x1234"), request_id="rid",
                                   signature=flow.metadata.get(METADATA_SIGNATURE))


def make(client, **settings):
    sink, virus, cuts = Sink(), [], []
    addon = DownloadScanner(ScanSettings(clamd_socket="/x", **settings), client, LiveConnections(), GatewayMetrics(),
                            sink, block_http, lambda cid, why: cuts.append((cid, why)),
                            on_virus=lambda *a: virus.append(a))
    return addon, sink, virus, cuts


def flow_with(body: bytes, path="/files/report.txt", ctype="text/plain", **headers):
    f = tflow.tflow(resp=True)
    f.request.path = path
    f.response.headers["content-type"] = ctype
    for k, v in headers.items():
        f.response.headers[k.replace("_", "-")] = v
    f.response.content = body
    f.metadata[METADATA_VERDICT] = ALLOW
    f.metadata[METADATA_DEVICE] = DEVICE
    return f


def run(coro):
    return asyncio.run(coro)


def test_infected_program_disguised_as_text_gets_the_block_page_naming_the_signature():
    client = FakeClamd(ScanResult(True, "Kanmon.Test.Signature.UNOFFICIAL"))
    addon, sink, virus, _ = make(client)
    f = flow_with(PE + TEST_MARKER)
    addon.responseheaders(f)
    run(addon.response(f))
    assert client.scanned == [PE + TEST_MARKER]
    page = f.response.get_text()
    assert f.response.status_code == 403 and f.response.headers["X-Kanmon-Rule"] == "kanmon:infected"
    assert f.response.headers["X-Kanmon-Signature"] == "Kanmon.Test.Signature.UNOFFICIAL"
    assert f.response.headers["X-Kanmon-Page"] == "infected"
    assert "Kanmon.Test.Signature.UNOFFICIAL" in page and "ウイルスを検出しました" in page and TEST_MARKER.decode() not in page
    [(stream, rec)] = sink.records
    assert stream == "proxy" and rec["event.dataset"] == "kanmon.download-scan" and rec["rule.id"] == "kanmon:infected"
    assert rec["kanmon.file.kind"] == "executable" and rec["device.id"] == "dev-1" and rec["user.name"] == "alice@example.test"
    assert rec["file.size"] == len(PE + TEST_MARKER) and len(rec["file.hash.sha256"]) == 64
    [(trigger, device, user, evidence)] = virus
    assert trigger is Trigger.DOWNLOAD_VIRUS and device is DEVICE and evidence["signature"].startswith("Kanmon.Test")


def test_clean_risky_file_passes_untouched_and_harmless_content_is_not_scanned():
    client = FakeClamd(ScanResult(False))
    addon, sink, virus, _ = make(client)
    f = flow_with(b"%PDF-1.4 fine", path="/a.pdf", ctype="application/pdf")
    run(addon.response(f))
    assert f.response.status_code == 200 and f.response.content == b"%PDF-1.4 fine"
    assert sink.records[0][1]["kanmon.scan.result"] == "clean" and not virus
    html = flow_with(b"<html>hello</html>", ctype="text/html")
    run(addon.response(html))
    assert len(client.scanned) == 1   # the page was not sent to clamd


def test_scanner_down_blocks_programs_by_default_and_follows_the_setting():
    down = FakeClamd(error=ScannerUnavailable("connection refused"))
    addon, sink, _, _ = make(down)
    f = flow_with(PE)
    run(addon.response(f))
    # the gateway's own fault, not the organization's policy: the "fault" page, 503, try again
    assert f.response.status_code == 503 and f.response.headers["X-Kanmon-Rule"] == "kanmon:scan-unavailable"
    assert f.response.headers["X-Kanmon-Page"] == "fault" and f.response.headers["Retry-After"]
    from gateway.scan.decide import KindActions
    lenient, sink2, _, _ = make(down, on_unavailable=KindActions("block", {"pdf": "allow"}))
    pdf = flow_with(b"%PDF-1.4", ctype="application/pdf")
    run(lenient.response(pdf))
    assert pdf.response.status_code == 200 and sink2.records[0][1]["kanmon.verdict"] == "allow"


def test_compressed_body_is_scanned_decoded_and_too_large_when_decoded():
    import gzip
    client = FakeClamd(ScanResult(True, "Sig"))
    addon, _, _, _ = make(client)
    f = flow_with(b"")
    f.response.headers["content-encoding"] = "gzip"
    f.response.raw_content = gzip.compress(PE + TEST_MARKER)
    run(addon.response(f))
    assert client.scanned == [PE + TEST_MARKER] and f.response.status_code == 403
    small, sink, _, _ = make(FakeClamd(ScanResult(False)), max_bytes=4096)
    bomb = flow_with(b"")
    bomb.response.headers["content-encoding"] = "gzip"
    bomb.response.raw_content = gzip.compress(PE + b"\0" * 100_000)   # 100 kB decoded from ~100 bytes
    run(small.response(bomb))
    assert bomb.response.status_code == 403 and sink.records[0][1]["rule.id"] == "kanmon:scan-too-large"


def test_already_blocked_responses_are_left_alone():
    client = FakeClamd(ScanResult(True, "Sig"))
    addon, sink, _, _ = make(client)
    f = flow_with(PE)
    f.metadata[METADATA_VERDICT] = Verdict(Action.BLOCK, "r", "no", Stage.REQUEST)
    run(addon.response(f))
    assert client.scanned == [] and sink.records == []


def test_mitmproxy_switching_to_streaming_goes_through_the_guard():
    """mitmproxy assigns ``stream = True`` when a buffered body passes the limit; that
    assignment must become our guard (no unguarded streaming of an over-limit body)."""
    addon, sink, _, cuts = make(FakeClamd(ScanResult(False)))

    async def main():
        f = flow_with(b"", path="/dl/setup")
        f.response.content = None
        addon.responseheaders(f)
        assert f.response.stream is False            # buffered while below the limit
        f.response.stream = True                     # what mitmproxy's check_body_size does
        guard = f.response.stream
        assert isinstance(guard, _StreamGuard)
        assert guard(PE[:100]) == []                  # held until the sniff window is full
        assert guard(PE[100:] + b"\0" * SNIFF_BYTES) == []    # a program above the limit: dropped
        assert guard(b"more") == [] and guard(b"") == []   # never b"": the end of a chunked body
        await asyncio.sleep(0)

        await addon.response(f)                       # end of the stream: the flow is killed, so
        return f                                      # the message never ends as a complete (empty) one

    f = run(main())
    assert cuts and "executable" in cuts[0][1]
    assert f.error is not None and f.error.msg == "Connection killed."
    assert sink.records[0][1]["kanmon.scan.result"] == "too-large" and sink.records[0][1]["kanmon.verdict"] == "block"


def test_over_limit_harmless_or_allowed_bodies_are_released_whole():
    addon, sink, _, cuts = make(FakeClamd(ScanResult(False)))
    f = flow_with(b"", path="/video.mp4", ctype="video/mp4")
    f.response.stream = True                         # Content-Length above the limit: streamed from the headers
    addon.responseheaders(f)
    guard = f.response.stream
    assert isinstance(guard, _StreamGuard)
    data = b"\0\0\0\x18ftypmp42" + b"v" * (SNIFF_BYTES + 10)
    assert guard(data[:10]) == []
    assert guard(data[10:]) == [data]                # everything held is released at once
    assert guard(b"tail") == [b"tail"] and guard(b"") == []
    assert not cuts and not sink.records
    # a short body ends before the sniff window is full: judged at the end, released
    short = flow_with(b"", path="/x.bin", ctype="application/octet-stream")
    short.response.stream = True
    addon.responseheaders(short)
    assert short.response.stream(b"abc") == [] and short.response.stream(b"") == [b"abc"]


def test_partial_content_of_a_program_is_not_delivered_unscanned():
    addon, sink, _, cuts = make(FakeClamd(ScanResult(False)))

    async def main():
        f = flow_with(b"", path="/setup.exe", ctype="application/octet-stream")
        f.response.status_code = 206
        addon.responseheaders(f)
        assert f.response.stream(b"\0" * (SNIFF_BYTES + 1)) == []   # named .exe: too-large action (block)
        await asyncio.sleep(0)

    run(main())
    assert cuts and sink.records[0][1]["kanmon.scan.partial"] is True


# -- block observer -> automatic quarantine --------------------------------------------------

def test_category_block_quarantines_through_the_observer(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    key = base64.b64encode(os.urandom(32)).decode()
    rec = reg.add(DeviceRecord("dev-1", key, ipaddress.ip_address("10.77.0.2"), owner="alice@example.test"))
    pokes = []
    svc = AutoQuarantiner(TriggerEngine(AutoQuarantineSettings(categories=frozenset({"malware"}))), reg,
                          poke=lambda: pokes.append(1))
    observer = BlockObserver(LiveConnections(), svc.blocked)

    async def main():
        svc.bind(asyncio.get_running_loop())
        ok = tflow.tflow()
        ok.metadata[METADATA_DEVICE] = rec
        ok.metadata[METADATA_VERDICT] = Verdict(Action.BLOCK, "webmail", "no", Stage.REQUEST, category="webmail")
        observer.requestheaders(ok)           # a block of another category: nothing
        await svc.drain()
        assert reg.get("dev-1").status is DeviceStatus.ACTIVE
        bad = tflow.tdnsflow()
        bad.metadata[METADATA_DEVICE] = rec
        bad.metadata[METADATA_VERDICT] = Verdict(Action.BLOCK, "feeds-malware", "malware", Stage.DNS, category="malware")
        observer.dns_request(bad)
        await svc.drain()

    run(main())
    now = reg.get("dev-1")
    assert now.status is DeviceStatus.QUARANTINED and now.status_reason.startswith("[auto] category")
    assert "dns.google" in now.status_reason and pokes == [1]


def test_observer_reports_each_block_once_and_response_stage_blocks_too():
    seen = []
    observer = BlockObserver(LiveConnections(), lambda device, user, category, evidence: seen.append((category, evidence)))
    f = tflow.tflow(resp=True)
    f.metadata[METADATA_DEVICE] = DEVICE
    f.metadata[METADATA_VERDICT] = ALLOW
    observer.requestheaders(f)
    observer.responseheaders(f)
    assert seen == []                                  # passing verdicts are not reported
    f.metadata[METADATA_VERDICT] = Verdict(Action.BLOCK, "apk", "no", Stage.RESPONSE, category="sideload")
    observer.responseheaders(f)
    [(category, evidence)] = seen
    assert category == "sideload" and evidence["kanmon.stage"] == "http-response" and evidence["rule.id"] == "apk"
    blocked_no_category = tflow.tflow()
    blocked_no_category.metadata[METADATA_DEVICE] = DEVICE
    blocked_no_category.metadata[METADATA_VERDICT] = Verdict(Action.BLOCK, "x", "no", Stage.REQUEST)
    observer.requestheaders(blocked_no_category)
    assert len(seen) == 1


def test_a_failing_guard_drops_the_download():
    addon, _, _, _ = make(FakeClamd(ScanResult(False)))
    f = flow_with(b"", path="/x.exe")
    f.response.stream = True
    addon.responseheaders(f)

    def explode(*a):
        raise RuntimeError("boom")
    addon.over_limit = explode
    guard = f.response.stream
    assert guard(b"\0" * (SNIFF_BYTES + 1)) == [] and guard.state == "drop"
    assert addon.metrics.addon_errors.labels("kanmon-download-scan", "stream")._value.get() == 1


# -- the asyncio client against a real clamd ---------------------------------------------------

@pytest.fixture(scope="module")
def real_clamd(tmp_path_factory):
    if clamd_binary() is None:
        unavailable("clamd is not installed (apt-get install --no-install-recommends clamav-daemon)")
    scanner = LabClamd(tmp_path_factory.mktemp("clamd"), stream_max="1M").start()
    yield scanner
    scanner.stop()


def test_real_clamd_finds_the_signature_also_inside_archives(real_clamd):
    client = AsyncClamd(str(real_clamd.socket_path), timeout=20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("dir/viewer.exe", PE + TEST_MARKER)

    async def main():
        assert await client.ping()
        infected = await client.scan(PE + TEST_MARKER)
        clean = await client.scan(PE + b"nothing here")
        zipped = await client.scan(buf.getvalue())
        return infected, clean, zipped

    infected, clean, zipped = run(main())
    assert infected.infected and infected.signature.startswith(TEST_SIGNATURE)
    assert not clean.infected
    assert zipped.infected and zipped.signature.startswith(TEST_SIGNATURE)


def test_real_clamd_limits_and_absence_are_unavailable_never_clean(real_clamd, tmp_path):
    async def main():
        with pytest.raises(ScannerUnavailable):     # above clamd's StreamMaxLength (1M)
            await AsyncClamd(str(real_clamd.socket_path), timeout=20).scan(b"a" * (3 * 1024 * 1024))
        with pytest.raises(ScannerUnavailable):     # nobody listening
            await AsyncClamd(str(tmp_path / "none.sock"), timeout=2).scan(b"x")
        assert not await AsyncClamd(str(tmp_path / "none.sock"), timeout=2).ping()
        async def hold(reader, writer):   # accepts, reads, never answers
            await reader.read()
            writer.close()

        silent = await asyncio.start_unix_server(hold, path=str(tmp_path / "silent.sock"))
        try:
            with pytest.raises(ScannerUnavailable, match="did not answer within"):
                await AsyncClamd(str(tmp_path / "silent.sock"), timeout=0.5).scan(b"x")
        finally:
            silent.close()

    run(main())
