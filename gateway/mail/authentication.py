"""Sender domain authentication (issue 5 item 12; NISC booklet 付録3 / 2-4: 送信ドメイン認証).

What is verified here and what is trusted from elsewhere:

* DKIM is verified locally with dkimpy on the original bytes, before any rewrite. Public keys
  come from ``dns_txt``, a function the caller passes (tests pass fixed keys; the gateway
  passes a resolver). A message with DKIM signatures none of which verifies is a failure;
  DNS errors are reported as "temperror", not as failure.
* SPF needs the connecting client's IP address at the organization's MX and DMARC needs SPF
  plus the published policy, neither of which the gateway sees when a device fetches mail
  over IMAP/POP3. Both are therefore read from ``Authentication-Results`` headers (RFC 8601),
  and only from headers whose authserv-id is in the policy's ``trusted_authserv_ids``; every
  other Authentication-Results header is ignored, since anyone can write one. The trusted MTA
  must delete incoming headers that claim its own authserv-id (RFC 8601 section 5; Postfix
  with OpenDKIM/OpenDMARC does).
* The dkim results in trusted headers are honoured too (a failure counts as failure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import authres
import dkim

from gateway.i18n import Text
from gateway.mail.dns_lookup import DnsLookupError
from gateway.mail.indicators import Finding, Name, visible
from gateway.mail.policy import MailPolicy

# name -> TXT record (None: no such record); raise DnsLookupError on a resolver failure.
DnsTxtLookup = Callable[[str], bytes | str | None]


@dataclass(frozen=True)
class DkimResult:
    domain: str
    selector: str
    result: str          # pass | fail | temperror | permerror


def verify_dkim(raw: bytes, message, dns_txt: DnsTxtLookup) -> list[DkimResult]:
    """Verify every DKIM-Signature of ``raw`` (the bytes as received)."""
    signatures = message.get_all("DKIM-Signature", []) or []
    if not signatures:
        return []

    dns_failed: list[str] = []  # dkimpy logs DNS errors and returns False; we must tell them apart

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        name_s = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            value = dns_txt(name_s.rstrip("."))
        except DnsLookupError as exc:
            dns_failed.append(str(exc))
            raise dkim.DnsTimeoutError(str(exc)) from None
        return value.encode("ascii", "replace") if isinstance(value, str) else value

    results: list[DkimResult] = []
    try:
        verifier = dkim.DKIM(raw)
    except Exception:  # noqa: BLE001 — dkimpy cannot even split this message
        return [DkimResult("?", "?", "permerror")]
    for idx, header in enumerate(signatures):
        tags = _dkim_tags(str(header))
        dns_failed.clear()
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
            result = "pass" if ok else ("temperror" if dns_failed else "fail")
        except dkim.DnsTimeoutError:
            result = "temperror"
        except dkim.KeyFormatError:
            result = "permerror"
        except Exception:  # noqa: BLE001 — dkimpy raises assorted errors on hostile signatures
            result = "fail"
        results.append(DkimResult(tags.get("d", "?"), tags.get("s", "?"), result))
    return results


def _dkim_tags(value: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, val = item.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(val.split())
    return tags


@dataclass(frozen=True)
class AuthResult:
    authserv_id: str
    method: str
    result: str
    detail: str


def trusted_results(message, trusted_ids: frozenset[str]) -> list[AuthResult]:
    out: list[AuthResult] = []
    for value in message.get_all("Authentication-Results", []) or []:
        try:
            parsed = authres.AuthenticationResultsHeader.parse_value(" ".join(str(value).split()))
        except Exception:  # authres raises its own and generic errors on garbage; ignore that header
            continue
        ident = (parsed.authserv_id or "").lower()
        if ident not in trusted_ids:
            continue
        for res in parsed.results:
            detail = " ".join(f"{p.type}.{p.name}={p.value}" for p in res.properties)
            out.append(AuthResult(ident, str(res.method).lower(), str(res.result).lower(), detail))
    return out


def auth_findings(raw: bytes, message, policy: MailPolicy, dns_txt: DnsTxtLookup | None) -> list[Finding]:
    found: list[Finding] = []
    if policy.verify_dkim and dns_txt is not None:
        results = verify_dkim(raw, message, dns_txt)
        if results and not any(r.result == "pass" for r in results):
            failed = [r for r in results if r.result in ("fail", "permerror")]
            if failed:
                shown = ", ".join(f"d={visible(r.domain)} s={visible(r.selector)}: {r.result}" for r in failed)
                found.append(Finding(Name.SENDER_AUTH_FAILURE, Text(
                    f"DKIM 署名の検証に失敗 ({shown})", f"DKIM signature does not verify ({shown})")))
    by_method: dict[tuple[str, str], list[AuthResult]] = {}
    for r in trusted_results(message, policy.trusted_authserv_ids):
        by_method.setdefault((r.authserv_id, r.method), []).append(r)
    for (ident, method), results in sorted(by_method.items()):
        failing = policy.failing_results.get(method)
        if not failing or any(r.result == "pass" for r in results):
            continue
        for r in results:
            if r.result in failing:
                found.append(Finding(Name.SENDER_AUTH_FAILURE, Text(
                    f"{visible(ident)} の判定: {method}={r.result} {visible(r.detail)}".rstrip(),
                    f"{visible(ident)} reports {method}={r.result} {visible(r.detail)}".rstrip())))
    return found
