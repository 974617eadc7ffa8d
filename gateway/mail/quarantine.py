"""The quarantine store: held messages on disk, under a directory the caller gives (the
gateway's state dir). I/O edge.

Layout: ``<dir>/<id>/message.eml`` (the original bytes, untouched) and ``<dir>/<id>/meta.json``
(verdict, indicators, context, time, size, sha256). An entry is written to a temporary
directory and renamed into place, so a crash never leaves half an entry; release hands the
bytes back before the entry is removed, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.i18n import Text
from gateway.mail.engine import MailContext, MailVerdict

_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")


class QuarantineError(Exception):
    def __init__(self, text: Text):
        self.text = text
        super().__init__(text.en)


@dataclass(frozen=True)
class QuarantineEntry:
    id: str
    meta: dict[str, Any]
    path: Path

    @property
    def message_path(self) -> Path:
        return self.path / "message.eml"


def _summary(raw: bytes) -> dict[str, str]:
    """From and Subject for listings, best effort (the message may be malformed)."""
    from email.parser import BytesHeaderParser

    from gateway.mail.message import POLICY, fix_8bit

    out = {}
    try:
        headers = BytesHeaderParser(policy=POLICY).parsebytes(raw)
        for key in ("From", "Subject"):
            value = headers.get(key)
            out[key.lower()] = fix_8bit(str(value)) if value is not None else ""
    except Exception:  # noqa: BLE001 — a listing must never fail on a hostile header
        out = {"from": "", "subject": ""}
    return out


class QuarantineStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.damaged: list[tuple[str, Text]] = []   # entries the last list() could not read, and why

    def _dir(self, entry_id: str) -> Path:
        if not _ID.match(entry_id):
            raise QuarantineError(Text(f"隔離 ID の形式が不正です: {entry_id!r}", f"malformed quarantine id: {entry_id!r}"))
        path = self.root / entry_id
        if not (path / "meta.json").is_file():
            raise QuarantineError(Text(f"隔離メール {entry_id} はありません ({self.root})",
                                       f"no quarantined message {entry_id} in {self.root}"))
        return path

    def put(self, raw: bytes, verdict: MailVerdict, context: MailContext = MailContext(),
            now: datetime | None = None) -> str:
        now = now or datetime.now(UTC)
        entry_id = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(6)}"
        meta = {
            "id": entry_id,
            **_summary(raw),
            "received": now.isoformat(),
            "verdict": str(verdict.action),
            "score": verdict.score,
            "indicators": [{**i.as_dict(), "evidence_ja": i.evidence.ja} for i in verdict.indicators],
            "context": asdict(context),
            "size": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{entry_id}"
        tmp.mkdir(mode=0o700)
        try:
            for name, data in (("message.eml", raw), ("meta.json", json.dumps(meta, ensure_ascii=False, indent=2).encode())):
                with open(tmp / name, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            os.rename(tmp, self.root / entry_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry_id

    def list(self) -> list[QuarantineEntry]:
        """Every readable entry. One whose meta.json is damaged is left out and named in
        ``self.damaged`` (its message stays on disk): it never hides the others."""
        self.damaged = []
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.iterdir()):
            if _ID.match(path.name) and (path / "meta.json").is_file():
                try:
                    out.append(self.show(path.name))
                except QuarantineError as exc:
                    self.damaged.append((path.name, exc.text))
        return out

    def show(self, entry_id: str) -> QuarantineEntry:
        path = self._dir(entry_id)
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except (OSError, ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
            raise QuarantineError(Text(f"隔離メール {entry_id} のメタデータ (meta.json) が読めません: {exc}",
                                       f"cannot read metadata (meta.json) of {entry_id}: {exc}")) from None
        return QuarantineEntry(entry_id, meta, path)

    def read(self, entry_id: str) -> bytes:
        entry = self.show(entry_id)
        raw = entry.message_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != entry.meta.get("sha256"):
            raise QuarantineError(Text(f"隔離メール {entry_id} が改変されています (sha256 不一致)",
                                       f"quarantined message {entry_id} was altered (sha256 mismatch)"))
        return raw

    def release(self, entry_id: str, deliver) -> None:
        """Hand the original bytes to ``deliver`` (a callable); only when it returns without
        raising is the entry removed."""
        raw = self.read(entry_id)
        deliver(raw)
        self.delete(entry_id)

    def delete(self, entry_id: str) -> None:
        path = self._dir(entry_id)
        trash = self.root / f".del-{entry_id}"
        os.rename(path, trash)
        shutil.rmtree(trash)
