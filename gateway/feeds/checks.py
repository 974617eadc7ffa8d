"""Integrity and sanity of a fetched feed. Pure: bytes and entries in, a refusal or None out.

Integrity: a pinned sha256 of the file, or an Ed25519 signature over the file's bytes by a
configured public key (``cryptography``). Sanity: a feed that is empty, that shrank by more
than the configured fraction since the last good copy, or that names a public suffix
(``com``, ``co.jp``: one such line blocks a whole country's names) is refused as a whole,
and the last good copy keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from publicsuffixlist import PublicSuffixList  # ships its own copy of the list: works offline

from gateway.i18n import Text

T_SHA256 = Text("sha256 が一致しません（期待 {want}、実際 {got}）", "sha256 mismatch (expected {want}, got {got})")
T_SIG_MISSING = Text("署名を取得できません: {e}", "signature not available: {e}")
T_SIG_BAD = Text("署名が正しくありません（公開鍵 {key}）", "bad signature (public key {key})")
T_EMPTY = Text("フィードが空です", "the feed is empty")
T_SHRINK = Text("フィードが {old} 件から {new} 件に減りました（許容は {frac:.0%} まで）",
                "the feed shrank from {old} to {new} entries (at most {frac:.0%} allowed)")
T_PUBLIC_SUFFIX = Text("公開接尾辞がエントリに含まれています: {names}",
                       "the feed lists public suffixes: {names}")

_PSL: PublicSuffixList | None = None


class FeedRefused(Exception):
    """A feed that must not replace the last good copy. ``reason`` is the metrics label
    (integrity, empty, shrink, public-suffix, ...), ``text`` the bilingual message."""

    def __init__(self, reason: str, text: Text):
        super().__init__(text.en)
        self.reason = reason
        self.text = text


def public_key_from_text(value: str) -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 key in base64 (what ``kanmon lists`` prints and the policy
    holds). ValueError when it is not one."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_integrity(data: bytes, sha256: str | None, public_key: str | None, signature: bytes | None) -> None:
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(got, sha256.lower()):
            raise FeedRefused("integrity", T_SHA256.format(want=sha256.lower()[:16] + "…", got=got[:16] + "…"))
    if public_key is not None:
        key = public_key_from_text(public_key)
        sig = _signature_bytes(signature or b"")
        try:
            key.verify(sig, data)
        except InvalidSignature:
            raise FeedRefused("integrity", T_SIG_BAD.format(key=public_key.strip()[:12] + "…")) from None


def _signature_bytes(raw: bytes) -> bytes:
    """A detached signature: the 64 raw bytes, or them in base64 text."""
    if len(raw) == 64:
        return raw
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
    return decoded if len(decoded) == 64 else b""


def public_suffix_list() -> PublicSuffixList:
    global _PSL
    if _PSL is None:
        _PSL = PublicSuffixList(only_icann=True)
    return _PSL


def check_sanity(total: int, previous_total: int | None, max_shrink: float, names: Iterable[str],
                 accepted: frozenset[str] = frozenset()) -> None:
    """Refuse an empty feed, one that shrank too much, or one that lists a public suffix
    (ICANN section: ``com``, ``co.jp``; private suffixes such as ``blogspot.com`` are
    legitimate category entries). ``accepted``: suffixes the operator has decided to block
    whole (UT1 gambling lists ``bet.br``, Brazil's second-level domain for licensed betting)."""
    if total == 0:
        raise FeedRefused("empty", T_EMPTY)
    if previous_total and total < previous_total * (1.0 - max_shrink):
        raise FeedRefused("shrink", T_SHRINK.format(old=previous_total, new=total, frac=max_shrink))
    psl = public_suffix_list()
    bad = []
    for name in names:
        if psl.is_public(name) and name not in accepted:
            bad.append(name)
            if len(bad) >= 5:
                break
    if bad:
        raise FeedRefused("public-suffix", T_PUBLIC_SUFFIX.format(names=", ".join(bad)))
