"""Compressing sealed day files (I/O). Safe against a crash at any point: the gzip is
written to a temporary name, fsynced, renamed into place, and only then is the plain file
removed; leftovers of an interrupted run are cleaned up by the next one."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from datetime import date
from pathlib import Path

from .chain import is_seal
from .layout import GZIP_SUFFIX, GZIP_TEMP_SUFFIX, PLAIN_SUFFIX, STREAMS, day_files, stream_dir
from .reading import last_chained_record


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def gzip_file(path: Path) -> Path:
    """``x.jsonl`` -> ``x.jsonl.gz`` (then ``x.jsonl`` is removed). Returns the new path."""
    target = path.with_name(path.name + ".gz")
    temp = path.with_name(path.name + ".gz.tmp")
    with open(path, "rb") as source, open(temp, "wb") as raw:
        # mtime=0: the same content always gives the same bytes.
        with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, mtime=0) as packed:
            shutil.copyfileobj(source, packed, 1024 * 1024)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(temp, target)
    fsync_directory(path.parent)
    path.unlink()
    fsync_directory(path.parent)
    return target


def clean_leftovers(directory: Path, stream: str) -> list[Path]:
    """Remove half-written ``.gz.tmp`` files and plain files whose ``.gz`` is in place."""
    removed = []
    folder = stream_dir(directory, stream)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.endswith(GZIP_TEMP_SUFFIX):
            entry.unlink()
            removed.append(entry)
        elif entry.name.endswith(PLAIN_SUFFIX) and entry.with_name(entry.name + ".gz").exists():
            entry.unlink()
            removed.append(entry)
    return removed


def compress_sealed(directory: Path, before: date, skip: frozenset[Path] = frozenset(),
                    on_error: Callable[[str, Path, OSError], None] | None = None) -> list[Path]:
    """Gzip every plain day file older than ``before`` whose last record is its seal.
    Unsealed files are left alone: the writer seals them when it next opens the stream.
    A failure (e.g. disk full) leaves the plain file as it was, removes the partial gzip,
    is reported to ``on_error`` (or raised without one) and the other files carry on."""
    done = []
    for stream in STREAMS:
        for day_file in day_files(directory, stream):
            if day_file.compressed or day_file.day >= before or day_file.path in skip:
                continue
            try:
                last = last_chained_record(day_file.path)
                if last is not None and is_seal(last.record):
                    done.append(gzip_file(day_file.path))
            except OSError as exc:
                day_file.path.with_name(day_file.path.name + ".gz.tmp").unlink(missing_ok=True)
                if on_error is None:
                    raise
                on_error(stream, day_file.path, exc)
        clean_leftovers(directory, stream)
    return done


__all__ = ["compress_sealed", "gzip_file", "clean_leftovers", "fsync_directory", "GZIP_SUFFIX"]
