"""Download scanning (issue #18; IPA SME 技術的対策 2.1.4.2, NISC booklet 2-5): HTTP(S) responses
of a risky type — decided by their first bytes as well as by name and Content-Type
(gateway/scan/filetype.py) — are streamed to clamd (INSTREAM, gateway/scan/clamdclient.py)
before the device gets any of them. An infected file is replaced by the block page naming the
signature (rule ``kanmon:infected``, the "infected" page of gateway/pages), logged (``proxy`` stream, dataset ``kanmon.download-scan``),
counted, and reported to automatic quarantine (gateway/autoquarantine).

Why the body is buffered (up to ``scan.max_bytes``) rather than scanned while it streams: the
block page can replace a response only before its headers are sent, and a file streamed to the
device while clamd reads it would be on the device before the verdict — an executable of
which the device got all but the last chunk is still an executable. Buffering is the simplest
way that fails closed; the price is memory (at most ``max_bytes`` per download in flight) and
latency (the device gets the first byte when the whole file is scanned). So while scanning is
on, mitmproxy's ``stream_large_bodies`` is raised to ``max_bytes`` (gateway/proxy.py): every
response up to that size is held whole, scanned if risky and sent.

Above the limit mitmproxy streams the response (from its headers when Content-Length says so,
or when its buffer of a chunked body passes the limit). Such a response goes through a guard
from its first byte: the guard holds the body back until it has the first bytes, classifies
them, and then either releases everything (not risky, or ``on_too_large: allow`` for the kind)
or sends nothing more and cuts the connection (``on_too_large: block``, by default executables,
scripts and apps): headers have gone out, so the device sees a failed download, not the page.
Partial content (206) cannot be scanned either and is treated the same way. A scanner that
does not answer follows ``on_unavailable`` (default: block every risky kind).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zlib
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from gateway.proxy.flowstate import METADATA_DEVICE, METADATA_REQUEST_ID, METADATA_SIGNATURE, METADATA_VERDICT
from addons.requesttarget import request_target
from gateway.autoquarantine.triggers import Trigger
from gateway.mail.scanner import ScannerUnavailable
from gateway.mail.clamdproto import ClamdSizeLimit
from gateway.scan.decoding import TooLarge, Undecodable, decode_bounded
from gateway.scan.decide import ScanOutcome, ScanSettings, ScanStatus, outcome
from gateway.scan.filetype import SNIFF_BYTES, Classification, by_content_type, by_name, classify, filename_of
from gateway.verdict import Action, Stage, Verdict

log = logging.getLogger("kanmon.scan")

METADATA_SCAN = "kanmon.scan"   # the ScanOutcome of a scanned response


class _GuardedResponse(http.Response):
    """A response whose streaming goes through our guard, whenever mitmproxy decides to stream
    it. mitmproxy switches a buffered body to streaming by assigning ``stream = True`` when its
    buffer passes ``stream_large_bodies``, with no hook in between; this property turns that
    assignment into the guard, so no byte of an over-limit body reaches the device unguarded.
    (The instance's class is changed in ``responseheaders``; nothing else of mitmproxy's
    Response changes.)"""

    @property
    def stream(self):  # type: ignore[override]
        return self.__dict__.get("_kanmon_stream", False)

    @stream.setter
    def stream(self, value) -> None:
        guard = self.__dict__.get("_kanmon_guard")
        self.__dict__["_kanmon_stream"] = guard if (value is True and guard is not None) else value


class _StreamGuard:
    """mitmproxy's per-chunk stream callable for an over-limit (or partial) body."""

    def __init__(self, addon: "DownloadScanner", flow: http.HTTPFlow, why: str):
        self.addon, self.flow, self.why = addon, flow, why
        self.held = bytearray()
        self.state: str | None = None   # None: deciding; "pass"; "drop"

    def __call__(self, data: bytes) -> list[bytes]:
        # A list, never b"": mitmproxy sends each returned chunk, and an empty one is the
        # terminating chunk of a chunked response (it would end the message early).
        if self.state == "pass":
            return [data] if data else []
        if self.state == "drop":
            return []
        self.held += data
        if data and len(self.held) < SNIFF_BYTES:
            return []
        try:
            drop = self.addon.over_limit(self.flow, bytes(self.held[:SNIFF_BYTES]), self.why)
        except Exception:   # this runs inside mitmproxy's layer, not under the fail-closed guard: fail closed here
            log.exception("download scan guard failed; the download is dropped")
            self.addon.guard_failed(self.flow)
            drop = True
        if drop:
            self.state = "drop"
            self.held.clear()
            return []
        self.state = "pass"
        out, self.held = bytes(self.held), bytearray()
        return [out] if out else []


class DownloadScanner:
    name = "kanmon-download-scan"

    def __init__(self, settings: ScanSettings, client, connections, metrics, sink,
                 block_http: Callable[[http.HTTPFlow, Verdict], None], cut: Callable[[str, str], bool], *,
                 on_virus: Callable[[Trigger, Any, str | None, dict], Any] | None = None,
                 user_of: Callable[[Any], str | None] | None = None):
        self.settings = settings
        self.client = client            # AsyncClamd (or any object with ``async scan(bytes)``)
        self.connections = connections
        self.metrics = metrics
        self.sink = sink
        self.block_http = block_http
        self.cut = cut
        self.on_virus = on_virus
        self.user_of = user_of

    # -- hooks ---------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not self._passing(flow):
            return
        if response.status_code == 206:
            # A piece of a file cannot be scanned: judged from what the piece says, like an over-limit body.
            response.stream = _StreamGuard(self, flow, "partial")
            return
        guard = _StreamGuard(self, flow, "too-large")
        already = response.stream   # mitmproxy streams it already: Content-Length above the limit
        response.__class__ = _GuardedResponse
        response.__dict__["_kanmon_guard"] = guard
        response.stream = True if already else False

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is not None and isinstance(response.stream, _StreamGuard):
            # Streamed: the guard judged it. A dropped body must not end as a complete (empty)
            # response: killing the flow here closes the connection before the end of the message.
            if response.stream.state == "drop" and flow.killable:
                flow.kill()
            return
        if response is None or not self._passing(flow):
            return   # blocked or answered by the gateway already
        if response.raw_content is None:
            return
        raw = response.raw_content
        if not raw:
            return   # HEAD, 304, an empty file: nothing to scan
        too_large = False
        try:   # what the device will see; bounded (mitmproxy's own decoder has no ceiling)
            body = decode_bounded(raw, response.headers.get("content-encoding"), self.settings.max_bytes)
        except TooLarge:   # a small gzip of a large file (or a decompression bomb)
            body, too_large = raw, True
        except Undecodable:
            body = raw     # scanned as sent; clamd unpacks gzip/bzip2 itself
        found = classify(body[:SNIFF_BYTES] if not too_large else self._decoded_head(raw, response),
                         filename=self._filename(flow), content_type=response.headers.get("content-type"))
        if found is None:
            return
        if too_large:
            self._finish(flow, found, outcome(self.settings, found.kind, too_large=True), None)
            return
        try:
            result = await self.client.scan(body)
        except ClamdSizeLimit:
            self._finish(flow, found, outcome(self.settings, found.kind, too_large=True), body)
            return
        except ScannerUnavailable as exc:
            log.error("download scan of %s failed: %s", request_target(flow)[1], exc)
            self._finish(flow, found, outcome(self.settings, found.kind, unavailable=str(exc)), body)
            return
        self._finish(flow, found, outcome(self.settings, found.kind, infected=result.infected,
                                          signature=result.signature), body)

    # -- decisions -----------------------------------------------------------------------
    def _decoded_head(self, raw: bytes, response: http.Response) -> bytes:
        """The first bytes of a body too large to decode whole (for sniffing only)."""
        try:
            return decode_bounded(raw, response.headers.get("content-encoding"), SNIFF_BYTES)
        except TooLarge:
            pass
        except Undecodable:
            return raw[:SNIFF_BYTES]
        coding = (response.headers.get("content-encoding") or "").split(",")[-1].strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            d = zlib.decompressobj(47 if coding != "deflate" else 15)
            try:
                return d.decompress(raw, SNIFF_BYTES)
            except zlib.error:
                return b""
        return b""   # br / zstd heads: judged by name and type only

    def _passing(self, flow: http.HTTPFlow) -> bool:
        verdict = flow.metadata.get(METADATA_VERDICT)
        return isinstance(verdict, Verdict) and verdict.passes

    def _filename(self, flow: http.HTTPFlow) -> str | None:
        return filename_of(request_target(flow)[1], flow.response.headers.get("content-disposition")
                           if flow.response else None)

    def over_limit(self, flow: http.HTTPFlow, head: bytes, why: str) -> bool:
        """The guard's decision for a streamed body (True: drop it and cut the connection)."""
        response = flow.response
        encoded = bool(response.headers.get("content-encoding", "").strip()) if response else False
        ctype = response.headers.get("content-type") if response else None
        if encoded:   # compressed bytes say "gzip", not what the file is: name and type only
            found = [c for c in (by_name(self._filename(flow)), by_content_type(ctype)) if c is not None]
            found_one = found[0] if found else None
        else:
            found_one = classify(head, filename=self._filename(flow), content_type=ctype)
        if found_one is None:
            return False
        result = outcome(self.settings, found_one.kind, too_large=True)
        self._record(flow, found_one, result, None, note=why)
        if result.block:
            reason = f"download scan: {found_one.kind} {why}, not scanned"
            asyncio.get_running_loop().call_soon(self.cut, flow.client_conn.id, reason)
        return result.block

    def guard_failed(self, flow: http.HTTPFlow) -> None:
        if self.metrics is not None:
            self.metrics.addon_errors.labels(self.name, "stream").inc()
        try:
            asyncio.get_running_loop().call_soon(self.cut, flow.client_conn.id, "download scan guard failed")
        except RuntimeError:
            pass   # no loop (tests): the response hook kills the flow

    def _finish(self, flow: http.HTTPFlow, found: Classification, result: ScanOutcome, body: bytes | None) -> None:
        flow.metadata[METADATA_SCAN] = result
        self._record(flow, found, result, body)
        if result.block:
            verdict = Verdict(Action.BLOCK, result.rule_id, f"{result.reason.ja} / {result.reason.en}", Stage.RESPONSE,
                              category="malware" if result.status is ScanStatus.INFECTED else "download-scan")
            if result.signature:
                flow.metadata[METADATA_SIGNATURE] = result.signature   # the "infected" page names it
            self.block_http(flow, verdict)
            flow.response.headers["X-Kanmon-Scan"] = str(result.status)
            if result.signature:
                flow.response.headers["X-Kanmon-Signature"] = result.signature
        if result.status is ScanStatus.INFECTED and self.on_virus is not None:
            device = flow.metadata.get(METADATA_DEVICE)
            self.on_virus(Trigger.DOWNLOAD_VIRUS, device, self._user(device), {
                "signature": result.signature, "url": request_target(flow)[1], "file.name": self._filename(flow),
                "file.hash.sha256": hashlib.sha256(body or b"").hexdigest(), "file.size": len(body or b""),
                "kanmon.file.kind": str(found.kind)})

    def _user(self, device) -> str | None:
        if device is None:
            return None
        return self.user_of(device) if self.user_of is not None else (device.owner or None)

    def _record(self, flow: http.HTTPFlow, found: Classification, result: ScanOutcome, body: bytes | None,
                note: str | None = None) -> None:
        action = "block" if result.block else "allow"
        if self.metrics is not None:
            self.metrics.download_scans.labels(str(found.kind), str(result.status), action).inc()
        device = flow.metadata.get(METADATA_DEVICE)
        peer = flow.client_conn.peername
        record: dict[str, Any] = {
            "event.dataset": "kanmon.download-scan",
            "device.id": device.device_id if device is not None else None,
            "user.name": self._user(device),
            "source.ip": peer[0] if peer else None,
            "url.full": request_target(flow)[1],
            "http.request.method": flow.request.method,
            "http.response.status_code": flow.response.status_code if flow.response else None,
            "kanmon.verdict": action,
            "event.type": ["denied"] if result.block else ["allowed"],
            "rule.id": result.rule_id,
            "event.reason": f"{result.reason.ja} / {result.reason.en}",
            "file.name": self._filename(flow),
            "kanmon.file.kind": str(found.kind),
            "kanmon.file.sniffed": found.why,
            "kanmon.scan.result": str(result.status),
            "kanmon.scan.signature": result.signature,
            "kanmon.scan.partial": note == "partial" or None,
            "kanmon.request_id": flow.metadata.get(METADATA_REQUEST_ID),
        }
        if body is not None:
            record["file.size"] = len(body)
            record["file.hash.sha256"] = hashlib.sha256(body).hexdigest()
        if self.sink is not None:
            self.sink.append("proxy", {k: v for k, v in record.items() if v is not None or k in (
                "device.id", "user.name", "source.ip")})
