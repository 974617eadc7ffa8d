"""Checking the hash chains of a log directory (reads files; findings are plain data).

For every stream, files are read oldest first and each line is checked:

* its own ``event.hash`` against its bytes          -> ``edited``
* its sequence against the one expected             -> ``deleted`` (gap), ``reordered``,
                                                       ``inserted`` (sequence reused)
* its ``kanmon.prev_hash`` against the previous record -> ``chain-broken``
* lines that are not chained records                -> ``unparseable``, unless the writer's
  ``log-recovered`` record right after explains them as a torn write (``torn-recovered``,
  a notice, not tampering)
* day files other than the newest must end with their seal -> ``unsealed`` (truncated tail)
* a gap in sequence at the first line of a file     -> ``deleted`` (a whole day file gone)
* the chain must start at sequence 1 from GENESIS, or from a head retention recorded in
  purged.jsonl                                      -> ``chain-start-missing``

With an anchor directory (signed checkpoints, anchor.py), each stream's end is compared with
its newest checkpoint, read *before* the files so a concurrent writer cannot make it look
ahead of them:

* the checkpoint's file is gone                       -> ``anchor-file-deleted``
* the chain ends before the checkpoint's sequence     -> ``anchor-truncated`` (emptied or cut)
* the record at that sequence has another hash        -> ``anchor-mismatch`` (rewritten)
* records after a checkpoint written at shutdown      -> ``anchor-extended``
* records after an interval checkpoint                -> ``unanchored-tail`` (in ``notes``: the
  normal state of a running or crashed writer, not a finding)
* checkpoint missing or its signature fails           -> ``checkpoint-missing`` / ``checkpoint-invalid``
* a ``log-anchor-mismatch`` record (the writer found the disk disagreeing with the checkpoint
  when it started)                                    -> ``anchor-mismatch-at-start``

Every finding names the file and the line. ``tamper`` is False only for notices.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from gateway.i18n import Text

from . import anchor as _anchor
from .chain import (GENESIS, RECOVERY_OFFSET, RECOVERY_SHA256, SEAL_FILE, SEAL_FIRST, SEAL_RECORDS,
                    ChainedRecord, decode_chained, is_recovery, is_seal)
from .layout import GZIP_TEMP_SUFFIX, STREAMS, DayFile, day_files, parse_day_file_name, stream_dir
from .reading import iter_raw_lines
from .retention import purged_hashes

_RECENT = 4096          # recent hashes remembered to explain out-of-order records
_MAX_GAP = 100_000      # larger gaps are reported but not tracked for reordering


@dataclass(frozen=True)
class Finding:
    kind: str
    path: Path
    line: int | None
    detail: Text
    tamper: bool = True

    def render(self, lang: str | None = None) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.kind}: {self.detail.render(lang)}"


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    records: int = 0
    anchored: bool = False      # the ends were compared with signed checkpoints
    notes: list[Finding] = field(default_factory=list)   # state worth knowing, not a finding

    @property
    def tampered(self) -> bool:
        return any(f.tamper for f in self.findings)


class _StreamCheck:
    def __init__(self, stream: str, starts: set[str], report: VerifyReport):
        self.stream = stream
        self.starts = starts
        self.report = report
        self.findings: list[Finding | None] = []
        self.expected_seq: int | None = None
        self.expected_prev: str | None = None
        self.gaps: dict[int, int] = {}           # missing sequence -> index of its finding
        self.gap_left: dict[int, int] = {}       # finding index -> sequences still missing
        self.recent: OrderedDict[str, tuple[int, Path, int]] = OrderedDict()
        self.watch_seq: int | None = None        # the sequence a checkpoint names
        self.watched: tuple[str, Path, int] | None = None

    def add(self, kind: str, path: Path, line: int | None, detail: Text, tamper: bool = True) -> int:
        self.findings.append(Finding(kind, path, line, detail, tamper))
        return len(self.findings) - 1

    def check_file(self, day_file: DayFile, newest: bool) -> None:
        path = day_file.path
        self.report.files += 1
        first_seq: int | None = None
        count = 0
        sealed_at: int | None = None
        pending: list[tuple[int, int, bytes]] = []
        last_line = 0
        try:
            for number, offset, raw in iter_raw_lines(path):
                last_line = number
                decoded = decode_chained(raw)
                if decoded is None:
                    pending.append((number, offset, raw))
                    continue
                self.report.records += 1
                if pending:
                    self._explain(pending, decoded, path)
                    pending = []
                if sealed_at is not None:
                    self.add("inserted", path, number, Text(
                        f"封印（{sealed_at} 行目）の後にレコードがあります",
                        f"record after the file's seal (line {sealed_at})"))
                self._check_record(decoded, path, number)
                if decoded.seq == self.watch_seq and decoded.hash_ok:
                    self.watched = (decoded.hash, path, number)
                if decoded.record.get("event.action") == _anchor.ACTION_ANCHOR_MISMATCH \
                        and decoded.record.get("event.dataset") == "kanmon.log":
                    self.add("anchor-mismatch-at-start", path, number, Text(
                        f"起動時にログがチェックポイントと一致しませんでした: {decoded.record.get('kanmon.anchor.reason_ja')}",
                        f"at start-up the log did not match its checkpoint: {decoded.record.get('event.reason')}"))
                if is_seal(decoded.record):
                    sealed_at = number
                    self._check_seal(decoded, day_file, first_seq, count, number)
                else:
                    if first_seq is None:
                        first_seq = decoded.seq
                    count += 1
        except (EOFError, OSError, zlib.error) as exc:
            self.add("truncated", path, last_line + 1, Text(
                f"圧縮ファイルが {last_line} 行目の後で切り詰められているか壊れています（{exc}）",
                f"compressed file is truncated or corrupt after line {last_line} ({exc})"))
            return
        for number, offset, raw in pending:
            if (newest and not day_file.compressed and sealed_at is None
                    and not raw.endswith(b"\n") and number == last_line):
                self.add("torn-open", path, number, Text(
                    "最終行が不完全です（書き込み中にクラッシュ）。次回の書き込み開始時に記録されます",
                    "final line is incomplete (crash during a write); the writer marks it when it reopens the file"),
                    tamper=False)
            else:
                self.add("unparseable", path, number, Text(
                    "ハッシュチェーンのレコードではない行です（改ざんまたは破損）",
                    "line is not a chained record (tampered or damaged)"))
        if sealed_at is None and (day_file.compressed or not newest):
            self.add("unsealed", path, last_line or None, Text(
                "封印レコードがありません: ファイル末尾が切り詰められています",
                "file has no seal record: its tail was truncated (or the file was never rotated)"))

    def _explain(self, pending: list[tuple[int, int, bytes]], decoded: ChainedRecord, path: Path) -> None:
        record = decoded.record
        for number, offset, raw in pending:
            fragment = raw[:-1] if raw.endswith(b"\n") else raw
            if (is_recovery(record) and decoded.hash_ok and record.get(RECOVERY_OFFSET) == offset
                    and record.get(RECOVERY_SHA256) == hashlib.sha256(fragment).hexdigest()):
                self.add("torn-recovered", path, number, Text(
                    "書き込み途中で途切れた行（クラッシュ）。次の行で回復が記録されています",
                    "torn write (crash during a write); recovery is recorded on the next line"),
                    tamper=False)
            else:
                self.add("unparseable", path, number, Text(
                    "ハッシュチェーンのレコードではない行です（改ざんまたは破損）",
                    "line is not a chained record (tampered or damaged)"))

    def _check_record(self, decoded: ChainedRecord, path: Path, number: int) -> None:
        seq, prev = decoded.seq, decoded.prev_hash
        if not decoded.hash_ok:
            self.add("edited", path, number, Text(
                f"レコード（連番 {seq}）の内容が自身のハッシュと一致しません: 書き込み後に変更されています",
                f"record (sequence {seq}) does not match its own hash: changed after it was written"))
        skip_update = False
        if self.expected_seq is None:
            if not ((seq == 1 and prev == GENESIS) or prev in self.starts):
                self.add("chain-start-missing", path, number, Text(
                    f"チェーンが連番 {seq} から始まっています: それより前のレコード（またはファイル）が削除されています",
                    f"chain starts at sequence {seq}: earlier records (or whole files) were removed "
                    "without a retention purge record"))
        elif seq > self.expected_seq:
            first, last = self.expected_seq, seq - 1
            whole = Text("（日ファイルごと削除された可能性があります）", " (a whole day file may have been removed)") \
                if number == 1 else Text("", "")
            index = self.add("deleted", path, number, Text(
                f"連番 {first}〜{last} のレコード（{last - first + 1} 件）がこの行の前から削除されています{whole.ja}",
                f"{last - first + 1} record(s) with sequence {first}-{last} are missing before this line{whole.en}"))
            if last - first < _MAX_GAP:
                for missing in range(first, last + 1):
                    self.gaps[missing] = index
                self.gap_left[index] = last - first + 1
        elif seq < self.expected_seq:
            if seq in self.gaps:
                index = self.gaps.pop(seq)
                self.gap_left[index] -= 1
                if self.gap_left[index] == 0:
                    self.findings[index] = None       # every "missing" record turned up later
                self.add("reordered", path, number, Text(
                    f"レコード（連番 {seq}）の位置が入れ替えられています（連番 {self.expected_seq - 1} の後にあります）",
                    f"record (sequence {seq}) is out of order: it comes after sequence {self.expected_seq - 1}"))
            else:
                self.add("inserted", path, number, Text(
                    f"連番 {seq} は既に使われています: 挿入または複製されたレコードです",
                    f"sequence {seq} was already used: inserted or duplicated record"))
                skip_update = True
        elif prev != self.expected_prev:
            earlier = self.recent.get(prev)
            if earlier is not None:
                self.add("reordered", path, number, Text(
                    f"前レコードのハッシュが直前の行ではなく連番 {earlier[0]}（{earlier[1].name}:{earlier[2]}）を指しています: 順序が変更されています",
                    f"previous-hash points to sequence {earlier[0]} ({earlier[1].name}:{earlier[2]}), "
                    "not to the record before it: records were reordered"))
            else:
                self.add("chain-broken", path, number, Text(
                    "前レコードのハッシュが直前のレコードと一致しません: 直前のレコードが置き換えられています",
                    "previous-hash does not match the record before it: that record was replaced"))
        if skip_update:
            return
        self.expected_seq = seq + 1 if self.expected_seq is None else max(self.expected_seq, seq + 1)
        self.expected_prev = decoded.hash
        self.recent[decoded.hash] = (seq, path, number)
        if len(self.recent) > _RECENT:
            self.recent.popitem(last=False)

    def _check_seal(self, decoded: ChainedRecord, day_file: DayFile, first_seq: int | None,
                    count: int, number: int) -> None:
        record = decoded.record
        problems = []
        if record.get(SEAL_FILE) != day_file.plain_name:
            problems.append(f"{SEAL_FILE}={record.get(SEAL_FILE)!r}")
        if record.get(SEAL_RECORDS) != count:
            problems.append(f"{SEAL_RECORDS}={record.get(SEAL_RECORDS)!r} (counted {count})")
        if first_seq is not None and record.get(SEAL_FIRST) != first_seq:
            problems.append(f"{SEAL_FIRST}={record.get(SEAL_FIRST)!r} (found {first_seq})")
        if problems:
            joined = ", ".join(problems)
            self.add("seal-mismatch", day_file.path, number, Text(
                f"封印がファイル内容と一致しません: {joined}",
                f"seal does not match the file: {joined}"))


def _read_checkpoints(anchor_dir: Path, streams: tuple[str, ...]
                      ) -> dict[str, _anchor.Checkpoint | Text | None] | None:
    """stream -> its newest checkpoint, the reason it cannot be trusted, or None (none
    stored). None when the directory holds no verification key (nothing was anchored)."""
    store = _anchor.AnchorStore(anchor_dir)
    try:
        public = store.public_key()
    except _anchor.AnchorError as exc:
        return {stream: exc.text for stream in streams}
    if public is None:
        return None
    found: dict[str, _anchor.Checkpoint | Text | None] = {}
    for stream in streams:
        raw = store.read_line(stream)
        if raw is None:
            found[stream] = None
            continue
        try:
            found[stream] = _anchor.parse_signed(raw, public, stream)
        except _anchor.AnchorError as exc:
            found[stream] = exc.text
    return found


def _compare_with_checkpoint(check: _StreamCheck, directory: Path, anchor_dir: Path,
                             checkpoint: _anchor.Checkpoint | Text | None) -> None:
    last_seq = 0 if check.expected_seq is None else check.expected_seq - 1
    where = anchor_dir / f"{check.stream}.checkpoint"
    if isinstance(checkpoint, Text):
        check.add("checkpoint-invalid", where, None, checkpoint)
        return
    if checkpoint is None:
        if last_seq:
            check.add("checkpoint-missing", where, None, Text(
                f"ストリーム {check.stream} にはレコードがありますがチェックポイントがありません（削除された可能性）",
                f"stream {check.stream} has records but no checkpoint in {anchor_dir} (removed?)"))
        return
    cp = checkpoint
    named = stream_dir(directory, check.stream) / cp.file
    said = Text(f"最新のチェックポイント（{cp.at}）は {cp.file} に {cp.records} 件、連番 {cp.sequence} までを記録しています",
                f"the newest checkpoint ({cp.at}) records {cp.records} record(s) in {cp.file} up to sequence {cp.sequence}")
    if cp.sequence > last_seq:
        gone = cp.file and not named.exists() and not named.with_name(named.name + ".gz").exists()
        if gone:
            check.add("anchor-file-deleted", named, None, Text(
                f"{said.ja}。そのファイルがありません: 削除されています", f"{said.en}; that file is gone: it was deleted"))
        else:
            empty = named.exists() and named.stat().st_size == 0
            check.add("anchor-truncated", named, None, Text(
                f"{said.ja}。ログは連番 {last_seq} で終わっています: 末尾の {cp.sequence - last_seq} 件が削除されています"
                + ("（ファイルが空にされています）" if empty else ""),
                f"{said.en}; the log ends at sequence {last_seq}: the last {cp.sequence - last_seq} record(s) "
                "were removed" + (" (the file was emptied)" if empty else "")))
        return
    if cp.sequence > 0 and (check.watched is None or check.watched[0] != cp.hash):
        line = check.watched[2] if check.watched else None
        path = check.watched[1] if check.watched else named
        check.add("anchor-mismatch", path, line, Text(
            f"{said.ja}。連番 {cp.sequence} のレコードのハッシュが一致しません: チェーンが書き換えられています",
            f"{said.en}; the record at sequence {cp.sequence} does not have that hash: the chain was rewritten"))
        return
    if last_seq > cp.sequence:
        extra = last_seq - cp.sequence
        if cp.reason == "close":
            check.add("anchor-extended", named, None, Text(
                f"{said.ja}(正常停止時)。その後に {extra} 件のレコードがあります: 停止後に追記されています",
                f"{said.en} (written at shutdown); {extra} record(s) follow it: appended after the gateway stopped"))
        else:
            check.report.notes.append(Finding("unanchored-tail", named, None, Text(
                f"最新の {extra} 件は最後のチェックポイント（{cp.at}、連番 {cp.sequence}）の後に書かれ、まだ固定されていません",
                f"the newest {extra} record(s) were written after the last checkpoint ({cp.at}, sequence "
                f"{cp.sequence}) and are not anchored yet"), tamper=False))


def verify(directory: Path, streams: tuple[str, ...] = STREAMS, *, anchor_dir: Path | None = None) -> VerifyReport:
    """``anchor_dir``: compare each stream's end with its newest signed checkpoint (read
    first). Without one, or when it holds no key, the ends are not checked."""
    directory = Path(directory)
    report = VerifyReport()
    checkpoints = _read_checkpoints(Path(anchor_dir), streams) if anchor_dir is not None else None
    report.anchored = checkpoints is not None
    starts = purged_hashes(directory)
    for stream in streams:
        check = _StreamCheck(stream, starts.get(stream, set()), report)
        checkpoint = checkpoints.get(stream) if checkpoints is not None else None
        if isinstance(checkpoint, _anchor.Checkpoint):
            check.watch_seq = checkpoint.sequence
        files = day_files(directory, stream)
        for index, day_file in enumerate(files):
            check.check_file(day_file, newest=index == len(files) - 1)
        if checkpoints is not None:
            _compare_with_checkpoint(check, directory, Path(anchor_dir), checkpoint)  # type: ignore[arg-type]
        folder = stream_dir(directory, stream)
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if parse_day_file_name(entry.name) is None and not entry.name.endswith(GZIP_TEMP_SUFFIX):
                    check.add("unexpected-file", entry, None, Text(
                        "ログのファイル名の形式ではないファイルがあります（名前が変更された可能性）",
                        "file does not have a day-file name (renamed?)"), tamper=False)
        report.findings.extend(f for f in check.findings if f is not None)
    return report
