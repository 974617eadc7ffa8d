"""Download scanning: the settings (``scan:`` in the gateway config) and what to do with a
risky download once its scan result — or the lack of one — is known. Pure.

    scan:
      clamd: {socket: /run/clamav/clamd.ctl}     # or {host: 127.0.0.1, port: 3310}
      timeout_seconds: 30
      max_bytes: 26214400        # scanned up to this size (clamd's StreamMaxLength must be >= it)
      max_concurrent: 8
      on_too_large: {default: allow, executable: block, script: block, mobile-app: block}
      on_unavailable: {default: block}

IPA SME 技術的対策 2.1.4.2 (ネットワークから取得したファイルのウイルスチェック), NISC booklet 2-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.i18n import Text
from gateway.verdict import RULE_INFECTED, RULE_SCAN_TOO_LARGE, RULE_SCAN_UNAVAILABLE
from gateway.scan.filetype import FileKind

RULE_SCAN_CLEAN = "kanmon:scan-clean"

DEFAULT_MAX_BYTES = 25 * 1024 * 1024   # clamd's own StreamMaxLength default (25M)
ACTIONS = ("allow", "block")
_KINDS = [str(k) for k in FileKind]
_ACTION_MAP = {"type": "object", "additionalProperties": False,
               "properties": {key: {"enum": list(ACTIONS)} for key in ["default", *_KINDS]}}

SCAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["clamd"],
    "properties": {
        "clamd": {"type": "object", "additionalProperties": False, "properties": {
            "socket": {"type": "string", "minLength": 1},
            "host": {"type": "string", "minLength": 1},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535}}},
        "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
        "max_bytes": {"type": "integer", "minimum": 4096, "maximum": 4 * 1024 ** 3},
        "max_concurrent": {"type": "integer", "minimum": 1, "maximum": 256},
        "on_too_large": _ACTION_MAP,
        "on_unavailable": _ACTION_MAP,
    },
}


class ScanStatus(StrEnum):
    CLEAN = "clean"
    INFECTED = "infected"
    TOO_LARGE = "too-large"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class KindActions:
    default: str
    by_kind: Mapping[str, str] = field(default_factory=dict)

    def action(self, kind: FileKind) -> str:
        return self.by_kind.get(str(kind), self.default)

    @classmethod
    def from_mapping(cls, data: Mapping[str, str], fallback: "KindActions") -> "KindActions":
        merged = {**fallback.by_kind, **{k: v for k, v in data.items() if k != "default"}}
        return cls(data.get("default", fallback.default), merged)


# Defaults: fail closed for programs (executables, scripts, apps) when a file is too large to
# scan; for every risky type when the scanner cannot answer.
DEFAULT_ON_TOO_LARGE = KindActions("allow", {"executable": "block", "script": "block", "mobile-app": "block"})
DEFAULT_ON_UNAVAILABLE = KindActions("block")


@dataclass(frozen=True)
class ScanSettings:
    clamd_socket: str | None = None
    clamd_host: str | None = None
    clamd_port: int | None = None
    timeout_seconds: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_concurrent: int = 8
    on_too_large: KindActions = DEFAULT_ON_TOO_LARGE
    on_unavailable: KindActions = DEFAULT_ON_UNAVAILABLE


def scan_settings(section: Mapping[str, Any] | None) -> ScanSettings | None:
    """From a schema-checked ``scan:`` mapping; None when the section is absent."""
    if section is None:
        return None
    clamd = section["clamd"]
    return ScanSettings(
        clamd_socket=clamd.get("socket"), clamd_host=clamd.get("host"), clamd_port=clamd.get("port"),
        timeout_seconds=float(section.get("timeout_seconds", 30.0)),
        max_bytes=int(section.get("max_bytes", DEFAULT_MAX_BYTES)),
        max_concurrent=int(section.get("max_concurrent", 8)),
        on_too_large=KindActions.from_mapping(section.get("on_too_large", {}), DEFAULT_ON_TOO_LARGE),
        on_unavailable=KindActions.from_mapping(section.get("on_unavailable", {}), DEFAULT_ON_UNAVAILABLE),
    )


T_CLAMD_ADDRESS = Text("clamd の socket か、host と port の組のどちらか一方を書いてください",
                       "give either clamd's socket, or its host and port (one of the two)")


def clamd_address_error(section: Mapping[str, Any]) -> Text | None:
    """The schema cannot say "socket, or host and port": this does (None when fine)."""
    clamd = section.get("clamd", {})
    socket, tcp = clamd.get("socket"), (clamd.get("host"), clamd.get("port"))
    if bool(socket) == any(tcp) or (not socket and not all(tcp)):
        return T_CLAMD_ADDRESS
    return None


@dataclass(frozen=True)
class ScanOutcome:
    status: ScanStatus
    block: bool
    rule_id: str
    reason: Text
    signature: str | None = None


def outcome(settings: ScanSettings, kind: FileKind, *, infected: bool | None = None, signature: str | None = None,
            too_large: bool = False, unavailable: str | None = None) -> ScanOutcome:
    """What happens to a risky download of ``kind``: found infected (``infected``), above the
    size limit (``too_large``), or without an answer from the scanner (``unavailable``: why)."""
    if too_large:
        block = settings.on_too_large.action(kind) == "block"
        limit = f"{settings.max_bytes:,}"
        return ScanOutcome(ScanStatus.TOO_LARGE, block, RULE_SCAN_TOO_LARGE, Text(
            f"ウイルス検査の上限 {limit} バイトを超える{_kind_ja(kind)}のため{'ブロックしました' if block else '検査せずに通しました'}",
            f"{kind} above the virus-scan limit of {limit} bytes: {'blocked' if block else 'passed unscanned'}"))
    if unavailable is not None:
        block = settings.on_unavailable.action(kind) == "block"
        return ScanOutcome(ScanStatus.UNAVAILABLE, block, RULE_SCAN_UNAVAILABLE, Text(
            f"ウイルス検査ができないため{'ブロックしました' if block else '検査せずに通しました'}({unavailable})",
            f"virus scanner unavailable: {'blocked' if block else 'passed unscanned'} ({unavailable})"))
    if infected:
        name = signature or "?"
        return ScanOutcome(ScanStatus.INFECTED, True, RULE_INFECTED, Text(
            f"ウイルスを検出しました: {name}", f"virus found: {name}"), signature=name)
    return ScanOutcome(ScanStatus.CLEAN, False, RULE_SCAN_CLEAN, Text("ウイルスは検出されませんでした", "no virus found"))


def _kind_ja(kind: FileKind) -> str:
    return {FileKind.EXECUTABLE: "実行ファイル", FileKind.SCRIPT: "スクリプト", FileKind.MOBILE_APP: "アプリ",
            FileKind.DOCUMENT: "文書ファイル", FileKind.PDF: "PDF", FileKind.ARCHIVE: "圧縮ファイル"}[kind]
