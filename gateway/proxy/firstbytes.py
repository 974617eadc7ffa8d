"""What the first bytes of a TCP connection say it is: TLS, HTTP/1, HTTP/2 with prior
knowledge, or something the gateway cannot identify. Pure: bytes in, a kind out.

The gateway's principle is *identify or deny* (README, "Architecture"): a connection whose
protocol is not identified is denied unless a policy rule names its destination. This
module is the identification, and it is strict on purpose:

* TLS is recognised from a complete ClientHello, however the client segmented it (one byte
  per TCP segment is still TLS) and whatever minor record-layer version its records carry
  (0x03xx; the record version is not negotiated and servers ignore it), never from the
  first three bytes alone. ``normalized_record_versions`` rewrites an unusual one (0x0304+)
  to 0x0301 before the bytes reach mitmproxy's TLS layer, which accepts only 3.0-3.3.
* HTTP/1 is a complete, well-formed request line: a method token, one space, a target
  without controls or spaces, one space, ``HTTP/1.0`` or ``HTTP/1.1``. A leading empty line,
  a lower-case method, a tab, or a bare ``\\n`` before the line are *not* HTTP here: a real
  client never sends them, and mitmproxy's lenient fallback turned exactly those into raw
  TCP that the policy could not judge (issue #14).
* Until the bytes are complete, the answer is ``NEED_MORE`` — as long as what arrived can
  still become TLS or HTTP, and at most ``MAX_IDENTIFY_BYTES``; anything else is
  ``UNIDENTIFIED`` at once.

Every check walks the bytes once (no regular expressions on attacker bytes).
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    TLS = "tls"
    HTTP = "http"
    HTTP2 = "http2"            # prior knowledge (h2c): the client preface
    UNIDENTIFIED = "unidentified"
    NEED_MORE = "need-more"


# A ClientHello larger than this is not one a real client sends (post-quantum hybrid key
# shares make them ~2 KB); an HTTP request line longer than this is refused by servers too.
MAX_CLIENT_HELLO = 16 * 1024 + 5 * 8
MAX_REQUEST_LINE = 8 * 1024
MAX_IDENTIFY_BYTES = max(MAX_CLIENT_HELLO, MAX_REQUEST_LINE)

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_MAX_METHOD = 24
# RFC 9110 token characters a method may use in practice (upper case, digits, "-", "_":
# VERSION-CONTROL, BASELINE-CONTROL). Lower-case methods are refused (no client sends them).
_METHOD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def classify(data: bytes) -> Kind:
    """The kind of connection that starts with ``data`` (all the client sent so far)."""
    if not data:
        return Kind.NEED_MORE
    if data[0] == 0x16:
        return _tls(data)
    if data[0] == 0x50 and _H2_PREFACE.startswith(data[: len(_H2_PREFACE)]):   # "P"
        if len(data) >= len(_H2_PREFACE):
            return Kind.HTTP2
        return Kind.NEED_MORE
    return _http1(data)


def _tls(data: bytes) -> Kind:
    """A TLS handshake record stream whose first message is a whole ClientHello."""
    if len(data) >= 2 and data[1] != 0x03:
        return Kind.UNIDENTIFIED
    hello = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            return _more(data)
        if data[offset] != 0x16 or data[offset + 1] != 0x03:
            return Kind.UNIDENTIFIED   # a later record that is not a handshake record
        size = int.from_bytes(data[offset + 3: offset + 5], "big")
        if size == 0 or size > 16384 + 2048:
            return Kind.UNIDENTIFIED
        offset += 5
        if len(data) < offset + size:
            if not hello and len(data) >= offset + 4:
                # The handshake header is already here: refuse what is not a ClientHello,
                # or one larger than any client sends, without waiting for the rest.
                if data[offset] != 0x01 or int.from_bytes(data[offset + 1: offset + 4], "big") + 4 > MAX_CLIENT_HELLO:
                    return Kind.UNIDENTIFIED
            return _more(data)
        hello += data[offset: offset + size]
        offset += size
        if len(hello) >= 4:
            if hello[0] != 0x01:        # handshake type 1: ClientHello
                return Kind.UNIDENTIFIED
            wanted = int.from_bytes(hello[1:4], "big") + 4
            if wanted > MAX_CLIENT_HELLO:
                return Kind.UNIDENTIFIED
            if len(hello) >= wanted:
                return Kind.TLS if _client_hello_parses(bytes(hello[:wanted])) else Kind.UNIDENTIFIED


def normalized_record_versions(data: bytes) -> bytes | None:
    """``data`` with every handshake record header's version set to 0x0301 where its minor
    version is above 3 (None when there is nothing to rewrite). Walks the record headers of
    the ClientHello's records only; the rest of the bytes are not touched."""
    out: bytearray | None = None
    offset = 0
    while len(data) >= offset + 5 and data[offset] == 0x16 and data[offset + 1] == 0x03:
        if data[offset + 2] > 0x03:
            if out is None:
                out = bytearray(data)
            out[offset + 2] = 0x01
        offset += 5 + int.from_bytes(data[offset + 3: offset + 5], "big")
    if out is None and len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] > 0x03:
        out = bytearray(data)
        out[2] = 0x01
    return bytes(out) if out is not None else None


def _client_hello_parses(handshake: bytes) -> bool:
    # mitmproxy's own parser (its TLS layer parses the same bytes next): what it cannot
    # read is not TLS to the gateway either.
    from mitmproxy.tls import ClientHello

    try:
        ClientHello(handshake[4:])
    except Exception:   # EOFError, ValueError, kaitai errors: a malformed ClientHello
        return False
    return True


def _more(data: bytes) -> Kind:
    return Kind.NEED_MORE if len(data) < MAX_IDENTIFY_BYTES else Kind.UNIDENTIFIED


def _http1(data: bytes) -> Kind:
    """A complete request line ``METHOD SP target SP HTTP/1.x CRLF`` (or LF)."""
    end = data.find(b"\n", 0, MAX_REQUEST_LINE + 1)
    complete = end >= 0
    line = data[:end] if complete else data[:MAX_REQUEST_LINE]
    if complete and line.endswith(b"\r"):
        line = line[:-1]
    if not complete and len(data) > MAX_REQUEST_LINE:
        return Kind.UNIDENTIFIED
    # method
    i, n = 0, len(line)
    while i < n and line[i] in _METHOD_BYTES:
        i += 1
    if i == 0 or i > _MAX_METHOD:
        return Kind.UNIDENTIFIED
    if i == n:
        return Kind.UNIDENTIFIED if complete else Kind.NEED_MORE
    if line[i] != 0x20:
        return Kind.UNIDENTIFIED
    # target: visible ASCII (0x21-0x7e), at least one byte
    j = i + 1
    while j < n and 0x21 <= line[j] <= 0x7E:
        j += 1
    if j == i + 1:
        return Kind.UNIDENTIFIED if (complete or j < n) else Kind.NEED_MORE
    if j == n:
        return Kind.UNIDENTIFIED if complete else Kind.NEED_MORE
    if line[j] != 0x20:
        return Kind.UNIDENTIFIED
    version = line[j + 1:]
    if complete:
        return Kind.HTTP if version in _VERSIONS else Kind.UNIDENTIFIED
    if any(v.startswith(version) for v in _VERSIONS):
        return Kind.NEED_MORE
    return Kind.UNIDENTIFIED
