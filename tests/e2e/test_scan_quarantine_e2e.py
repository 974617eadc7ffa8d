"""Issue #18 "Must show", downloads: through the tunnel, a download carrying the test signature
(a custom clamd signature, offline; a real clamd) is replaced by the block page naming the
signature; the device is quarantined by itself, its live connections are cut, a webhook
receiver in the lab gets the alert (device, user, trigger, evidence), a remediation host still
loads, and `kanmon device release` restores it. A clean program passes, an infected file inside
a zip is found as clamd scans archives, and a scanner that is down blocks programs (fail closed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from gateway.lab.clamd import TEST_MARKER, TEST_SIGNATURE, LabClamd, clamd_binary
from gateway.lab.topology import SPARE4, WEB4, Lab, wait_until
from tests.availability import unavailable

pytestmark = pytest.mark.e2e

WEBHOOK_PORT = 8099
# The operator's chat tool: every POST body, one JSON line each.
WEBHOOK = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    out = open(sys.argv[3], "a")
    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            out.write(body.decode() + "\\n"); out.flush()
            self.send_response(204); self.end_headers()
        def log_message(self, *a):
            pass
    HTTPServer((sys.argv[1], int(sys.argv[2])), Hook).serve_forever()
""")

# A slow download that reports when data stopped arriving (a live connection to be cut).
DOWNLOAD = textwrap.dedent("""
    import json, socket, sys, time
    s = socket.create_connection((sys.argv[1], 80), timeout=5)
    s.sendall(b"GET /big HTTP/1.1\\r\\nHost: www.example.test\\r\\n\\r\\n")
    s.settimeout(0.05)
    got, last, started = 0, time.time(), False
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            if started and time.time() - last > 0.6:
                break
            continue
        except OSError:
            break
        if not chunk:
            break
        got += len(chunk)
        last = time.time()
        if not started and got > 256 * 1024:
            started = True
            print("flowing", flush=True)
    print(json.dumps({"bytes": got}), flush=True)
""")

# An upstream that sends its body chunked (no Content-Length): mitmproxy buffers it and switches
# to streaming only when its buffer passes the limit — the path without a hook in between.
CHUNKED = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    PE = b"MZ" + b"\\0" * 62 + b"PE\\0\\0" + b"\\0" * 200
    class Chunked(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = (PE if self.path == "/program" else b"plain text ") + b"x" * (3 * 1024 * 1024)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 65536):
                part = body[i:i + 65536]
                self.wfile.write(b"%x\\r\\n" % len(part) + part + b"\\r\\n")
            self.wfile.write(b"0\\r\\n\\r\\n")
        def log_message(self, *a):
            pass
    HTTPServer((sys.argv[1], int(sys.argv[2])), Chunked).serve_forever()
""")

PE_HEADER = b"MZ" + b"\0" * 62 + b"PE\0\0" + b"\0" * 200


def code(result) -> str:
    return result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def clamd(tmp_path):
    if clamd_binary() is None:
        unavailable("clamd is not installed (apt-get install --no-install-recommends clamav-daemon)")
    scanner = LabClamd(tmp_path / "clamd").start()
    yield scanner
    scanner.stop()


def start_webhook(lab: Lab, path) -> subprocess.Popen:
    proc = lab.inet.popen(sys.executable, "-c", WEBHOOK, SPARE4, str(WEBHOOK_PORT), str(path))
    lab.server_procs.append(proc)   # stopped with the lab
    wait_until(lambda: lab.inet.python(
        f"import socket; socket.create_connection(({SPARE4!r}, {WEBHOOK_PORT}), timeout=1)", check=False
    ).returncode == 0, 10, "the webhook receiver")
    return proc


def device_status(lab: Lab, device_id: str) -> dict:
    return json.loads(lab.kanmon("device", "show", device_id, "--config", str(lab.config_path)).stdout)


def scan_records(lab: Lab) -> list[dict]:
    return [r for r in lab.log_records("proxy") if r.get("event.dataset") == "kanmon.download-scan"]


def test_infected_download_is_blocked_and_the_device_quarantines_itself(make_lab, clamd, tmp_path):
    hooks = tmp_path / "webhook.jsonl"
    lab = make_lab(n_devices=2, start=False, overrides={
        "scan": {"clamd": {"socket": str(clamd.socket_path)}, "max_bytes": 1024 * 1024},
        "auto_quarantine": {"download_virus": True},
        "alerts": {"gateway_name": "kanmon-lab", "webhook": {"url": f"http://{SPARE4}:{WEBHOOK_PORT}/hook", "timeout": 2},
                   "retries": 3, "retry_base_seconds": 0.5},
        "quarantine": {"allow_hosts": ["mdm.test"]},
    })
    start_webhook(lab, hooks)
    lab.start_gateway()
    for device in lab.devices:
        lab.wait_for_peer(device)
    a, b = lab.devices
    files = lab.web_dir / "www" / "files"
    clean_exe = PE_HEADER + b"clean program" * 100
    (files / "tool.exe").write_bytes(clean_exe)
    # a program carrying the test signature, served as a harmless-looking PDF: sniffing finds it
    (files / "invoice.pdf").write_bytes(PE_HEADER + b"payload " + TEST_MARKER + b" end")
    (files / "photos.zip").write_bytes(zipped("photos/viewer.exe", PE_HEADER + TEST_MARKER))

    # -- a clean program is scanned and delivered whole
    got = a.curl("https://files.example.test/files/tool.exe", "-o", "/dev/stdout")
    assert code(got) == "200" and got.stdout.startswith("MZ"), got.stdout[:200]
    wait_until(lambda: any(r.get("kanmon.scan.result") == "clean" for r in scan_records(lab)), 5, "the clean scan record")

    # -- a live connection of device a (a large download, streamed past the scan limit)
    live = subprocess.Popen(a.ns.cmd(sys.executable, "-c", DOWNLOAD, WEB4), stdout=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "flowing"

    # -- the infected download: the block page names the signature
    started = time.monotonic()
    blocked = a.curl("https://files.example.test/files/invoice.pdf", "-i")
    answered = time.monotonic()
    assert code(blocked) == "403", blocked.stdout[:500]
    text = blocked.stdout
    assert "x-kanmon-rule: kanmon:infected" in text.lower() and TEST_SIGNATURE in text
    assert "ウイルスを検出しました" in text and "virus found" in text and TEST_MARKER.decode() not in text
    assert "x-kanmon-page: infected" in text.lower() and "ファイルはこの端末に届いていません" in text

    # -- quarantined by itself: registry, live connection cut, webhook alert
    wait_until(lambda: device_status(lab, a.device_id)["status"] == "quarantined", 5, "the automatic quarantine")
    assert json.loads(live.communicate(timeout=30)[0].strip().splitlines()[-1])["bytes"] < 512 * 1024 * 1024
    cut = time.monotonic()
    print(f"\ninfected download answered in {(answered - started) * 1e3:.0f} ms (curl included); "
          f"device quarantined and its live download cut {(cut - answered) * 1e3:.0f} ms later "
          "(includes `kanmon device show` polls and the downloader's 0.6 s idle detection)")
    wait_until(lambda: hooks.exists() and hooks.read_text().strip(), 15, "the webhook alert")
    [alert] = [json.loads(line) for line in hooks.read_text().splitlines() if "device-auto-quarantined" in line]
    details = alert["details"]
    assert details["device.id"] == a.device_id and details["user.name"] == f"user{a.index}@example.test"
    assert details["kanmon.trigger"] == "download-virus" and alert["gateway"] == "kanmon-lab"
    assert details["kanmon.evidence"]["signature"].startswith(TEST_SIGNATURE)
    assert details["kanmon.evidence"]["url"] == "https://files.example.test/files/invoice.pdf"
    assert len(details["kanmon.evidence"]["file.hash.sha256"]) == 64
    # only the automatic alert: the audit record of the same quarantine does not send a second one
    assert not [line for line in hooks.read_text().splitlines() if '"kind": "device-quarantined"' in line]

    # -- evidence in the logs and the metrics
    [rec] = [r for r in scan_records(lab) if r.get("kanmon.scan.result") == "infected"]
    assert rec["device.id"] == a.device_id and rec["rule.id"] == "kanmon:infected"
    assert rec["kanmon.scan.signature"].startswith(TEST_SIGNATURE) and rec["kanmon.file.kind"] == "executable"
    assert rec["url.full"] == "https://files.example.test/files/invoice.pdf"
    assert lab.metric_value("kanmon_auto_quarantines_total", trigger="download-virus") == 1
    assert lab.metric_value("kanmon_download_scans_total", kind="executable", result="infected", action="block") == 1
    wait_until(lambda: lab.metric_value("kanmon_alert_deliveries_total", channel="webhook", outcome="delivered") >= 1,
               10, "the delivery metric")
    audit = [r for r in lab.log_records("audit") if r.get("device.id") == a.device_id]
    assert any(r["event.action"] == "device-quarantined" and r["user.name"] == "kanmon-auto-quarantine" for r in audit)
    # the file never reached the device, and nothing of it is in the proxy log but its hash
    assert not [r for r in lab.log_records("proxy") if TEST_MARKER.decode() in json.dumps(r)]

    # -- quarantined: only remediation hosts; the tunnel stays up
    wait_until(lambda: code(a.curl("http://www.example.test/q-check", "-i", timeout=5)) == "403", 5, "quarantine")
    assert "kanmon:quarantine" in a.curl("https://www.example.test/q-page", "-i").stdout
    assert code(a.curl("https://mdm.test/enroll", timeout=10)) == "200"
    # device b is not affected
    assert code(b.curl("https://www.example.test/b-ok", timeout=10)) == "200"

    # -- release restores device a
    lab.kanmon("device", "release", a.device_id, "--config", str(lab.config_path))
    wait_until(lambda: code(a.curl("https://www.example.test/after-release", timeout=5)) == "200", 10, "the release")
    assert device_status(lab, a.device_id)["status"] == "active"

    # -- an infected file inside a zip: clamd unpacks it; device b quarantines itself too
    zipped_got = b.curl("https://files.example.test/files/photos.zip", "-i")
    assert code(zipped_got) == "403" and TEST_SIGNATURE in zipped_got.stdout
    wait_until(lambda: device_status(lab, b.device_id)["status"] == "quarantined", 5, "b's quarantine")
    assert lab.metric_value("kanmon_download_scans_total", kind="archive", result="infected", action="block") == 1


def test_scanner_down_blocks_programs_and_too_large_programs_are_cut(make_lab, clamd):
    lab = make_lab(n_devices=1, start=False, overrides={
        "scan": {"clamd": {"socket": str(clamd.socket_path)}, "max_bytes": 64 * 1024,
                 "on_unavailable": {"default": "block", "pdf": "allow"}},
    })
    lab.start_gateway()
    lab.wait_for_peer(lab.devices[0])
    dev = lab.devices[0]
    files = lab.web_dir / "www" / "files"
    (files / "big-tool.bin").write_bytes(PE_HEADER + b"x" * (3 * 1024 * 1024))   # above max_bytes (and 2 MiB)
    (files / "tool.exe").write_bytes(PE_HEADER + b"clean")
    (files / "plain.txt").write_bytes(b"just text\n" * 20_000)                   # above the limit, not risky
    (files / "doc.pdf").write_bytes(b"%PDF-1.4 small")

    # above the limit: a program is cut before any of its body reaches the device
    big = dev.curl("https://files.example.test/files/big-tool.bin", "-o", "/dev/null", "-w", "\nSIZE=%{size_download}")
    assert big.returncode != 0 and "SIZE=0" in big.stdout, (big.returncode, big.stdout, big.stderr)
    assert code(dev.curl("https://files.example.test/files/plain.txt", "-o", "/dev/null")) == "200"
    wait_until(lambda: any(r.get("kanmon.scan.result") == "too-large" and r["kanmon.verdict"] == "block"
                           for r in scan_records(lab)), 5, "the too-large record")

    # a chunked program growing past the limit (no Content-Length): cut at mitmproxy's switch to
    # streaming, nothing of it delivered; a chunked harmless body of the same size arrives whole
    lab.server_procs.append(lab.inet.popen(sys.executable, "-c", CHUNKED, SPARE4, "8080"))
    wait_until(lambda: lab.inet.python(f"import socket; socket.create_connection(({SPARE4!r}, 8080), timeout=1)",
                                       check=False).returncode == 0, 10, "the chunked server")
    chunked = dev.curl("http://spare.test:8080/program", "-o", "/dev/null", "-w", "\nSIZE=%{size_download}")
    assert chunked.returncode != 0 and "SIZE=0" in chunked.stdout, (chunked.returncode, chunked.stdout, chunked.stderr)
    plain = dev.curl("http://spare.test:8080/plain", "-o", "/dev/null", "-w", "\nSIZE=%{size_download}")
    assert plain.returncode == 0 and f"SIZE={3 * 1024 * 1024 + 11}" in plain.stdout, (plain.stdout, plain.stderr)

    # the scanner goes down: programs are blocked with the page, PDFs pass (configured), all logged
    clamd.stop()
    down = dev.curl("https://files.example.test/files/tool.exe", "-i")
    assert code(down) == "503" and "kanmon:scan-unavailable" in down.stdout and "retry-after" in down.stdout.lower()
    assert "ウイルス検査ができない" in down.stdout
    assert code(dev.curl("https://files.example.test/files/doc.pdf", "-o", "/dev/null")) == "200"
    assert lab.metric_value("kanmon_download_scans_total", kind="executable", result="unavailable", action="block") == 1
    assert lab.metric_value("kanmon_download_scans_total", kind="pdf", result="unavailable", action="allow") == 1
