"""The hash chain that makes every stream tamper-evident (pure, no I/O).

Each line is a JSON object that ends with its own hash::

    {...fields..., "event.sequence": 42, "kanmon.prev_hash": "<hash of line 41>",
     "event.hash": "<sha256 of this line without the event.hash member>"}

``event.hash`` = SHA-256 of the exact bytes of the line with the trailing
``,"event.hash":"..."`` member removed. Hashing the bytes as written (not a re-serialised
object) means verification never depends on JSON formatting and any byte changed is seen.
``kanmon.prev_hash`` is the previous record's ``event.hash``; ``event.sequence`` counts up
by one per record. The chain runs per stream **across days**: the first record of a day
file continues from the seal record that ends the previous day file. The first record of
a stream has sequence 1 and ``prev_hash`` GENESIS.

What this proves and what not: any edit, deletion, insertion or reordering of records is
detected unless the person who did it also recomputed every later hash. SHA-256 is not
keyed, so someone with write access to the files *and* the will to rewrite the chain is
caught only by comparing chain heads with a copy kept elsewhere -- forward records (seals
included) to a SIEM via syslog for that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .fields import HASH, PREV_HASH, SEQUENCE, json_default

GENESIS = "0" * 64
_HASH_MEMBER = b',"' + HASH.encode() + b'":"'
_SUFFIX_LEN = len(_HASH_MEMBER) + 64 + 2          # member + 64 hex digits + '"}'
_HEX = frozenset(b"0123456789abcdef")


def encode_chained(record: dict[str, Any], seq: int, prev_hash: str) -> tuple[bytes, str]:
    """The line to write (with its newline) and its hash. ``record`` must not hold the
    chain fields (fields.prepare_record removes them) and is modified in place."""
    record[SEQUENCE] = seq
    record[PREV_HASH] = prev_hash
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"),
                      default=json_default, allow_nan=False).encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + _HASH_MEMBER + digest.encode("ascii") + b'"}\n', digest


@dataclass(frozen=True, slots=True)
class ChainedRecord:
    record: dict[str, Any]
    seq: int
    prev_hash: str
    hash: str
    hash_ok: bool          # False: the line's bytes do not match its own event.hash


def decode_chained(raw: bytes) -> ChainedRecord | None:
    """Parse one line (with or without its newline). None when it is not a chained record
    at all (torn, garbage, not JSON, chain fields missing)."""
    line = raw[:-1] if raw.endswith(b"\n") else raw
    if len(line) <= _SUFFIX_LEN or not line.endswith(b'"}'):
        return None
    if line[-_SUFFIX_LEN:-66] != _HASH_MEMBER:
        return None
    claimed = line[-66:-2]
    if not _HEX.issuperset(claimed):
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):     # RecursionError: nested too deep (hostile line)
        return None
    if not isinstance(record, dict):
        return None
    seq, prev = record.get(SEQUENCE), record.get(PREV_HASH)
    if not isinstance(seq, int) or not isinstance(prev, str) or record.get(HASH) != claimed.decode():
        return None
    body = line[:-_SUFFIX_LEN] + b"}"
    ok = hashlib.sha256(body).hexdigest().encode("ascii") == claimed
    return ChainedRecord(record, seq, prev, claimed.decode("ascii"), ok)


# Records the writer itself adds to the chain.
ACTION_SEALED = "log-sealed"          # last line of a rotated day file
ACTION_RECOVERED = "log-recovered"    # written after a torn final line found on open
SEAL_FILE = "kanmon.seal.file"
SEAL_FIRST = "kanmon.seal.first_sequence"
SEAL_LAST = "kanmon.seal.last_sequence"
SEAL_RECORDS = "kanmon.seal.records"
RECOVERY_OFFSET = "kanmon.recovery.offset"
RECOVERY_LENGTH = "kanmon.recovery.length"
RECOVERY_SHA256 = "kanmon.recovery.sha256"


def is_seal(record: dict[str, Any]) -> bool:
    return record.get("event.action") == ACTION_SEALED and record.get("event.dataset") == "kanmon.log"


def is_recovery(record: dict[str, Any]) -> bool:
    return record.get("event.action") == ACTION_RECOVERED and record.get("event.dataset") == "kanmon.log"


def seal_record(timestamp: str, file_name: str, first_seq: int | None, last_seq: int) -> dict[str, Any]:
    first = first_seq if first_seq is not None else last_seq + 1
    return {
        "@timestamp": timestamp,
        "event.dataset": "kanmon.log",
        "event.action": ACTION_SEALED,
        "event.outcome": "success",
        SEAL_FILE: file_name,
        SEAL_FIRST: first,
        SEAL_LAST: last_seq,
        SEAL_RECORDS: max(0, last_seq - first + 1),
    }


def recovery_record(timestamp: str, offset: int, fragment: bytes, reason: str) -> dict[str, Any]:
    return {
        "@timestamp": timestamp,
        "event.dataset": "kanmon.log",
        "event.action": ACTION_RECOVERED,
        "event.outcome": "success",
        "event.reason": reason,
        RECOVERY_OFFSET: offset,
        RECOVERY_LENGTH: len(fragment),
        RECOVERY_SHA256: hashlib.sha256(fragment).hexdigest(),
    }
