"""Words for the raw codes the logs carry (stream names, verdicts, firewall reasons, tunnel
events, audit actions, mail indicators and mail verdicts, the incident fields of IPA 組織的
対策 9.5), in Japanese and English: one table per kind of code, all in this one module so the
reports never show a bare code or a Python structure, and so the tables can move to the
project's message catalogue as a whole when the pages move to gettext.

``label(table, code)`` gives the words, or the code itself (marked as such) for a code this
version does not know yet: a newer gateway's log must still render. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.i18n import Text

NONE_TEXT = Text("（なし）", "(none)")

STREAMS: Mapping[str, Text] = {
    "proxy": Text("プロキシ", "proxy"), "conn": Text("通信（ファイアウォール）", "connections (firewall)"),
    "dns": Text("DNS", "DNS"), "mail": Text("メール", "mail"), "auth": Text("認証", "authentication"),
    "audit": Text("監査", "audit"),
}

VERDICTS: Mapping[str, Text] = {
    "allow": Text("許可", "allowed"), "block": Text("遮断", "blocked"), "monitor": Text("監視（許可・記録）", "monitored"),
    "no-inspect": Text("検査なしで許可", "allowed uninspected"),
    "tenant-restrict": Text("テナント制限付きで許可", "allowed with tenant restriction"),
    "undecided": Text("判定なし", "undecided"),
}

# gateway/firewalllog.py REASONS (rule.id kanmon:fw-<code>)
FIREWALL_REASONS: Mapping[str, Text] = {
    "blocked-device": Text("失効・停止中の端末", "revoked, suspended or blocked device"),
    "spoofed-source": Text("トンネル外の送信元アドレス（なりすまし）", "source outside the tunnel prefix (spoofed)"),
    "ipv6-disabled": Text("IPv6（未設定）", "IPv6 while none is configured"),
    "device-to-device": Text("端末間の通信", "device to device"),
    "gateway-address": Text("ゲートウェイ自身のアドレス宛て", "to an address of the gateway"),
    "quic": Text("QUIC（UDP 443、TCP へ切替を促す）", "QUIC (UDP 443, client falls back to TCP)"),
    "not-tcp": Text("TCP 以外（DNS 以外の UDP など）", "not TCP (UDP other than DNS, …)"),
    "local-service": Text("ゲートウェイの非公開ポート宛て", "to a gateway port that is not a proxy listener"),
    "listener-from-outside": Text("トンネル外からプロキシ宛て", "proxy listener reached from outside the tunnel"),
    "forward-from-tunnel": Text("プロキシを迂回する転送（端末から）", "forwarded around the proxy (from a device)"),
    "forward-to-tunnel": Text("プロキシを迂回する転送（端末へ）", "forwarded around the proxy (to the tunnel)"),
}

# gateway/tunnellog.py (kanmon.tunnel.event, else event.action)
TUNNEL_EVENTS: Mapping[str, Text] = {
    "session-start": Text("接続開始（最初のハンドシェイク）", "session start (first handshake)"),
    "resumed": Text("接続再開（間隔の後のハンドシェイク）", "session resumed (handshake after a gap)"),
    "roamed": Text("接続元の変更（ローミング）", "outer address changed (roaming)"),
    "peer-added": Text("ピア追加（端末の許可）", "peer added (device admitted)"),
    "peer-removed": Text("ピア削除（端末の除外）", "peer removed (device no longer admitted)"),
}

# gateway.cli.device.AUDIT_ACTIONS and the other device audit actions
AUDIT_ACTIONS: Mapping[str, Text] = {
    "device-quarantined": Text("隔離", "quarantined"), "device-revoked": Text("失効", "revoked"),
    "device-suspended": Text("一時停止", "suspended"), "device-resumed": Text("再開", "resumed"),
    "device-released": Text("隔離解除", "released from quarantine"),
    "device-renewed": Text("証明書更新", "certificate renewed"),
    "device-posture-updated": Text("状態情報更新", "posture updated"),
    "device-added": Text("登録", "added"), "device-enrolled": Text("登録完了", "enrolled"),
    "device-reported-lost": Text("紛失の届出(本人)", "reported lost (by the owner)"),   # issue #21 console
}

# `kanmon device revoke --reason` (gateway/cli/device.py REVOKE_REASONS); other audit reasons
# are the operator's own words and are shown as written
REVOKE_REASONS: Mapping[str, Text] = {
    "lost": Text("紛失", "lost"), "stolen": Text("盗難", "stolen"), "retired": Text("廃棄・返却", "retired"),
    "compromised": Text("侵害・感染", "compromised"), "policy-violation": Text("規程違反", "policy violation"),
    "other": Text("その他", "other"),
}

# event.action of the traffic and auth streams (gateway/logstore/FIELDS.md)
EVENT_ACTIONS: Mapping[str, Text] = {
    "connection-opened": Text("接続開始", "connection opened"),
    "connection-closed": Text("接続終了", "connection closed"),
    "connection-blocked": Text("接続を遮断", "connection blocked"),
    "device-limited": Text("端末ごとの上限で拒否", "refused by a per-device limit"),
    "packet-dropped": Text("パケット破棄", "packet dropped"),
    "packet-rejected": Text("パケット拒否（応答あり）", "packet rejected (answered)"),
    "wireguard-handshake": Text("VPN ハンドシェイク", "VPN handshake"),
    "wireguard-endpoint-changed": Text("VPN 接続元の変更", "VPN outer address changed"),
    "wireguard-peer-added": Text("VPN ピア追加", "VPN peer added"),
    "wireguard-peer-removed": Text("VPN ピア削除", "VPN peer removed"),
    "enrollment": Text("端末登録", "enrollment"), "admin-login": Text("管理者ログイン", "administrator login"),
    "certificate-check": Text("証明書の確認", "certificate check"),
    "user-signin": Text("サインイン", "sign-in"), "user-signin-start": Text("サインイン開始", "sign-in started"),
    "user-signout": Text("サインアウト", "sign-out"), "user-session-ended": Text("セッション終了", "session ended"),
    "user-session-expired": Text("セッション期限切れ", "session expired"),
    "mail-inbound": Text("受信メール", "inbound mail"), "mail-outbound": Text("送信メール", "outbound mail"),
    "mail-recipient-refused": Text("宛先を拒否", "recipient refused"),
    "mail-connection-cut": Text("メール接続を切断", "mail connection cut"),
}

# rule.category of the shipped policy and the usual feeds (gateway/pages/kinds.py has the
# sentence staff read for each); a policy may name others: they are shown as written.
CATEGORIES: Mapping[str, Text] = {
    "webmail": Text("フリーメール（Web メール）", "free web mail"),
    "storage": Text("未承認のオンラインストレージ・ファイル転送", "unapproved online storage and file transfer"),
    "sns": Text("SNS への投稿", "posting to social networks"), "p2p": Text("ファイル共有（P2P）", "file sharing (P2P)"),
    "shortener": Text("短縮 URL", "URL shorteners"), "sideload": Text("アプリのサイドロード", "app sideloading"),
    "dns-bypass": Text("組織外の DNS の利用（DoH・DoT）", "resolvers around the gateway (DoH, DoT)"),
    "malware": Text("マルウェア配布", "malware"), "phishing": Text("フィッシング", "phishing"),
    "c2": Text("攻撃者の指令サーバー（C2）", "command and control (C2)"),
}

# Why an authentication failed: the stable codes of `kanmon.auth.reason` that the dashboard
# counts (gateway.metrics.auth_failure_reason; else event.action, EVENT_ACTIONS): the enrollment
# refusals (gateway/enroll/decide.py REFUSALS, gateway/devices/certcheck.py Reason) and the
# sign-in refusals (gateway/signin). tests/unit/test_reports_words.py checks none is missing.
AUTH_REASONS: Mapping[str, Text] = {
    # device certificate (enrollment)
    "no-certificate": Text("端末証明書の提示なし", "no device certificate"),
    "malformed": Text("読み取れない証明書", "unreadable certificate"),
    "untrusted-ca": Text("信頼していない CA の証明書", "certificate from an untrusted CA"),
    "bad-signature": Text("証明書の署名が不正", "bad certificate signature"),
    "not-yet-valid": Text("有効期間前の証明書", "certificate not valid yet"),
    "expired": Text("期限切れの証明書", "expired certificate"),
    "not-client-auth": Text("クライアント認証用でない証明書", "not a client-authentication certificate"),
    "chain-invalid": Text("証明書チェーンの検証失敗", "certificate chain invalid"),
    "revoked-crl": Text("失効した証明書（CRL）", "certificate revoked (CRL)"),
    "bad-wg-key": Text("不正な WireGuard 公開鍵", "malformed WireGuard key"),
    "key-not-bound": Text("証明書に結び付いていない WireGuard 鍵", "WireGuard key not bound to the certificate"),
    # enrollment request and registry
    "bad-request": Text("不正な登録要求", "bad enrollment request"), "not-found": Text("存在しないパス", "no such path"),
    "method-not-allowed": Text("POST 以外の要求", "method other than POST"),
    "too-large": Text("大きすぎる要求", "request too large"), "rate-limited": Text("試行が多すぎる", "too many attempts"),
    "unknown-device": Text("登録されていない端末", "device not registered"),
    "device-revoked": Text("失効した端末", "revoked device"), "device-suspended": Text("利用停止中の端末", "suspended device"),
    "outside-usage-period": Text("利用期間外", "outside the usage period"),
    "certificate-superseded": Text("更新済みの古い証明書", "superseded certificate"),
    "key-in-use": Text("別の端末の WireGuard 鍵", "WireGuard key of another device"),
    "internal-error": Text("内部エラー", "internal error"),
    "auth-log-unavailable": Text("認証ログを書けない", "authentication log unavailable"),
    # user sign-in (OIDC)
    "state-missing": Text("サインイン要求の識別子なし", "sign-in state missing"),
    "state-replayed": Text("使用済みのサインイン要求", "sign-in request replayed"),
    "state-unknown": Text("存在しないサインイン要求", "unknown sign-in request"),
    "state-expired": Text("サインインの時間切れ", "sign-in took too long"),
    "state-other-device": Text("別の端末で始めたサインイン", "sign-in started on another device"),
    "owner-mismatch": Text("端末の登録利用者ではない", "not the device's registered user"),
    "reauthentication-missing": Text("共有端末で再認証なし", "no re-authentication on a shared device"),
    "session-store-unavailable": Text("セッションを記録できない", "session store unavailable"),
    "idp-unreachable": Text("IdP に接続できない", "identity provider unreachable"),
    "idp-error": Text("IdP がサインインを中止", "identity provider stopped the sign-in"),
    "idp-issuer-mismatch": Text("IdP の発行者名の不一致", "identity provider issuer mismatch"),
    "idp-metadata-invalid": Text("IdP の設定情報が不正", "identity provider metadata invalid"),
    "token-request-refused": Text("トークン要求の拒否", "token request refused"),
    "token-id-token-missing": Text("ID トークンなし", "no ID token"),
    "token-expired": Text("期限切れのトークン", "token expired"),
    "token-key-unknown": Text("署名鍵が不明なトークン", "token signed with an unknown key"),
    "token-alg-refused": Text("許可しない署名方式のトークン", "token signature algorithm refused"),
    "token-signature-invalid": Text("トークンの署名が不正", "token signature invalid"),
    "token-invalid": Text("不正なトークン", "invalid token"),
    "code-missing": Text("IdP からの応答に認可コードなし", "no authorization code from the identity provider"),
    "signin-error": Text("サインイン処理の失敗", "sign-in failed in the gateway"),
    # token-<claim>-missing / -invalid (gateway/signin/oidc.py: the claims an ID token must carry)
    **{f"token-{claim}-{kind}": Text(f"ID トークンの {claim} が{ja}", f"ID token claim {claim} {kind}")
       for claim in ("iss", "aud", "sub", "exp", "iat", "nonce") for kind, ja in (("missing", "ない"), ("invalid", "不正"))},
    "other": Text("その他", "other"), "unknown": Text("不明", "unknown"),
}
AUTH_FAILURE_WORDS: Mapping[str, Text] = {**EVENT_ACTIONS, **AUTH_REASONS}

OUTCOMES: Mapping[str, Text] = {
    "success": Text("成功", "success"), "failure": Text("失敗", "failure"), "unknown": Text("不明", "unknown"),
}

DEVICE_STATUS: Mapping[str, Text] = {
    "active": Text("利用中", "active"), "quarantined": Text("隔離中", "quarantined"),
    "revoked": Text("失効", "revoked"), "suspended": Text("一時停止中", "suspended"),
}

# gateway/mail/indicators.py Name (gateway/mail/INDICATORS.md; IPA 組織的対策 7.4)
MAIL_INDICATORS: Mapping[str, Text] = {
    "freemail-sender": Text("フリーメールの差出人", "free-mail sender"),
    "sender-mismatch": Text("差出人と返信先・署名の不一致", "sender differs from reply-to or signature"),
    "display-name-impersonation": Text("表示名のなりすまし", "display-name impersonation"),
    "link-text-mismatch": Text("リンクの表示と実際の URL の不一致", "link text differs from its target"),
    "lookalike-domain": Text("よく似たドメイン名", "look-alike domain"),
    "executable-attachment": Text("実行ファイルの添付", "executable attachment"),
    "shortcut-attachment": Text("ショートカットの添付", "shortcut attachment"),
    "double-extension": Text("二重拡張子", "double extension"),
    "extension-padding": Text("拡張子の前の空白・記号の連続", "padding before the extension"),
    "filename-control-chars": Text("ファイル名の制御文字（RLO など）", "control characters in a file name (RLO, …)"),
    "archive-threat": Text("圧縮ファイル内の危険なファイル", "dangerous file inside an archive"),
    "archive-encrypted": Text("暗号化・検査不能な圧縮ファイル", "encrypted or uninspectable archive"),
    "sender-auth-failure": Text("送信ドメイン認証の失敗", "sender authentication failed"),
    "virus-detected": Text("ウイルス検出", "virus detected"),
    "virus-scan-unavailable": Text("ウイルス検査ができなかった", "virus scan unavailable"),
    "message-too-complex": Text("検査できないほど複雑なメール", "message too complex to inspect"),
    # issue #20 (IPA 7.4 themes, body, signature, attachments)
    "theme-request": Text("取材・講演・応募・問合せ・アンケートを装う件名や本文", "request theme (interview, lecture, application, enquiry, survey)"),
    "theme-internal-document": Text("議事録・原稿・要人訪問など内部文書を装う", "internal document theme (minutes, drafts, VIP visit)"),
    "theme-public-notice": Text("公的機関からの注意喚起を装う", "notice from a public body (security alert, epidemic, disaster)"),
    "theme-organization-notice": Text("組織全体への通知（人事・新制度・資料再送）を装う", "organization-wide notice (personnel, new policy, resent documents)"),
    "theme-delivery-notice": Text("心当たりのない決裁・配送通知", "unexpected approval or delivery notice"),
    "theme-credential-request": Text("ID・パスワードや口座情報の入力依頼", "request to enter IDs, passwords or bank details"),
    "unnatural-japanese": Text("不自然な日本語の言い回し", "unnatural Japanese phrasing"),
    "non-japanese-han": Text("日本語で使われない漢字（繁体字・簡体字）", "Han characters Japanese does not use"),
    "signature-error": Text("署名の誤り（存在しない番号・電話と FAX が同じ・別ドメイン）", "signature error (invalid number, phone = FAX, other domain)"),
    "attachment-present": Text("ファイルが添付されている", "a file is attached"),
    "icon-disguise": Text("アイコンを偽装した実行ファイル", "executable disguised with a document icon"),
    "outbound-external-recipients": Text("社外の宛先が多すぎる送信（To/Cc）", "too many external recipients in To/Cc"),
    "outbound-external-domains": Text("多数の社外ドメインへの送信（To/Cc）", "To/Cc span too many external domains"),
    "outbound-confidential-label": Text("機密表示のあるメールの社外送信", "confidential label going outside"),
}

MAIL_VERDICTS: Mapping[str, Text] = {
    "deliver": Text("配信", "delivered"), "tag": Text("警告を付けて配信", "delivered with a warning"),
    "neutralize": Text("添付を除去して配信", "delivered with attachments removed"),
    "quarantine": Text("隔離", "quarantined"), "reject": Text("拒否", "refused"),
}

# IPA 組織的対策 9.4 区分 (the classification 9.5 asks the report to carry)
INCIDENT_CATEGORIES: Mapping[str, Text] = {
    "leak": Text("漏えい・流出", "leak / exfiltration"),
    "tamper": Text("改ざん・消失・破壊・サービス停止", "tampering, loss, destruction, service outage"),
    "virus": Text("ウイルス感染", "malware infection"),
}

# IPA 組織的対策 9.4 事故レベル (0: possible incident reported … 3: the most serious)
INCIDENT_LEVELS: Mapping[str, Text] = {
    "0": Text("レベル 0（発生の可能性・想定される被害の報告）", "level 0 (possible incident and expected damage)"),
    "1": Text("レベル 1", "level 1"),
    "2": Text("レベル 2", "level 2"),
    "3": Text("レベル 3（代表取締役まで即時報告）", "level 3 (reported to the top at once)"),
}

# IPA 組織的対策 9.4 対応手順 ①–⑤ (9.5: the report follows these phases)
INCIDENT_PHASES: Mapping[str, Text] = {
    "discovery": Text("① 発見報告", "1 discovery report"),
    "initial": Text("② 初動", "2 initial response"),
    "investigation": Text("③ 調査・対応", "3 investigation and response"),
    "recovery": Text("④ 復旧", "4 recovery"),
    "final": Text("⑤ 最終報告", "5 final report"),
}


def unknown(code: str) -> Text:
    return Text(f"未知のコード {code}", f"unknown code {code}")


def words_or_code(table: Mapping[str, Text], code: str) -> Text:
    """The words for a code of an open set (categories a policy names itself): the code as
    written when the table does not know it."""
    return table.get(code) or Text(code, code)


def label(table: Mapping[str, Text], code: str | None) -> Text:
    """The words for ``code``; NONE_TEXT for no code; the code marked as unknown otherwise."""
    if code is None or code == "":
        return NONE_TEXT
    found = table.get(code)
    return found if found is not None else unknown(code)
