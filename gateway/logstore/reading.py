"""Reading day files line by line, plain or gzipped, without loading them whole."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .chain import ChainedRecord, decode_chained

_TAIL_CHUNK = 64 * 1024


def open_day_file(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_raw_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset in the uncompressed content, raw bytes including
    the newline -- missing on a torn final line). Streams; memory stays bounded by the
    longest line."""
    offset = 0
    with open_day_file(path) as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, offset, raw
            offset += len(raw)


def last_chained_record(path: Path) -> ChainedRecord | None:
    """The last line of ``path`` that is a chained record (hash self-check not required).
    Plain files are read from the end; gzip has to be streamed through."""
    if path.name.endswith(".gz"):
        last = None
        for _n, _o, raw in iter_raw_lines(path):
            decoded = decode_chained(raw)
            if decoded is not None:
                last = decoded
        return last
    tail = read_tail(path)
    for raw in reversed(tail.complete_lines):
        decoded = decode_chained(raw)
        if decoded is not None:
            return decoded
    return None


class Tail:
    """The end of a plain file: its last complete lines and a torn fragment, if any."""

    def __init__(self, size: int, start: int, data: bytes):
        self.size = size
        cut = data.rfind(b"\n") + 1          # 0 when no newline at all
        self.fragment = data[cut:]           # bytes after the last newline (torn line)
        self.fragment_offset = start + cut
        lines = data[:cut].splitlines(keepends=True)
        # The first piece may be cut in the middle when we did not read from the start.
        self.complete_lines = lines if start == 0 else lines[1:]


def read_tail(path: Path, *, max_bytes: int = 64 * 1024 * 1024) -> Tail:
    """Read backwards in growing chunks until a complete chained record is found (or the
    start of the file, or ``max_bytes``)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        want = _TAIL_CHUNK
        while True:
            start = max(0, size - want)
            handle.seek(start)
            tail = Tail(size, start, handle.read(size - start))
            if (start == 0 or want >= max_bytes
                    or any(decode_chained(raw) is not None for raw in reversed(tail.complete_lines))):
                return tail
            want *= 4
