"""The captive sign-in pages, Japanese first and English too, rendered from the templates of
gateway/pages (issue #19). They carry the organization's name (and logo) and the identity
provider's host, so staff can tell the gateway's page from a phishing copy; the only link
besides the portal's own is the helpdesk's mail/phone when the config gives them."""

from __future__ import annotations

import hashlib
from datetime import datetime
from urllib.parse import quote

from gateway.pages.catalog import N_, both
from gateway.pages.organization import Helpdesk, Organization
from gateway.pages.render import render, times


def _times(now: datetime) -> str:
    jst, utc = times(now)
    return f"{jst} ({utc})"


def start_url(portal_host: str, next_url: str | None) -> str:
    return f"https://{portal_host}/start" + (f"?next={quote(next_url, safe='')}" if next_url else "")


def _organization(organization: Organization | None, contact: str) -> Organization:
    if organization is not None:
        return organization
    return Organization(helpdesk=Helpdesk("情報システム担当", "IT helpdesk", contact=contact))


def _desk(org: Organization, device_id: str) -> dict:
    desk = org.helpdesk
    subject = both("Sign-in problem on device %(device)s", device=device_id)
    return {"helpdesk": desk, "mailto": desk.mailto_href(subject, f"{both('Device')}: {device_id}\n"),
            "tel": desk.tel_href}


def signin_required_page(*, portal_host: str, next_url: str | None, device_id: str, contact: str = "",
                         organization: Organization | None = None, idp_host: str | None = None) -> str:
    org = _organization(organization, contact)
    return render("signin_required.html", organization=org, kind="portal", start_url=start_url(portal_host, next_url),
                  next_url=next_url, device=device_id, idp_host=idp_host, **_desk(org, device_id))


def signout_token(session_id: str) -> str:
    """What the sign-out form must send back: derived from the session id, which only the
    device's own portal page shows (another site's page cannot read it, so it cannot sign
    the user out with a forged form)."""
    return hashlib.sha256(f"kanmon-signout:{session_id}".encode()).hexdigest()[:32]


def signed_in_page(*, user: str, device_id: str, expires_at: datetime, mfa: bool, next_url: str | None,
                   session_id: str | None = None, organization: Organization | None = None,
                   idp_host: str | None = None) -> str:
    return render("signed_in.html", organization=organization, kind="portal", user=user, device=device_id,
                  mfa=mfa, expires=_times(expires_at), next_url=next_url, idp_host=idp_host,
                  signout_action=f"/signout?session={signout_token(session_id)}" if session_id else None)


# Why a sign-in was refused, in the words staff read (translations in the catalogs).
REFUSAL_TEXT = {
    "state-replayed": N_("This sign-in request was already used."),
    "state-unknown": N_("No such sign-in request."),
    "state-expired": N_("The sign-in took too long."),
    "state-other-device": N_("The sign-in was started on another device."),
    "owner-mismatch": N_("You are not the registered user of this device."),
    "idp-unreachable": N_("The identity provider cannot be reached. Try again later."),
    "idp-error": N_("The identity provider stopped the sign-in."),
    "session-store-unavailable": N_("The sign-in could not be recorded. Try again later."),
    "reauthentication-missing": N_("On a shared device you must enter your password at every sign-in. Sign in again."),
    "token-expired": N_("The sign-in token has expired. Check the clock and try again."),
}
# Every other token-* reason: the identity provider's answer did not pass the gateway's checks.
GENERIC_TOKEN = N_("The identity provider's answer failed verification. Contact your IT desk.")
GENERIC_REFUSAL = N_("The sign-in was not accepted.")


def refused_page(*, reason: str, device_id: str, portal_host: str, contact: str = "", now: datetime,
                 organization: Organization | None = None, idp_host: str | None = None) -> str:
    default = GENERIC_TOKEN if reason.startswith("token-") else GENERIC_REFUSAL
    org = _organization(organization, contact)
    return render("refused.html", organization=org, kind="refused", message=REFUSAL_TEXT.get(reason, default),
                  retry_url=start_url(portal_host, None), reason=reason, device=device_id, time=_times(now),
                  idp_host=idp_host, **_desk(org, device_id))
