"""Scanners for tests that need no clamd: one that knows the corpus marker (decoding MIME
parts as clamd does), one that is always down."""

from __future__ import annotations

import email
import email.policy

from gateway.mail.scanner import ScannerUnavailable, ScanResult
from tests.mailcorpus.build import TEST_VIRUS_MARKER


class MarkerScanner:
    def __init__(self) -> None:
        self.calls = 0

    def scan(self, data: bytes) -> ScanResult:
        self.calls += 1
        message = email.message_from_bytes(data, policy=email.policy.default)
        for part in message.walk():
            payload = part.get_payload(decode=True) if not part.is_multipart() else None
            if payload and TEST_VIRUS_MARKER in payload:
                return ScanResult(True, "Kanmon.Test.Marker")
        return ScanResult(False)


class DownScanner:
    def scan(self, data: bytes) -> ScanResult:
        raise ScannerUnavailable("connection refused (test)")
