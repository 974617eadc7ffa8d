"""What the engine needs from a virus scanner (issue 5 item 13; IPA SME sample 7.3
ウイルスチェック: メールゲートウェイでウイルスチェックを実施する). Any object with ``scan(bytes)``
will do; clamd.py is the real one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    signature: str | None = None


class ScannerUnavailable(Exception):
    """The scanner could not give an answer (down, timeout, size limit, protocol error)."""


class Scanner(Protocol):
    def scan(self, data: bytes) -> ScanResult:
        """Scan one message; raise ScannerUnavailable when no answer can be had."""
        ...
