"""The log writer the proxy addons call on their hot path (I/O edge).

Durability contract of ``LogStore.append``:

* Each record is ONE ``write(2)`` of a complete line on an unbuffered ``O_APPEND`` file,
  done before ``append`` returns. After it returns the line is in the kernel's page cache:
  a ``kill -9`` of the gateway (or any crash of the Python process) loses nothing.
* Power loss / kernel crash is bounded by ``fsync``:
  ``"always"``  - fsync after every record (nothing acknowledged is lost; costs a disk
                  flush per record, milliseconds on most disks);
  ``"interval"``- fsync when ``fsync_interval`` seconds have passed since the last one
                  (at most that long of records lost, plus the record in flight);
  ``"rotate"``  - (default) fsync only when a file is sealed/closed; between, the kernel's
                  own writeback applies (Linux ``vm.dirty_expire_centisecs``, 30 s by
                  default), which we do not control.
* A write that fails (disk full, EIO, permission) is rolled back (the file is truncated
  to where the line started), counted in ``write_errors``, reported to
  ``on_write_error(stream, exc)``, and raised as ``LogWriteError`` so the caller applies
  its block-or-continue policy. The next append reopens the file and carries on.
* If the tail of a file is torn anyway (power loss, a write that could not be rolled
  back), the writer finds it when it opens the file: it ends the fragment with a newline
  and appends a ``log-recovered`` record that names the fragment's offset, length and
  SHA-256 and continues the chain from the last complete record. ``verify`` then reports
  it as an explained torn write, not as tampering.

Rotation: a record goes to the file of the UTC day the writer's clock says. When the day
changes, the next append (or ``rotate_if_needed``) writes a seal record to the old file,
fsyncs and closes it; ``rotate_if_needed`` then gzips sealed files. The chain continues
across days (see chain.py). ``append`` is thread-safe; ``rotate_if_needed`` may run in a
worker thread (its compression runs outside the lock) -- do that, or pass
``compress=False`` on the event loop: gzip costs ~0.35 s per 20,000 records.

Checkpoints (``anchor_dir``, see anchor.py and FIELDS.md): a background thread signs each
stream's chain head every ``checkpoint_records`` records or ``checkpoint_seconds`` seconds,
whichever comes first; the hot path only counts and, at the count, sets an event. Opening a
stream compares the disk with the last checkpoint (a ``log-anchor-mismatch`` record goes into
the chain when they disagree) and writes an ``open`` checkpoint at once (start-up, before
traffic: call ``open_streams``); ``close`` writes a ``close`` checkpoint of every stream.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from gateway.i18n import Text

from . import anchor as _anchor
from .chain import GENESIS, encode_chained, decode_chained, is_seal, recovery_record, seal_record
from .fields import format_timestamp, prepare_record
from .layout import STREAMS, DayFile, day_file_path, day_files
from .reading import last_chained_record, read_tail
from .redact import DEFAULT_REDACTION, RedactionRule
from .retention import purged_heads
from .rotation import compress_sealed, fsync_directory

FSYNC_MODES = ("always", "interval", "rotate")
CHECKPOINT_RECORDS = 1000
CHECKPOINT_SECONDS = 10.0

log = logging.getLogger("kanmon.logstore")


class WritableFile(Protocol):
    def write(self, data: bytes, /) -> int | None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


def _open_append(path: Path) -> WritableFile:
    return open(path, "ab", buffering=0)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LogWriteError(Exception):
    """A record could not be written. ``stream`` and ``cause`` say which and why."""

    def __init__(self, stream: str, cause: BaseException):
        self.stream = stream
        self.cause = cause
        self.text = Text(
            "ログ {stream} に書き込めません: {cause}",
            "cannot write to log {stream}: {cause}",
        ).format(stream=stream, cause=cause)
        super().__init__(self.text.en)


@dataclass
class _OpenFile:
    stream: str
    day: date
    path: Path
    handle: WritableFile
    size: int
    first_seq: int | None
    seq: int                 # sequence of the last record in the chain
    head: str                # event.hash of the last record in the chain
    last_fsync: float = field(default_factory=time.monotonic)


class LogStore:
    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], datetime] = _utc_now,
        on_write_error: Callable[[str, Exception], None] | None = None,
        fsync: str = "rotate",
        fsync_interval: float = 1.0,
        redaction: RedactionRule | None = DEFAULT_REDACTION,
        on_record: Callable[[str, str], None] | None = None,
        opener: Callable[[Path], WritableFile] = _open_append,
        anchor_dir: Path | None = None,
        checkpoint_records: int = CHECKPOINT_RECORDS,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        on_checkpoint: Callable[[str, str], None] | None = None,
    ):
        """``on_record(stream, json_line)`` is called after each successful write (e.g. a
        SyslogForwarder); its exceptions are counted in ``forward_errors``, never raised.
        ``opener`` opens a file for appending; tests inject failing files through it.
        ``anchor_dir`` (outside ``directory``): where signed checkpoints are kept;
        ``on_checkpoint(stream, json_line)`` receives each one (e.g. the SyslogForwarder)."""
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._on_write_error = on_write_error
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._redaction = redaction
        self._on_record = on_record
        self._opener = opener
        # RLock: on_write_error may itself log (e.g. to the audit stream) without deadlocking.
        self._lock = threading.RLock()
        self._open: dict[str, _OpenFile] = {}
        # Counters for metrics (kanmon_log_* in the lead's exporter).
        self.records_written = 0
        self.write_errors = 0
        self.forward_errors = 0
        self.recovered_tails = 0
        self.stripped_records = 0
        self.compress_errors = 0
        self.checkpoints_written = 0
        self.checkpoint_errors = 0
        self.anchor_mismatches = 0
        self._anchor = _anchor.AnchorStore(anchor_dir) if anchor_dir is not None else None
        self._anchor_key = self._anchor.load_or_create_key() if self._anchor is not None else None
        self._on_checkpoint = on_checkpoint
        self._checkpoint_records = max(1, checkpoint_records)
        self._checkpoint_seconds = checkpoint_seconds
        self._since_checkpoint = 0
        self._anchored: dict[str, int] = {}            # stream -> sequence of its newest checkpoint
        self._sealed: dict[str, _OpenFile] = {}        # stream -> file closed by rotation (its head)
        self._checkpoint_lock = threading.Lock()       # taken after (never while waiting for) _lock
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def writes_block(self) -> bool:
        """Does every append wait for the disk (``fsync: always``)? Then a caller on an event
        loop runs it in a worker thread (addons/accesslog.py); appends are thread-safe."""
        return self._fsync == "always"

    # ---- the hot path -------------------------------------------------------------------

    def append(self, stream: str, record: dict[str, Any]) -> None:
        if stream not in STREAMS:
            raise ValueError(f"unknown log stream {stream!r}; streams: {', '.join(STREAMS)}")
        now = self._clock()
        with self._lock:
            try:
                prepared = prepare_record(record, now, self._redaction)
                current = self._current(stream, now)
                line, digest = encode_chained(prepared, current.seq + 1, current.head)
                self._write(current, line)
                current.seq += 1
                current.head = digest
                if current.first_seq is None:
                    current.first_seq = current.seq
                self._after_write(current)
            except (OSError, ValueError, TypeError) as exc:
                self._fail(stream, exc)
            self.records_written += 1
            if "kanmon.stripped_fields" in prepared:
                self.stripped_records += 1
            if self._anchor is not None:
                self._since_checkpoint += 1
                if self._since_checkpoint >= self._checkpoint_records:
                    self._wake.set()
        if self._on_record is not None:
            try:
                self._on_record(stream, line[:-1].decode("utf-8"))
            except Exception:  # forwarding must never break logging
                self.forward_errors += 1

    def open_streams(self) -> None:
        """Open (and recover) every stream now rather than on its first append. Call it at
        start-up, before traffic: finding the chain head may mean reading a torn tail or
        decompressing the previous day's file, which should not delay a request."""
        now = self._clock()
        with self._lock:
            for stream in STREAMS:
                try:
                    self._current(stream, now)
                except (OSError, ValueError) as exc:
                    self._fail(stream, exc)

    def rotate_if_needed(self, *, compress: bool = True) -> list[Path]:
        """Seal and close every open file of a past UTC day; then (``compress``) gzip all
        sealed plain files of past days. Returns the files compressed. Raises
        LogWriteError (after trying every stream) if a seal could not be written."""
        now = self._clock()
        today = now.astimezone(UTC).date()
        failure: LogWriteError | None = None
        with self._lock:
            for stream, current in list(self._open.items()):
                if current.day < today:
                    del self._open[stream]
                    try:
                        self._seal(current, now)
                        self._sealed[stream] = current
                    except OSError as exc:
                        try:
                            self._fail(stream, exc)
                        except LogWriteError as err:
                            failure = failure or err
            skip = frozenset(c.path for c in self._open.values())
        done = compress_sealed(self.directory, before=today, skip=skip,
                               on_error=self._compress_failed) if compress else []
        if failure is not None:
            raise failure
        return done

    def _compress_failed(self, stream: str, path: Path, exc: OSError) -> None:
        # The sealed plain file is intact and is compressed on the next rotation.
        self.compress_errors += 1
        if self._on_write_error is not None:
            try:
                self._on_write_error(stream, exc)
            except Exception:
                pass

    def close(self) -> None:
        """fsync and close the open files (without sealing: the day is not over; a later
        append or a restart continues the same file). With an anchor, every stream gets a
        ``close`` checkpoint: records found after it at the next start were added while the
        gateway was stopped."""
        self._stop_checkpointer()
        with self._lock:
            for current in self._open.values():
                try:
                    os.fsync(current.handle.fileno())
                except OSError:
                    pass
            if self._anchor is not None:
                self._checkpoint_locked("close", force=True)
            for current in self._open.values():
                current.handle.close()
            self._open.clear()

    # ---- checkpoints (anchor.py) -----------------------------------------------------

    def checkpoint(self, reason: str = "interval", *, force: bool = False) -> int:
        """Sign and store the head of every stream that moved since its last checkpoint
        (every stream with ``force``). Returns how many were written. Thread-safe."""
        if self._anchor is None:
            return 0
        with self._lock:
            todo = self._snapshot(reason, force)
        return self._store_checkpoints(todo)

    def _checkpoint_locked(self, reason: str, force: bool, streams: tuple[str, ...] | None = None) -> int:
        return self._store_checkpoints(self._snapshot(reason, force, streams))

    def _snapshot(self, reason: str, force: bool, streams: tuple[str, ...] | None = None) -> list[_anchor.Checkpoint]:
        """Under ``_lock``: the checkpoints to write now."""
        self._since_checkpoint = 0
        self._wake.clear()          # with the count, so appends after this start a new round
        stamp = format_timestamp(self._clock())
        todo = []
        for stream in streams or STREAMS:
            current = self._open.get(stream) or self._sealed.get(stream)
            if current is None:
                continue
            if not force and self._anchored.get(stream) == current.seq:
                continue
            records = 0 if current.first_seq is None else current.seq - current.first_seq + 1
            todo.append(_anchor.Checkpoint(stream, current.path.name, records, current.seq, current.head,
                                           reason, stamp))
        return todo

    def _store_checkpoints(self, todo: list[_anchor.Checkpoint]) -> int:
        assert self._anchor is not None and self._anchor_key is not None
        written = 0
        with self._checkpoint_lock:
            for checkpoint in todo:
                if checkpoint.sequence < self._anchored.get(checkpoint.stream, -1):
                    continue                    # a newer one was stored meanwhile
                line = _anchor.sign(checkpoint, self._anchor_key)
                try:
                    self._sync_log_file(checkpoint)
                    self._anchor.write(checkpoint.stream, line)
                except OSError as exc:
                    self.checkpoint_errors += 1
                    log.error("cannot store the log checkpoint of %s: %s", checkpoint.stream, exc)
                    if self._on_write_error is not None:
                        try:
                            self._on_write_error(checkpoint.stream, exc)
                        except Exception:
                            pass
                    continue
                self._anchored[checkpoint.stream] = checkpoint.sequence
                self.checkpoints_written += 1
                written += 1
                if self._on_checkpoint is not None:
                    try:
                        self._on_checkpoint(checkpoint.stream, line)
                    except Exception:
                        self.forward_errors += 1
        return written

    def _sync_log_file(self, checkpoint: _anchor.Checkpoint) -> None:
        """The records a checkpoint names reach the disk before it does; otherwise a power
        loss could leave a durable checkpoint ahead of the log (a false "truncated"). By path,
        not by the writer's handle, which rotation may close meanwhile; a file already gone
        was sealed (fsynced) and compressed."""
        if not checkpoint.file:
            return
        try:
            fd = os.open(self.directory / checkpoint.stream / checkpoint.file, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _start_checkpointer(self) -> None:
        if self._anchor is None or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._checkpoint_loop, name="kanmon-log-checkpoint", daemon=True)
        self._thread.start()

    def _stop_checkpointer(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._wake.set()
            thread.join()

    def _checkpoint_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._checkpoint_seconds)
            if self._stopping.is_set():
                return
            try:
                self.checkpoint("interval")
            except Exception:        # never let the thread die: the next round retries
                self.checkpoint_errors += 1
                log.exception("log checkpoint failed")

    def _check_anchor(self, stream: str, opened: _OpenFile, now: datetime, found: tuple[int, str]) -> None:
        """First open of ``stream`` in this process: the disk (``found``: sequence and hash of
        its last record before this run wrote anything) must end where the last checkpoint
        says (or later, after a crash). A disagreement is written into the chain
        (``log-anchor-mismatch``, found by verify and forwarded) and logged; then an ``open``
        checkpoint anchors the head."""
        assert self._anchor is not None and self._anchor_key is not None
        found_seq, found_head = found
        raw = self._anchor.read_line(stream)
        problem: Text | None = None
        expected: _anchor.Checkpoint | None = None
        if raw is not None:
            try:
                expected = _anchor.parse_signed(raw, self._anchor_key.public_key(), stream)
            except _anchor.AnchorError as exc:
                problem = exc.text
        if expected is not None:
            if found_seq < expected.sequence:
                problem = Text(
                    f"ログは連番 {found_seq} で終わっていますが、最後のチェックポイント（{expected.at}、{expected.file}）は連番 "
                    f"{expected.sequence} まで記録しています: 停止中に末尾のレコードが削除されました",
                    f"the log ends at sequence {found_seq} but the last checkpoint ({expected.at}, {expected.file}) "
                    f"recorded sequence {expected.sequence}: records were removed while the gateway was stopped")
            elif found_seq == expected.sequence and found_head != expected.hash:
                problem = Text(
                    f"連番 {found_seq} のレコードのハッシュが最後のチェックポイント（{expected.at}）と異なります: 書き換えられています",
                    f"the record at sequence {found_seq} does not match the last checkpoint ({expected.at}): rewritten")
            elif found_seq > expected.sequence and expected.reason == "close":
                problem = Text(
                    f"正常停止時のチェックポイント（{expected.at}、連番 {expected.sequence}）の後にレコードが "
                    f"{found_seq - expected.sequence} 件追加されています: 停止中に追記されました",
                    f"{found_seq - expected.sequence} record(s) follow the checkpoint written at shutdown "
                    f"({expected.at}, sequence {expected.sequence}): appended while the gateway was stopped")
        if problem is not None:
            self.anchor_mismatches += 1
            log.error("log %s does not match its checkpoint: %s", stream, problem.en)
            record = {"@timestamp": format_timestamp(now), "event.dataset": "kanmon.log",
                      "event.action": _anchor.ACTION_ANCHOR_MISMATCH, "event.outcome": "failure",
                      "event.reason": problem.en, "kanmon.anchor.reason_ja": problem.ja,
                      "kanmon.anchor.found_sequence": found_seq, "kanmon.anchor.found_hash": found_head,
                      "kanmon.anchor.checkpoint_sequence": expected.sequence if expected else None,
                      "kanmon.anchor.checkpoint_hash": expected.hash if expected else None}
            line, digest = encode_chained(record, opened.seq + 1, opened.head)
            self._write(opened, line)
            opened.seq += 1
            opened.head = digest
            if opened.first_seq is None:
                opened.first_seq = opened.seq
            if self._on_record is not None:      # forwarded like any record (syslog, metrics)
                try:
                    self._on_record(stream, line[:-1].decode("utf-8"))
                except Exception:
                    self.forward_errors += 1
        self._checkpoint_locked("open", True, (stream,))

    def __enter__(self) -> "LogStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------

    def _fail(self, stream: str, exc: Exception) -> None:
        self.write_errors += 1
        if self._on_write_error is not None:
            try:
                self._on_write_error(stream, exc)
            except Exception:
                pass
        raise LogWriteError(stream, exc) from exc

    def _write(self, current: _OpenFile, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                n = current.handle.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError:
            self._abandon(current)
            raise
        current.size += len(data)

    def _abandon(self, current: _OpenFile) -> None:
        """After a failed write: cut off any partial line, forget the file (the next append
        reopens it through the recovery path, which copes if the cut failed)."""
        try:
            os.ftruncate(current.handle.fileno(), current.size)
        except (OSError, ValueError):
            pass
        try:
            current.handle.close()
        except OSError:
            pass
        if self._open.get(current.stream) is current:
            del self._open[current.stream]

    def _after_write(self, current: _OpenFile) -> None:
        if self._fsync == "always":
            os.fsync(current.handle.fileno())
        elif self._fsync == "interval":
            moment = time.monotonic()
            if moment - current.last_fsync >= self._fsync_interval:
                os.fsync(current.handle.fileno())
                current.last_fsync = moment

    def _current(self, stream: str, now: datetime) -> _OpenFile:
        day = now.astimezone(UTC).date()
        current = self._open.get(stream)
        if current is not None and day <= current.day:
            return current          # same day (or the clock stepped back: keep the file)
        if current is not None:
            del self._open[stream]
            self._seal(current, now)
            opened = self._create(stream, day, current.seq, current.head)
        else:
            check = self._anchor is not None and stream not in self._anchored
            # The head as the last run left it: _resume may add seal/recovery records first.
            found = self._chain_head(stream, day_files(self.directory, stream)) if check else None
            opened = self._resume(stream, day, now)
            self._sealed.pop(stream, None)
            self._open[stream] = opened
            if found is not None:
                self._check_anchor(stream, opened, now, found)
            self._start_checkpointer()
        self._open[stream] = opened
        return opened

    def _seal(self, current: _OpenFile, now: datetime) -> None:
        record = seal_record(format_timestamp(now), current.path.name, current.first_seq, current.seq)
        line, digest = encode_chained(record, current.seq + 1, current.head)
        self._write(current, line)
        current.seq += 1
        current.head = digest
        try:
            os.fsync(current.handle.fileno())
        finally:
            current.handle.close()

    def _create(self, stream: str, day: date, seq: int, head: str) -> _OpenFile:
        path = day_file_path(self.directory, stream, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = self._opener(path)
        try:
            fsync_directory(path.parent)
        except OSError:
            handle.close()
            raise
        return _OpenFile(stream, day, path, handle, os.fstat(handle.fileno()).st_size, None, seq, head)

    def _chain_head(self, stream: str, files: list[DayFile]) -> tuple[int, str]:
        for day_file in reversed(files):
            last = last_chained_record(day_file.path)
            if last is not None:
                return last.seq, last.hash
        return purged_heads(self.directory).get(stream, (0, GENESIS))

    def _resume(self, stream: str, day: date, now: datetime) -> _OpenFile:
        """First append to ``stream`` since start: seal files a crash left unsealed, then
        continue today's file or start it, chaining from the newest record on disk."""
        files = day_files(self.directory, stream)
        if files and files[-1].day > day:
            day = files[-1].day     # clock behind the newest file: never write into the past
        for index, day_file in enumerate(files):
            if day_file.day < day and not day_file.compressed:
                last = last_chained_record(day_file.path)
                if last is None or not is_seal(last.record):
                    seq, head = self._chain_head(stream, files[:index])
                    self._seal(self._adopt(day_file, seq, head, now), now)
        older = [f for f in files if f.day < day]
        newest = files[-1] if files and files[-1].day == day else None
        if newest is not None:
            last = None if newest.compressed else last_chained_record(newest.path)
            if last is None or not is_seal(last.record):
                if not newest.compressed:
                    seq, head = self._chain_head(stream, older)
                    return self._adopt(newest, seq, head, now)
            day += timedelta(days=1)        # that day is already sealed: continue in the next
            older = files
        seq, head = self._chain_head(stream, older)
        return self._create(stream, day, seq, head)

    def _adopt(self, day_file: DayFile, seq: int, head: str, now: datetime) -> _OpenFile:
        """Open an existing unsealed plain file for appending, marking a torn tail."""
        tail = read_tail(day_file.path)
        first_seq = None
        for raw in reversed(tail.complete_lines):
            last = decode_chained(raw)
            if last is not None:
                seq, head = last.seq, last.hash
                with open(day_file.path, "rb") as handle:
                    first = decode_chained(handle.readline())
                first_seq = first.seq if first is not None else None
                break
        handle = self._opener(day_file.path)
        current = _OpenFile(day_file.stream, day_file.day, day_file.path, handle,
                            os.fstat(handle.fileno()).st_size, first_seq, seq, head)
        if tail.fragment:
            self._write(current, b"\n")
            record = recovery_record(format_timestamp(now), tail.fragment_offset, tail.fragment,
                                     "torn-final-line")
            line, digest = encode_chained(record, seq + 1, head)
            self._write(current, line)
            current.seq += 1
            current.head = digest
            if current.first_seq is None:
                current.first_seq = current.seq
            os.fsync(handle.fileno())
            self.recovered_tails += 1
        return current
