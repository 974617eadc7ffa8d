"""Signed checkpoints that anchor each stream's chain head outside its log files.

A hash chain proves the order and content of the records it holds, not where it ends:
deleting or emptying the newest file, cutting it at a record boundary or appending a record
with a valid hash all leave a consistent chain. So the writer periodically signs a
*checkpoint* per stream -- stream, day file, records in that file, last sequence, last hash
-- with an Ed25519 key kept in the state directory apart from the log directory
(``<state>/log-anchor/``), keeps the newest one per stream there, and hands it to syslog
forwarding (a copy off the machine). ``verify`` compares the end of each chain with it.

What it protects against and what not: FIELDS.md, "Checkpoints".

Ed25519 rather than HMAC: verifying needs only the public key, so a SIEM or an auditor can
check forwarded checkpoints without being able to make new ones. ``cryptography`` is
already pinned.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.i18n import Text

ANCHOR_SUBDIR = "log-anchor"          # under the state directory, beside (not inside) logs/
PRIVATE_KEY_FILE = "checkpoint-key.pem"
PUBLIC_KEY_FILE = "checkpoint-key.pub.pem"
ACTION_CHECKPOINT = "log-checkpoint"
ACTION_ANCHOR_MISMATCH = "log-anchor-mismatch"   # chained record: the disk did not match at start

STREAM = "kanmon.checkpoint.stream"
FILE = "kanmon.checkpoint.file"
RECORDS = "kanmon.checkpoint.records"
SEQUENCE = "kanmon.checkpoint.sequence"
HASH = "kanmon.checkpoint.hash"
REASON = "kanmon.checkpoint.reason"      # open | interval | close
KEY_ID = "kanmon.checkpoint.key"
SIGNATURE = "kanmon.checkpoint.signature"

REASONS = ("open", "interval", "close")


class AnchorError(Exception):
    def __init__(self, text: Text):
        self.text = text
        super().__init__(text.en)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    stream: str
    file: str            # plain day-file name holding the last record ("" before the first)
    records: int         # chained records (seal included) in that file up to `sequence`
    sequence: int        # last sequence of the stream's chain (0: no record yet)
    hash: str            # event.hash of that record (GENESIS when none)
    reason: str
    at: str              # writer's clock, UTC ISO 8601

    def fields(self) -> dict[str, Any]:
        return {"@timestamp": self.at, "event.dataset": "kanmon.log", "event.action": ACTION_CHECKPOINT,
                STREAM: self.stream, FILE: self.file, RECORDS: self.records, SEQUENCE: self.sequence,
                HASH: self.hash, REASON: self.reason}


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> str:
    """The checkpoint as one JSON line (no newline), signed over its canonical form."""
    fields = checkpoint.fields()
    fields[KEY_ID] = key_id(key.public_key())
    fields[SIGNATURE] = base64.b64encode(key.sign(_canonical(fields))).decode("ascii")
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def parse_signed(line: str | bytes, public: Ed25519PublicKey, stream: str | None = None) -> Checkpoint:
    """The checkpoint of a signed line; AnchorError when it is not one, the signature fails
    or (``stream`` given) it is another stream's checkpoint."""
    bad = Text("チェックポイントが壊れているか署名が一致しません（偽造または破損）",
               "the checkpoint is damaged or its signature does not verify (forged or corrupt)")
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):
        raise AnchorError(bad) from None
    if not isinstance(fields, dict) or not isinstance(fields.get(SIGNATURE), str):
        raise AnchorError(bad)
    signature = fields.pop(SIGNATURE)
    try:
        public.verify(base64.b64decode(signature, validate=True), _canonical(fields))
    except (InvalidSignature, ValueError):
        raise AnchorError(bad) from None
    try:
        checkpoint = Checkpoint(stream=fields[STREAM], file=fields[FILE], records=fields[RECORDS],
                                sequence=fields[SEQUENCE], hash=fields[HASH], reason=fields[REASON],
                                at=fields["@timestamp"])
    except KeyError:
        raise AnchorError(bad) from None
    if not (isinstance(checkpoint.sequence, int) and isinstance(checkpoint.records, int)
            and isinstance(checkpoint.hash, str) and isinstance(checkpoint.file, str)):
        raise AnchorError(bad)
    if stream is not None and checkpoint.stream != stream:
        raise AnchorError(Text(f"チェックポイントは別のストリーム ({checkpoint.stream}) のものです（差し替えられています）",
                               f"the checkpoint belongs to another stream ({checkpoint.stream}): it was swapped"))
    return checkpoint


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class AnchorStore:
    """``<anchor>/`` holds the signing key pair and ``<stream>.checkpoint`` (the newest signed
    checkpoint of each stream, replaced atomically)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    @property
    def private_key_path(self) -> Path:
        return self.directory / PRIVATE_KEY_FILE

    @property
    def public_key_path(self) -> Path:
        return self.directory / PUBLIC_KEY_FILE

    def checkpoint_path(self, stream: str) -> Path:
        return self.directory / f"{stream}.checkpoint"

    def load_or_create_key(self) -> Ed25519PrivateKey:
        """The writer's signing key, created (0600, directory 0700) on first use. A key file
        that exists but does not load is refused (AnchorError), never silently replaced: a new
        key would make every earlier checkpoint unverifiable."""
        path = self.private_key_path
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except FileNotFoundError:
                key = Ed25519PrivateKey.generate()
                _write_atomic(path, key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
        except (ValueError, TypeError, OSError) as exc:
            raise AnchorError(Text(f"ログのチェックポイント署名鍵 {path} を使えません: {exc}(壊れた鍵は別の場所へ移してください)",
                                   f"cannot use the log checkpoint signing key {path}: {exc} (move a damaged key "
                                   "aside; a new one is then created)")) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AnchorError(Text(f"{path} は Ed25519 鍵ではありません", f"{path} is not an Ed25519 key"))
        public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            current = self.public_key_path.read_bytes()
        except FileNotFoundError:
            current = b""
        if current != public:
            _write_atomic(self.public_key_path, public, 0o644)
        return key

    def public_key(self) -> Ed25519PublicKey | None:
        """The verification key, None when the directory has none (never anchored)."""
        try:
            data = self.public_key_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise AnchorError(Text(f"検証鍵 {self.public_key_path} を読めません: {exc}",
                                   f"cannot read the verification key {self.public_key_path}: {exc}")) from None
        if not isinstance(key, Ed25519PublicKey):
            raise AnchorError(Text(f"検証鍵 {self.public_key_path} は Ed25519 鍵ではありません",
                                   f"the verification key {self.public_key_path} is not an Ed25519 key"))
        return key

    def write(self, stream: str, line: str) -> None:
        _write_atomic(self.checkpoint_path(stream), line.encode("utf-8") + b"\n", 0o600)

    def read_line(self, stream: str) -> bytes | None:
        try:
            return self.checkpoint_path(stream).read_bytes()
        except FileNotFoundError:
            return None
