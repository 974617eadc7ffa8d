"""Undo a response's Content-Encoding with a ceiling on the output (pure). mitmproxy's own
decoder inflates without a limit: a 2 MiB gzip of zeros would become gigabytes in the gateway's
memory, so the download scanner decodes here instead, stopping one byte past ``limit``. The
codecs are the ones mitmproxy itself uses (zlib, brotli, zstandard: its own dependencies)."""

from __future__ import annotations

import zlib
from io import BytesIO

import brotli
import zstandard


class TooLarge(Exception):
    """The decoded body is longer than the limit."""


class Undecodable(Exception):
    """Unknown coding or corrupt data."""


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise TooLarge
    return out + d.flush()


def _one(data: bytes, coding: str, limit: int) -> bytes:
    try:
        if coding in ("", "identity"):
            return data
        if coding in ("gzip", "x-gzip"):
            return _inflate(data, 47, limit)           # gzip or zlib header, auto-detected
        if coding == "deflate":
            try:
                return _inflate(data, 15, limit)
            except zlib.error:
                return _inflate(data, -15, limit)      # raw deflate, as some servers send it
        if coding == "br":
            d = brotli.Decompressor()
            out = d.process(data, output_buffer_limit=limit + 1)
            if len(out) > limit or not d.is_finished():
                raise TooLarge
            return out
        if coding == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(BytesIO(data), read_across_frames=True)
            out = reader.read(limit + 1)
            if len(out) > limit:
                raise TooLarge
            return out
    except TooLarge:
        raise
    except (zlib.error, brotli.error, zstandard.ZstdError, ValueError) as exc:
        raise Undecodable(f"{coding}: {exc}") from None
    raise Undecodable(f"unknown content coding {coding!r}")


def decode_bounded(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as the device will see it; TooLarge past ``limit`` bytes, Undecodable when the
    coding is unknown or the data corrupt. Codings are undone last-applied first (RFC 9110 8.4)."""
    if len(data) > limit and not content_encoding:
        raise TooLarge
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        data = _one(data, coding, limit)
    if len(data) > limit:
        raise TooLarge
    return data
