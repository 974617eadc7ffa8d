"""Corpus for the issue 20 indicators (IPA SME sample 7.4: themes ①-⑥, unnatural Japanese,
Han characters Japanese does not use, signature errors, attachments, icon disguise).

Every mail carries ``truth``: the issue 20 indicators a careful human reader would say apply
(written before looking at what the engine says; misses and false alarms are measured, not
hidden). ``natural`` marks ordinary business mail, which must stay below the tag threshold.
Japanese mails in ISO-2022-JP, Shift_JIS and UTF-8; English mails; synthetic PE files.

    python -m tests.mailcorpus.indicators        # prints the per-indicator precision/recall table
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tests.mailcorpus.build import ORG, PARTNER, PDF_STUB, _mail, _zip
from tests.mailcorpus.pe import pe_with_icons, pe_without_icons

# The names of issue 5 (the first thirteen checklist families); everything else is issue 20.
ISSUE5_NAMES = (
    "freemail-sender", "sender-mismatch", "display-name-impersonation", "link-text-mismatch", "lookalike-domain",
    "executable-attachment", "shortcut-attachment", "double-extension", "extension-padding",
    "filename-control-chars", "archive-threat", "archive-encrypted", "sender-auth-failure", "virus-detected",
    "virus-scan-unavailable",
)
ISSUE20_NAMES = (
    "theme-request", "theme-internal-document", "theme-public-notice", "theme-organization-notice",
    "theme-delivery-notice", "theme-credential-request", "unnatural-japanese", "non-japanese-han",
    "signature-error", "attachment-present", "icon-disguise",
)
OTHER = "hibiki-kensetsu.example.co.jp"
EN = "northwind.example.com"
DOCX = _zip([("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w:document/>")])
XLSX = _zip([("[Content_Types].xml", b"<Types/>"), ("xl/workbook.xml", b"<workbook/>")])


@dataclass(frozen=True)
class IndicatorMail:
    name: str
    raw: bytes
    truth: frozenset[str]
    natural: bool
    description: str


def sig_ja(company: str, person: str, email: str, tel: str | None = "03-6800-1234", fax: str | None = None,
           url: str | None = None) -> str:
    lines = ["", "", "――――――――――――――――――", company, person]
    if tel:
        lines.append(f"TEL: {tel}")
    if fax:
        lines.append(f"FAX: {fax}")
    lines.append(f"E-mail: {email}")
    if url:
        lines.append(f"URL: {url}")
    return "\n".join(lines) + "\n"


def sig_en(company: str, person: str, email: str, phone: str | None = "+81 3-6800-1234", url: str | None = None) -> str:
    lines = ["", "", "-- ", person, company]
    if phone:
        lines.append(f"Phone: {phone}")
    lines.append(f"Email: {email}")
    if url:
        lines.append(url)
    return "\n".join(lines) + "\n"


PARTNER_SIG = sig_ja("関門商事株式会社 営業部", "山田 花子", f"hanako@{PARTNER}", "03-6800-1234", "03-6800-1235",
                     f"https://www.{PARTNER}/")
ORG_SIG = sig_ja("関門市役所 総務課", "鈴木 次郎", f"jiro@{ORG}", "083-231-1111", None, f"https://www.{ORG}/")


def org_sig(section: str, local: str) -> str:
    return sig_ja(f"関門市役所 {section}", "担当", f"{local}@{ORG}", "083-231-1111", None, f"https://www.{ORG}/")
OTHER_SIG = sig_ja("関門建設株式会社 工務部", "田中 一郎", f"tanaka@{OTHER}", "093-511-2233", "093-511-2234")
EN_SIG = sig_en("Northwind Traders", "Alice Brown", f"alice@{EN}", "+81 3-6800-1234", f"https://www.{EN}/")


def build_indicator_corpus() -> list[IndicatorMail]:
    mails: list[IndicatorMail] = []

    def add(name: str, truth: set[str], description: str, *, natural: bool = False, **kw) -> None:
        mails.append(IndicatorMail(name, _mail(name, **kw), frozenset(truth), natural, description))

    partner = f"山田 花子 <hanako@{PARTNER}>"
    org = f"鈴木 次郎 <jiro@{ORG}>"
    other = f"田中 一郎 <tanaka@{OTHER}>"
    en = f"Alice Brown <alice@{EN}>"
    pdf = (("御見積書.pdf", "application/pdf", PDF_STUB),)

    # ---- natural business mail (must stay below the tag threshold) ---------------------------
    add("n-ja-quote-iso2022jp", set(), "partner quote follow-up, ISO-2022-JP", natural=True, frm=partner,
        subject="お見積りの件", charset="iso-2022-jp",
        body="関門市役所 総務課\n鈴木様\n\nいつもお世話になっております。関門商事の山田です。\n先日ご依頼いただいた"
             "複合機の保守について、お見積りを作成いたしました。内容をご確認のうえ、ご不明な点がございましたら"
             "お気軽にお問い合わせください。\n\n引き続きよろしくお願いいたします。" + PARTNER_SIG)
    add("n-ja-meeting-utf8", set(), "internal meeting scheduling", natural=True, frm=org, subject="打合せ日程のご相談",
        body="各位\n\nお疲れさまです。総務課の鈴木です。\n来週の打合せですが、4月10日(水) 10:00〜11:00 で"
             "いかがでしょうか。会場は本庁舎3階の第2会議室を予定しています。\nご都合の悪い方はご連絡ください。" + ORG_SIG)
    add("n-ja-invoice-sjis", {"attachment-present"}, "partner invoice with a PDF, Shift_JIS", natural=True,
        frm=partner, subject="3月分ご請求書の送付", charset="shift_jis",
        body="いつもお世話になっております。\n3月分のご請求書をお送りいたします。\nお支払期日は4月30日です。"
             "何卒よろしくお願い申し上げます。" + PARTNER_SIG,
        attachments=(("請求書_2024年3月.pdf", "application/pdf", PDF_STUB),))
    add("n-ja-minutes", {"attachment-present", "theme-internal-document"}, "internal minutes with a docx",
        natural=True, frm=org, subject="第3回検討会の議事録について",
        body="関係各位\n\nお疲れさまです。先日の検討会の議事録を添付します。\n修正点がありましたら金曜日までにお知らせください。" + ORG_SIG,
        attachments=(("第3回検討会議事録.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                      DOCX),))
    add("n-ja-koyobun-comma", set(), "prefecture notice in the official style with ，and 。", natural=True,
        frm=f"県庁 情報政策課 <seisaku@pref.example.lg.jp>", subject="調査票の提出期限について",
        body="市町村情報担当課長 様\n\n標記の件について，下記のとおり提出期限を定めましたので，お知らせします。\n"
             "なお，提出に当たっては，所定の様式を使用してください。\n\n記\n1 提出期限 令和6年5月10日\n2 提出方法 電子メール"
             + sig_ja("県 総務部 情報政策課", "担当 佐藤", "seisaku@pref.example.lg.jp", "083-933-2000"))
    add("n-ja-rare-name", set(), "one rare name character (𠮷) outside the codecs", natural=True, frm=partner,
        subject="担当者変更のご連絡",
        body="いつもお世話になっております。\n4月より弊社の担当が𠮷田に代わります。引き続きよろしくお願いいたします。" + PARTNER_SIG)
    add("n-ja-telfax-combined", set(), "small office with one TEL/FAX line", natural=True,
        frm=f"木村 <kimura@kimura-sekkei.example.jp>", subject="図面の件",
        body="お世話になっております。木村設計の木村です。\n図面の修正版は明日お持ちします。\nよろしくお願いいたします。\n\n--\n"
             "木村設計事務所\n木村 実\nTEL/FAX: 083-222-3344\nE-mail: kimura@kimura-sekkei.example.jp\n")
    add("n-ja-event-koho", set(), "city PR announcement with a link to the city site", natural=True,
        frm=f"広報課 <koho@{ORG}>", subject="市民まつり開催のお知らせ",
        body=f"市民まつりを5月3日に開催します。詳しくは市のホームページをご覧ください。\nhttps://www.{ORG}/event/\n" + org_sig("広報課", "koho"))
    add("n-ja-revised-quote", {"attachment-present", "theme-organization-notice"}, "partner replaces a quote",
        natural=True, frm=partner, subject="お見積書差し替えのお願い",
        body="いつもお世話になっております。\n先日お送りしたお見積書に誤りがございました。大変申し訳ございません。\n"
             "訂正したものを添付いたしますので、お手数ですが差し替えをお願いいたします。" + PARTNER_SIG, attachments=pdf)
    add("n-ja-survey", {"theme-request"}, "known partner asks for a survey", natural=True, frm=other,
        subject="アンケートへのご協力のお願い",
        body="いつもお世話になっております。\n弊社では品質向上のため、お取引先様にアンケートをお願いしております。\n"
             "5分ほどで終わりますので、ご協力いただけますと幸いです。" + OTHER_SIG)
    add("n-ja-personnel", {"theme-organization-notice"}, "internal personnel notice", natural=True,
        frm=f"人事課 <jinji@{ORG}>", subject="4月1日付 人事異動について",
        body="職員各位\n\n4月1日付の人事異動を庁内掲示板に掲載しました。各自ご確認ください。" + org_sig("人事課", "jinji"))
    add("n-ja-complaint-forward", {"theme-request"}, "staff forwards a citizen's complaint", natural=True, frm=org,
        subject="市民からの苦情の共有",
        body="お疲れさまです。\n昨日窓口に寄せられた苦情について、対応記録を共有します。\n対応方針は来週の課内会議で相談させてください。" + ORG_SIG)
    add("n-ja-version-numbers", set(), "Japanese with version numbers and English product names", natural=True,
        frm=partner, subject="システム更新のご案内",
        body="いつもお世話になっております。\n業務システムをVer.2.1に更新いたします。Windows 11 と macOS 14 に対応しております。\n"
             "更新作業は4月20日(土) 9:00〜12:00 を予定しております。" + PARTNER_SIG)
    add("n-ja-sister-city", set(), "sister-city exchange naming Chinese cities in Japanese kanji", natural=True,
        frm=f"国際交流課 <kokusai@{ORG}>", subject="友好都市訪問団の受入れについて",
        body="関係各位\n\n大連市および青島市からの訪問団の受入れ日程が決まりました。\n詳細は別途ご連絡いたします。" + org_sig("国際交流課", "kokusai"))
    add("n-ja-html-newsletter", set(), "HTML-only style newsletter (plain + HTML)", natural=True,
        frm=f"広報課 <koho@{ORG}>", subject="庁内報 4月号",
        body="庁内報4月号を発行しました。\n今月の特集は新庁舎の案内です。" + org_sig("広報課", "koho"),
        html="<p>庁内報4月号を発行しました。</p><p>今月の特集は新庁舎の案内です。</p>")
    add("n-ja-keigo-list", set(), "polite partner mail with a bullet list", natural=True, frm=other,
        subject="工事のお知らせ",
        body="平素より格別のご高配を賜り、厚く御礼申し上げます。\n下記のとおり工事を実施いたします。\n"
             "・日時：4月15日(月) 9時〜17時\n・場所：本庁舎駐車場\n・内容：舗装補修\nご不便をおかけしますが、何卒ご理解のほどお願い申し上げます。"
             + OTHER_SIG)
    add("n-ja-mobile", set(), "signature with a mobile number", natural=True, frm=other, subject="現場確認の件",
        body="お世話になっております。\n明日の現場確認は予定どおり伺います。到着が遅れる場合は携帯までご連絡ください。"
             + sig_ja("関門建設株式会社 工務部", "田中 一郎", f"tanaka@{OTHER}", "090-1234-5678"))
    add("n-ja-lecture-request", {"theme-request"}, "university asks for a lecture (a real request)", natural=True,
        frm=f"教務課 <kyomu@univ.example.ac.jp>", subject="講演のご依頼",
        body="関門市役所 情報政策課 御中\n\n突然のご連絡失礼いたします。関門大学教務課です。\n本学の公開講座にて、"
             "自治体のDXについてご講演をお願いできないかと考えております。\nご検討のほど、よろしくお願い申し上げます。"
             + sig_ja("関門大学 教務課", "高橋 陽子", "kyomu@univ.example.ac.jp", "083-254-0000"))
    add("n-ja-reply-quoted", set(), "reply with quoted text", natural=True, frm=partner, subject="Re: 打合せ日程のご相談",
        body="鈴木様\n\n承知いたしました。10日に伺います。\n\n> 来週の打合せですが、4月10日(水) 10:00〜11:00 で\n"
             "> いかがでしょうか。\n" + PARTNER_SIG)
    add("n-ja-schedule-iso", set(), "schedule with times, ISO-2022-JP", natural=True, frm=org, subject="研修のご案内",
        charset="iso-2022-jp",
        body="各位\n\n情報セキュリティ研修を次のとおり実施します。\n日時: 5月8日(水) 14:00〜15:30\n場所: 大会議室\n"
             "全員参加をお願いします。" + ORG_SIG)
    add("n-ja-tax-xlsx", {"attachment-present", "theme-organization-notice"}, "year-end adjustment notice with xlsx",
        natural=True, frm=f"人事課 <jinji@{ORG}>", subject="年末調整書類の提出について",
        body="職員各位\n\n年末調整の書類を添付します。記入のうえ、11月30日までに提出してください。" + org_sig("人事課", "jinji"),
        attachments=(("年末調整.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", XLSX),))
    add("n-en-meeting", set(), "English meeting follow-up", natural=True, frm=en, subject="Follow-up on our meeting",
        body="Dear Mr. Suzuki,\n\nThank you for your time yesterday. As discussed, we will send the revised proposal "
             "by Friday.\n\nBest regards," + EN_SIG)
    add("n-en-report-pdf", {"attachment-present"}, "English project report with a PDF", natural=True, frm=en,
        subject="Monthly project report",
        body="Hello,\n\nPlease find attached the monthly report for March.\n\nKind regards," + EN_SIG,
        attachments=(("report-march.pdf", "application/pdf", PDF_STUB),))
    add("n-en-order-confirmation", {"theme-delivery-notice"}, "an order the city placed is confirmed", natural=True,
        frm=en, subject="Order confirmation #4521",
        body="Dear customer,\n\nThank you for your order of 20 laptop stands. The goods will be shipped on April 12.\n"
             "\nRegards," + EN_SIG)
    add("n-en-conference", set(), "English conference invitation", natural=True, frm=en,
        subject="Smart City Forum 2024",
        body="Dear colleagues,\n\nWe are pleased to invite you to the Smart City Forum in Fukuoka on June 5.\n"
             "The programme is on our website.\n\nBest regards," + EN_SIG)
    add("n-en-hr-all-staff", {"theme-organization-notice"}, "internal English HR notice", natural=True,
        frm=f"HR <hr@{ORG}>", subject="Office closure on May 3",
        body="To all staff,\n\nThe office will be closed on May 3 for the holiday.\n" + sig_en("Kanmon City HR", "HR desk",
                                                                                              f"hr@{ORG}", "+81 83-231-1111"))
    add("n-en-complaint", {"theme-request"}, "customer complaint forwarded in English", natural=True, frm=en,
        subject="Fwd: complaint about late delivery",
        body="Hi,\n\nForwarding the complaint we received about the late delivery. Could you check the status?\n\nThanks," + EN_SIG)
    add("n-en-travel", {"theme-delivery-notice"}, "the city's own travel agent sends an itinerary", natural=True,
        frm=f"Travel desk <travel@{PARTNER}>", subject="Itinerary for your trip to Tokyo",
        body="Dear Mr. Suzuki,\n\nYour itinerary for April 18-19 is below. Train: Nozomi 12, 08:00 Shin-Shimonoseki.\n\nRegards,"
             + sig_en("Kanmon Trading Travel Desk", "Travel desk", f"travel@{PARTNER}", "+81 3-6800-1234"))
    add("n-en-chinese-name", set(), "English mail signed with a Chinese name in Han (two characters)", natural=True,
        frm=f"Zhang Wei <zhang@{EN}>", subject="Visit next week",
        body="Dear Mr. Suzuki,\n\nI look forward to visiting your office next week.\n\nBest regards,\nZhang Wei (张伟)"
             + sig_en("Northwind Traders", "Zhang Wei", f"zhang@{EN}", "+81 3-6800-1234"))

    # natural mails chosen to tempt the detectors (measured, not tuned away)
    add("n-ja-engineer-commas", set(), "engineer writing , and . consistently (a real habit)", natural=True,
        frm=other, subject="試験結果の報告",
        body="お疲れさまです.\n試験結果を報告します.\n配管の圧力試験は, すべて基準内でした.\n詳細は次回の打合せで説明します." + OTHER_SIG)
    add("n-ja-group-site", set(), "partner signature links its group web site (another registrable domain)",
        natural=True, frm=partner, subject="展示会のご案内",
        body="いつもお世話になっております。\n来月の展示会のご案内をお送りします。ぜひお立ち寄りください。"
             + sig_ja("関門商事株式会社 営業部", "山田 花子", f"hanako@{PARTNER}", "03-6800-1234", None,
                      "https://www.tsurugi-group.example.com/"))
    add("n-en-site-survey", set(), "construction 'site survey' is not a questionnaire", natural=True, frm=en,
        subject="Site survey on Monday",
        body="Hello,\n\nOur engineers will carry out the site survey on Monday at 10:00. Please arrange access.\n\nRegards," + EN_SIG)
    add("n-ja-zip-password", {"attachment-present"}, "password zip practice (PPAP): enter the zip password",
        natural=True, frm=partner, subject="資料送付",
        body="いつもお世話になっております。\n資料をお送りします。開く際はパスワードを入力してください。\n"
             "パスワードは別メールでお送りします。" + PARTNER_SIG,
        attachments=(("資料.zip", "application/zip", _zip([("資料.pdf", PDF_STUB)])),))
    add("n-ja-flu-notice", {"theme-public-notice", "theme-organization-notice"},
        "the city's own health section warns all staff (職員各位) about influenza",
        natural=True, frm=f"健康推進課 <kenko@{ORG}>", subject="インフルエンザの流行について",
        body="職員各位\n\n市内でインフルエンザの流行が始まっています。手洗いと換気にご協力ください。" + org_sig("健康推進課", "kenko"))

    # ---- themes ①-⑥ ------------------------------------------------------------------------
    gm = "Hanako <hanako.k.2024@gmail.com>"
    add("t1-interview-ja", {"theme-request"}, "interview request from a free-mail address", frm=gm,
        subject="取材のお願い", body="突然のご連絡失礼いたします。フリーライターの小林と申します。\n"
                                   "貴市のDXの取り組みについて取材のお願いをしたく、ご連絡いたしました。詳細は添付の企画書をご覧ください。\n")
    add("t1-cv-en", {"theme-request", "attachment-present"}, "job application with a CV", frm="John Smith <jsmith@mail.example.net>",
        subject="Job application - my CV attached",
        body="Dear hiring manager,\n\nI am writing to apply for the position. Please find my CV attached.\n\nJohn Smith\n",
        attachments=(("CV_John_Smith.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", DOCX),))
    add("t1-product-ja", {"theme-request", "attachment-present"}, "product enquiry with a zip",
        frm="購買担当 <kobai@trade-japan.example.net>", subject="製品に関するお問い合わせ",
        body="貴社製品について質問がございます。詳細を添付ファイルにまとめましたのでご確認ください。\n",
        attachments=(("質問事項.zip", "application/zip", _zip([("質問.pdf", PDF_STUB)])),))
    add("t2-minutes-ja", {"theme-internal-document", "attachment-present"}, "minutes and speech draft from outside",
        frm="事務局 <jimukyoku@kaigi-office.example.net>", subject="議事録および講演原稿の送付",
        body="関係者各位\n\n先日の会議の議事録と、市長の講演原稿案をお送りします。ご確認ください。\n",
        attachments=(("議事録.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", DOCX),))
    add("t2-vip-en", {"theme-internal-document"}, "VIP visit schedule in English", frm="Protocol <protocol@visit-office.example.org>",
        subject="VIP visit schedule (confidential)",
        body="Dear Sir,\n\nPlease find below the schedule of the VIP visit to your city next month. Kindly confirm.\n")
    add("t3-covid-ja", {"theme-public-notice"}, "epidemic notice from an unknown public body",
        frm="感染症対策センター <info@kansen-center.example.org>", subject="【注意喚起】新型コロナウイルスの感染拡大について",
        body="各位\n\n新型コロナウイルスの感染拡大を受け、最新の対策をまとめました。下記URLより必ずご確認ください。\n"
             "http://kansen-center.example.org/info\n")
    add("t3-quake-en", {"theme-public-notice"}, "emergency alert in English", frm="Disaster Agency <alert@disaster-info.example.org>",
        subject="Emergency alert: earthquake warning",
        body="An earthquake warning has been issued for your area. Open the attached map for evacuation routes.\n")
    add("t3-disaster-ja", {"theme-public-notice"}, "disaster information", frm="防災情報室 <bousai@bousai-info.example.net>",
        subject="災害情報・避難情報のお知らせ", body="お住まいの地域に避難情報が発令されました。詳細は下記をご確認ください。\n"
                                                    "http://bousai-info.example.net/\n")
    add("t4-personnel-ja", {"theme-organization-notice", "attachment-present"}, "personnel changes from outside",
        frm="人事部 <jinji@hr-notice.example.net>", subject="【人事異動】4月1日付",
        body="職員各位\n\n4月1日付の人事異動を添付のとおりお知らせします。\n",
        attachments=(("人事異動一覧.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", XLSX),))
    add("t4-policy-en", {"theme-organization-notice"}, "new policy for all staff", frm="Compliance <compliance@policy-desk.example.com>",
        subject="New policy: action required by all staff",
        body="Hello,\n\nA new policy on remote work takes effect today. All staff must read and acknowledge it.\n")
    add("t4-resend-ja", {"theme-organization-notice", "attachment-present"}, "document resent",
        frm="総務 <soumu@office-mail.example.net>", subject="資料の再送",
        body="先ほどお送りした資料に不備がありましたので、資料の再送をいたします。\n", attachments=pdf)
    add("t5-parcel-en", {"theme-delivery-notice"}, "parcel delivery failure", frm="Delivery <noreply@parcel-track.example.com>",
        subject="Your parcel could not be delivered",
        body="We attempted to deliver your parcel today. Use your tracking number to arrange a new delivery.\n")
    add("t5-flight-en", {"theme-delivery-notice", "attachment-present"}, "flight booking with a PDF e-ticket",
        frm="Airline <booking@air-booking.example.com>", subject="Flight booking confirmation",
        body="Thank you for your booking. Your e-ticket is attached.\n",
        attachments=(("e-ticket.pdf", "application/pdf", PDF_STUB),))
    add("t5-fuzai-ja", {"theme-delivery-notice"}, "missed-delivery notice", frm="配送センター <info@haisou.example.net>",
        subject="不在通知", body="お荷物のお届けにあがりましたが、ご不在のため持ち帰りました。再配達は下記よりお手続きください。\n")
    add("t5-takkyubin-ja", {"theme-delivery-notice"}, "delivery notice worded outside the list (宅急便)",
        frm="お届け係 <info@takkyu.example.net>", subject="宅急便のお届けについて",
        body="ご注文の品を本日お届けにあがります。受け取り日時の変更は下記からどうぞ。\n")
    add("t6-quota-ja", {"theme-credential-request"}, "mailbox over quota, Japanese",
        frm="システム管理者 <admin@mail-admin.example.net>", subject="メールボックスの容量について",
        body="メールボックスの容量が上限に近づいています。下記のページでIDとパスワードを入力してください。\n")
    add("t6-verify-en", {"theme-credential-request"}, "verify your account", frm="IT Support <support@it-helpdesk.example.com>",
        subject="Action required: verify your account",
        body="Your mailbox is full. Verify your account within 24 hours to keep receiving mail.\n")
    add("t6-bank-ja", {"theme-credential-request"}, "bank details update", frm="経理 <keiri@pay-notice.example.net>",
        subject="振込先口座変更のお知らせ", body="このたび振込先の変更がありました。新しい口座情報は添付をご確認ください。\n")
    add("t6-password-en", {"theme-credential-request"}, "password expiry", frm="Admin <admin@it-helpdesk.example.com>",
        subject="Your password expires today", body="Your password expires today. Reset your password now at the link below.\n")

    # ---- Han characters Japanese does not use ----------------------------------------------
    add("h-simplified-in-ja", {"non-japanese-han", "unnatural-japanese"}, "Japanese greeting, then simplified Chinese",
        frm="王 <wang@cn-trade.example.com>", subject="見積書の件",
        body="お世話になっております。\n请查收附件中的报价单，谢谢。如有问题请联系我们。\nよろしくお願いします。\n")
    add("h-simplified-pure", {"non-japanese-han"}, "a mail wholly in simplified Chinese", frm="李 <li@cn-trade.example.com>",
        subject="关于报告提交", body="各位同事：\n根据公司安排，请于本周五前提交报告。\n谢谢！\n")
    add("h-traditional", {"non-japanese-han"}, "traditional Chinese (Taiwan)", frm="陳 <chen@tw-trade.example.com>",
        subject="報價單", body="您好，附件為本公司報價單，請查收。如有問題請與我們聯繫。謝謝。\n")
    add("h-book-marks", {"non-japanese-han", "unnatural-japanese"}, "Japanese with 《》 and simplified forms",
        frm="サポート <support@cn-support.example.com>", subject="《重要》账户确认のお願い",
        body="お客様の账户に异常が见つかりました。《重要》下記より确认してください。\n")

    # ---- unnatural Japanese ----------------------------------------------------------------
    add("u-dear-customer", {"unnatural-japanese", "theme-credential-request"}, "translated phishing, half-width punctuation",
        frm="サポート <support@account-check.example.com>", subject="アカウントのお知らせ",
        body="親愛なるお客様, あなたのアカウントは停止されました. 下記のリンクをクリックして確認してください.\n")
    add("u-respected", {"unnatural-japanese", "theme-credential-request"}, "尊敬するお客様 … 私たちのシステム",
        frm="管理チーム <team@mailbox-team.example.com>", subject="メールボックス通知",
        body="尊敬するお客様\n私たちのシステムはあなたのメールボックスが容量が上限に達したことを検出しました。すぐに確認してください。\n")
    add("u-particles", {"unnatural-japanese", "theme-credential-request"}, "particle collision",
        frm="セキュリティ <security@login-notice.example.com>", subject="重要なお知らせ",
        body="お客様のアカウントをが確認する必要があります。今すぐログインしてください。確認されない場合、利用が制限されます。\n")
    add("u-spaced", {"unnatural-japanese"}, "word-by-word spacing", frm="通知 <notice@info-update.example.com>",
        subject="情報更新", body="お 客様 の 情報 を 更新 して ください 。 期限 は 本日 です 。 ご 協力 を お願い します 。\n")
    add("u-commas", {"unnatural-japanese"}, "mixed 、 and ，, sentences ended with .",
        frm="お知らせ <info@notice-center.example.com>", subject="ご利用ありがとうございます",
        body="いつも、ご利用ありがとうございます，本日は，大切なお知らせがあります、必ずご確認ください.\n")
    add("u-subtle", {"unnatural-japanese"}, "subtle machine translation (no listed sign)",
        frm="配信 <news@letter-service.example.com>", subject="登録の確認",
        body="この電子メールはあなたに送信されました、なぜならあなたは私たちのサービスに登録しているからです。"
             "もしあなたが登録していないなら、このメールを無視してください。\n")

    # ---- signature errors ------------------------------------------------------------------
    add("s-invalid-tel", {"signature-error"}, "TEL 03-0000-0000 is not a number", frm=partner, subject="ご連絡",
        body="いつもお世話になっております。ご確認をお願いいたします。"
             + sig_ja("関門商事株式会社 営業部", "山田 花子", f"hanako@{PARTNER}", "03-0000-0000"))
    add("s-tel-equals-fax", {"signature-error"}, "the same number as TEL and FAX", frm=partner, subject="資料のご確認",
        body="いつもお世話になっております。資料をご確認ください。"
             + sig_ja("関門商事株式会社 営業部", "山田 花子", f"hanako@{PARTNER}", "03-6800-1234", "03-6800-1234"))
    add("s-domain-differs", {"signature-error"}, "signature web site in another domain", frm=partner, subject="新製品のご案内",
        body="いつもお世話になっております。新製品のご案内です。"
             + sig_ja("関門商事株式会社 営業部", "山田 花子", f"hanako@{PARTNER}", "03-6800-1234", None,
                      "https://www.kanmon-shoji.example.com/"))
    add("s-invalid-fax", {"signature-error"}, "FAX number too short", frm=other, subject="工程表",
        body="お世話になっております。工程表の件です。"
             + sig_ja("関門建設株式会社 工務部", "田中 一郎", f"tanaka@{OTHER}", "093-511-2233", "0120-00-000"))
    add("s-invalid-en", {"signature-error"}, "English signature with an invalid number", frm=en, subject="Quick question",
        body="Hi,\n\nCould you send me the latest figures?\n\nThanks," + sig_en("Northwind Traders", "Alice Brown", f"alice@{EN}",
                                                                                "+81 3 0000 1111"))
    add("s-fullwidth-iso", {"signature-error"}, "full-width digits, ISO-2022-JP, invalid number", frm=partner,
        subject="ご確認のお願い", charset="iso-2022-jp",
        body="いつもお世話になっております。ご確認をお願いいたします。\n\n――――――――――――――――――\n関門商事株式会社\n山田 花子\n"
             f"ＴＥＬ：０３−００００−１２３４\nE-mail: hanako@{PARTNER}\n")

    # ---- attachments and icon disguise -----------------------------------------------------
    icons = pe_with_icons(2)
    add("i-pe-icons-pdf", {"attachment-present", "icon-disguise"}, "PE with icons named .pdf", frm=partner,
        subject="請求書送付", body="請求書をお送りします。" + PARTNER_SIG, attachments=(("請求書.pdf", "application/pdf", icons),))
    add("i-pe-icons-folder", {"attachment-present", "icon-disguise"}, "PE with icons named like a folder", frm=partner,
        subject="共有資料", body="共有資料です。" + PARTNER_SIG, attachments=(("共有資料", "application/octet-stream", icons),))
    add("i-pe-icons-docx-exe", {"attachment-present", "icon-disguise"}, "PE with icons named .docx.exe", frm=partner,
        subject="報告書", body="報告書です。" + PARTNER_SIG, attachments=(("報告書.docx.exe", "application/octet-stream", icons),))
    add("i-pe-icons-rlo", {"attachment-present", "icon-disguise"}, "PE with icons, RLO name shown as .docx", frm=partner,
        subject="報告書", body="報告書です。" + PARTNER_SIG,
        attachments=(("報告書\u202excod.exe", "application/octet-stream", icons),))
    add("i-pe-icons-jpg", {"attachment-present", "icon-disguise"}, "PE with icons sent as image/jpeg", frm=partner,
        subject="写真", body="写真です。" + PARTNER_SIG, attachments=(("photo.jpg", "image/jpeg", icons),))
    add("i-pe-noicon-pdf", {"attachment-present"}, "PE without icons named .pdf (executable-attachment only)",
        frm=partner, subject="請求書送付", body="請求書をお送りします。" + PARTNER_SIG,
        attachments=(("請求書.pdf", "application/pdf", pe_without_icons()),))
    add("i-pe-icons-honest", {"attachment-present"}, "PE with icons honestly named setup.exe", frm=partner,
        subject="ツール", body="ツールです。" + PARTNER_SIG, attachments=(("setup.exe", "application/octet-stream", icons),))
    return mails


@dataclass(frozen=True)
class Score:
    name: str
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def scores(results: dict[str, set[str]], mails: list[IndicatorMail]) -> list[Score]:
    """Per indicator, over the whole corpus: ``results`` maps a mail name to what fired."""
    out = []
    for name in ISSUE20_NAMES:
        tp = sum(1 for m in mails if name in m.truth and name in results[m.name])
        fp = sum(1 for m in mails if name not in m.truth and name in results[m.name])
        fn = sum(1 for m in mails if name in m.truth and name not in results[m.name])
        out.append(Score(name, tp, fp, fn))
    return out


def run(policy_path=None) -> tuple[list[IndicatorMail], dict[str, set[str]], dict[str, int]]:
    from pathlib import Path

    from gateway.mail.engine import evaluate_message
    from gateway.mail.policy import load_mail_policy

    policy = load_mail_policy(policy_path or Path(__file__).resolve().parents[2] / "policies" / "mail.yaml")
    mails = build_indicator_corpus()
    fired, score = {}, {}
    for m in mails:
        verdict = evaluate_message(m.raw, policy)
        fired[m.name] = {i.name for i in verdict.indicators}
        score[m.name] = verdict.score
    return mails, fired, score


def table(rows: list[Score]) -> str:
    lines = ["| indicator | TP | FP | FN | precision | recall |", "|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| `{s.name}` | {s.tp} | {s.fp} | {s.fn} | {s.precision:.2f} | {s.recall:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    corpus, fired_by, scores_by = run()
    print(f"{len(corpus)} mails ({sum(m.natural for m in corpus)} natural business mails)\n")
    print(table(scores(fired_by, corpus)))
    if "-v" in sys.argv:
        for m in corpus:
            got = fired_by[m.name] & set(ISSUE20_NAMES)
            if got != m.truth:
                print(f"{m.name}: missed {sorted(m.truth - got)} false {sorted(got - m.truth)}")
    natural_max = max(scores_by[m.name] for m in corpus if m.natural)
    print(f"\nhighest score of a natural business mail: {natural_max}")
