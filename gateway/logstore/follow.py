"""Following a stream as the gateway writes it, from another process (the console's live
view, issue #21): new records in chain order, resumable from any ``event.sequence``.

The writer (writer.py) appends whole lines with one ``write(2)`` each to the day file of the
UTC day, writes a seal record before it starts the next day's file, and gzips sealed files
later. A follower therefore keeps (day file, byte offset of the next unread line, last
sequence seen): it reads complete lines only (a line still being written is left for the
next poll), moves to the next day file only after reading the old one to its end again once
the new one exists (the seal is written before the new file is created), and reads a file
that was gzipped meanwhile through the decompressor from the same uncompressed offset.
The sequence is the identity of a record: a record at or below the last sequence is never
delivered twice, and a resume from sequence N starts in the newest file whose first record
is at or below N + 1, so nothing after N is skipped (unless retention removed it: then the
follower starts at the oldest file left and ``gap`` says so).

Memory: one line at a time plus the records of one ``poll`` (``limit``)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .chain import ChainedRecord, decode_chained
from .layout import DayFile, day_files
from .reading import open_day_file, read_tail


@dataclass
class _Position:
    day_file: DayFile
    offset: int          # uncompressed byte offset of the next unread line


def _first_sequence(path: Path) -> int | None:
    """The sequence of the first chained record of a day file (None: empty or unreadable)."""
    try:
        with open_day_file(path) as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    return None
                record = decode_chained(raw)
                if record is not None:
                    return record.seq
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return None


_SEQUENCE_KEY = b'"event.sequence":'


def _sequence_of(raw: bytes) -> int | None:
    """The line's ``event.sequence`` without parsing the JSON: the chain fields are written
    last (chain.encode_chained), and a key inside a value would have its quotes escaped, so
    the last unescaped occurrence is the real one. None when not found (then the line is
    decoded in full)."""
    at = raw.rfind(_SEQUENCE_KEY)
    if at < 0:
        return None
    start = at + len(_SEQUENCE_KEY)
    end = start
    while end < len(raw) and 48 <= raw[end] <= 57:
        end += 1
    return int(raw[start:end]) if end > start else None


class StreamFollower:
    """New chained records of one stream. ``after``: deliver records with a sequence above
    it; None: start at the current end of the stream (only records written from now on)."""

    def __init__(self, directory: Path, stream: str, after: int | None = None):
        self.directory = Path(directory)
        self.stream = stream
        self.position: int = 0 if after is None else max(0, after)   # last sequence seen
        self.gap = False          # records after ``after`` were purged before we could read them
        self._at: _Position | None = None
        self._wanted: Callable[[bytes], bool] | None = None
        self.unreadable_lines = 0
        if after is None:
            self._start_at_end()
        else:
            self._start_after(self.position)

    # -- positioning ----------------------------------------------------------------------

    def _start_at_end(self) -> None:
        files = day_files(self.directory, self.stream)
        if not files:
            return                      # no file yet: the first one is read from its start
        newest = files[-1]
        if newest.compressed:
            size = 0
            with open_day_file(newest.path) as handle:
                for raw in handle:
                    if raw.endswith(b"\n"):
                        record = decode_chained(raw)
                        if record is not None:
                            self.position = record.seq
                        size += len(raw)
            self._at = _Position(newest, size)
            return
        tail = read_tail(newest.path)
        for raw in reversed(tail.complete_lines):
            record = decode_chained(raw)
            if record is not None:
                self.position = record.seq
                break
        else:
            # No chained record in the tail: the head of the chain is in an older file.
            for older in reversed(files[:-1]):
                last = None
                with open_day_file(older.path) as handle:
                    for raw in handle:
                        record = decode_chained(raw) if raw.endswith(b"\n") else None
                        if record is not None:
                            last = record
                if last is not None:
                    self.position = last.seq
                    break
        self._at = _Position(newest, tail.fragment_offset)

    def _start_after(self, after: int) -> None:
        files = day_files(self.directory, self.stream)
        if not files:
            return
        target = after + 1
        chosen = None
        for day_file in reversed(files):
            first = _first_sequence(day_file.path)
            if first is not None and first <= target:
                chosen = day_file
                break
        if chosen is None:
            chosen = files[0]
            first = _first_sequence(chosen.path)
            self.gap = first is not None and first > target
        self._at = _Position(chosen, 0)

    # -- reading --------------------------------------------------------------------------

    def poll(self, limit: int = 1000, wanted: Callable[[bytes], bool] | None = None) -> list[ChainedRecord]:
        """Up to ``limit`` records after ``position``, oldest first; advances ``position``.
        ``wanted(line)``: a cheap test of the raw line; a line it refuses is passed over
        without being parsed (``position`` still moves past it)."""
        self._wanted = wanted
        out: list[ChainedRecord] = []
        while len(out) < limit:
            files = day_files(self.directory, self.stream)
            if self._at is None:
                if not files:
                    return out
                self._at = _Position(files[0], 0)
            current = self._refresh(files)
            if current is None:          # our file vanished (retention): go on with the next one
                later = [f for f in files if f.day > self._at.day_file.day]
                if not later:
                    return out
                self._at = _Position(later[0], 0)
                continue
            self._read(current, out, limit)
            if len(out) >= limit:
                return out
            later = [f for f in files if f.day > current.day]
            if not later:
                return out
            # The next day's file exists, so the writer sealed this one before creating it:
            # read to the end once more (the seal may have landed after our read), then move.
            self._read(self._refresh(day_files(self.directory, self.stream)) or current, out, limit)
            if len(out) >= limit:
                return out
            self._at = _Position(later[0], 0)
        return out

    def _refresh(self, files: list[DayFile]) -> DayFile | None:
        """Our day file as it is now (plain, or gzipped since we last read it)."""
        assert self._at is not None
        for day_file in files:
            if day_file.day == self._at.day_file.day:
                self._at.day_file = day_file
                return day_file
        return None

    def _read(self, day_file: DayFile, out: list[ChainedRecord], limit: int) -> None:
        assert self._at is not None
        offset = self._at.offset
        try:
            if day_file.compressed:
                handle = gzip.open(day_file.path, "rb")
                handle.seek(offset)                    # decompresses up to the offset
            else:
                handle = open(day_file.path, "rb")
                if os.fstat(handle.fileno()).st_size < offset:   # cannot shrink but by tampering
                    handle.close()
                    return
                handle.seek(offset)
        except (OSError, EOFError):
            return
        try:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break                              # still being written: next poll
                offset += len(raw)
                seq = _sequence_of(raw)
                if seq is not None and seq <= self.position:
                    continue                           # seen: skipped without parsing the line
                if seq is not None and self._wanted is not None and not self._wanted(raw):
                    self.position = seq                # not wanted: passed over unparsed
                    continue
                record = decode_chained(raw)
                if record is None:
                    self.unreadable_lines += 1
                    continue
                if record.seq <= self.position:
                    continue                           # already delivered (or a resume's earlier lines)
                self.position = record.seq
                out.append(record)
                if len(out) >= limit:
                    break
        except (OSError, EOFError, gzip.BadGzipFile):
            pass
        finally:
            handle.close()
            self._at.offset = offset
