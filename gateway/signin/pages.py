"""The captive sign-in pages, Japanese first and English too. Self-contained HTML (no
external resources: before sign-in almost nothing is reachable)."""

from __future__ import annotations

import hashlib
import html
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote

JST = timezone(timedelta(hours=9), "JST")

_STYLE = """
body { font-family: sans-serif; margin: 0; background: #f4f4f4; color: #222; }
main { max-width: 40rem; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem; border-top: 6px solid #1a5fb4; }
main.refused { border-top-color: #b00020; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; color: #555; }
button.button { font: inherit; border: 0; cursor: pointer; }
a.button, button.button { display: inline-block; margin: 1rem 0; padding: .6rem 1.2rem; background: #1a5fb4; color: #fff;
           text-decoration: none; border-radius: 4px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }
dt { font-weight: bold; }
dd { margin: 0; word-break: break-all; }
"""


def _page(title: str, body: str, kind: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="ja">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
            f'<body>\n<main class="{kind}">\n{body}\n</main>\n</body>\n</html>\n')


def _times(now: datetime) -> str:
    return (f"{now.astimezone(JST).strftime('%Y-%m-%d %H:%M:%S JST')} "
            f"({now.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')})")


def start_url(portal_host: str, next_url: str | None) -> str:
    return f"https://{portal_host}/start" + (f"?next={quote(next_url, safe='')}" if next_url else "")


def signin_required_page(*, portal_host: str, next_url: str | None, device_id: str, contact: str) -> str:
    e = html.escape
    link = e(start_url(portal_host, next_url))
    return _page("サインインが必要です / Sign-in required", f"""
<section lang="ja" id="ja">
<h1>サインインが必要です</h1>
<p>この端末から業務ネットワークを使うには、組織のアカウントでサインインしてください。</p>
</section>
<section lang="en" id="en">
<h2>Sign-in required</h2>
<p>Sign in with your organization account to use the network from this device.</p>
</section>
<a class="button" id="signin-link" href="{link}">サインイン / Sign in</a>
<dl>
<dt>端末 / Device</dt><dd id="device">{e(device_id)}</dd>
<dt>要求先 / Requested</dt><dd id="next">{e(next_url or '-')}</dd>
<dt>連絡先 / Contact</dt><dd id="contact">{e(contact or '-')}</dd>
</dl>""")


def signout_token(session_id: str) -> str:
    """What the sign-out form must send back: derived from the session id, which only the
    device's own portal page shows (another site's page cannot read it, so it cannot sign
    the user out with a forged form)."""
    return hashlib.sha256(f"kanmon-signout:{session_id}".encode()).hexdigest()[:32]


def signed_in_page(*, user: str, device_id: str, expires_at: datetime, mfa: bool, next_url: str | None,
                   session_id: str | None = None) -> str:
    e = html.escape
    cont = f'<a class="button" id="continue" href="{e(next_url)}">続ける / Continue</a>' if next_url else ""
    signout = (f'<form method="post" action="/signout?session={signout_token(session_id)}">'
               f'<button class="button" id="signout" type="submit">サインアウト / Sign out</button></form>'
               if session_id else "")
    return _page("サインインしました / Signed in", f"""
<section lang="ja" id="ja"><h1>サインインしました</h1>
<p>共用端末を使い終えたら、必ずサインアウトしてください。</p></section>
<section lang="en" id="en"><h2>You are signed in</h2>
<p>Sign out when you are done with a shared device.</p></section>
{cont}
{signout}
<dl>
<dt>利用者 / User</dt><dd id="user">{e(user)}</dd>
<dt>端末 / Device</dt><dd id="device">{e(device_id)}</dd>
<dt>多要素認証 / MFA</dt><dd id="mfa">{'はい / yes' if mfa else 'いいえ / no'}</dd>
<dt>有効期限 / Valid until</dt><dd id="expires">{e(_times(expires_at))}</dd>
</dl>""")


REFUSAL_TEXT = {
    "state-replayed": ("このサインイン要求は既に使われています。", "This sign-in request was already used."),
    "state-unknown": ("サインイン要求が見つかりません。", "No such sign-in request."),
    "state-expired": ("サインインに時間がかかりすぎました。", "The sign-in took too long."),
    "state-other-device": ("別の端末で始めたサインインです。", "The sign-in was started on another device."),
    "owner-mismatch": ("この端末の登録利用者ではありません。", "You are not the registered user of this device."),
    "idp-unreachable": ("認証基盤(IdP)に接続できません。しばらくしてからやり直してください。",
                        "The identity provider cannot be reached. Try again later."),
    "idp-error": ("認証基盤(IdP)がサインインを中止しました。", "The identity provider stopped the sign-in."),
    "session-store-unavailable": ("サインインを記録できませんでした。しばらくしてからやり直してください。",
                                  "The sign-in could not be recorded. Try again later."),
    "reauthentication-missing": ("共用端末では、毎回パスワードを入力してサインインする必要があります。もう一度サインインしてください。",
                                 "On a shared device you must enter your password at every sign-in. Sign in again."),
    "token-expired": ("認証情報の有効期限が切れています。端末の時刻を確認してやり直してください。",
                      "The sign-in token has expired. Check the clock and try again."),
}
# Every other token-* reason: the identity provider's answer did not pass the gateway's checks.
GENERIC_TOKEN = ("認証基盤(IdP)からの応答を検証できませんでした。情報システム担当に連絡してください。",
                 "The identity provider's answer failed verification. Contact your IT desk.")


def refused_page(*, reason: str, device_id: str, portal_host: str, contact: str, now: datetime) -> str:
    e = html.escape
    default = GENERIC_TOKEN if reason.startswith("token-") else ("サインインを受け付けられませんでした。",
                                                                   "The sign-in was not accepted.")
    ja, en = REFUSAL_TEXT.get(reason, default)
    return _page("サインインできませんでした / Sign-in refused", f"""
<section lang="ja" id="ja"><h1>サインインできませんでした</h1><p>{e(ja)}</p></section>
<section lang="en" id="en"><h2>Sign-in refused</h2><p>{e(en)}</p></section>
<a class="button" id="retry" href="{e(start_url(portal_host, None))}">やり直す / Try again</a>
<dl>
<dt>理由 / Reason</dt><dd id="reason">{e(reason)}</dd>
<dt>端末 / Device</dt><dd id="device">{e(device_id)}</dd>
<dt>日時 / Time</dt><dd id="time">{e(_times(now))}</dd>
<dt>連絡先 / Contact</dt><dd id="contact">{e(contact or '-')}</dd>
</dl>""", kind="refused")
