"""The issue 20 indicators one by one (IPA SME sample 7.4): themes ①-⑥ from the phrase list
files, unnatural Japanese, Han characters Japanese does not use, signature errors, any
attachment and icon disguise — in Japanese mails (ISO-2022-JP, Shift_JIS, UTF-8) and English."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from gateway.mail.content import MailView, subject_of
from gateway.mail.engine import evaluate_message
from gateway.mail.hanzi import is_japanese_han, non_japanese_han
from gateway.mail.indicators import ATTACHMENT_NAMES, MailAction
from gateway.mail.message import parse_message, readable_text
from gateway.mail.pe_icons import document_claim, pe_icons
from gateway.mail.policy import DECOY_EXTENSIONS, EXECUTABLE_EXTENSIONS, load_mail_policy
from gateway.mail.signature import signature_problems
from gateway.mail.themes import ThemeMatcher, parse_theme_list
from gateway.mail.unnatural import is_unnatural, unnatural_signs
from gateway.yamlsource import SourceErrors
from tests.mailcorpus.build import PARTNER, PDF_STUB, _mail
from tests.mailcorpus.pe import build_pe, pe_with_icons, pe_without_icons

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
FROM = f"山田 花子 <hanako@{PARTNER}>"


def fired(raw: bytes, policy=POLICY) -> set[str]:
    return {i.name for i in evaluate_message(raw, policy).indicators}


def evidence(raw: bytes, name: str):
    return [i.evidence for i in evaluate_message(raw, POLICY).indicators if i.name == name]


# -- themes: the list files ------------------------------------------------------------------

def test_theme_list_errors_are_bilingual_with_file_and_line():
    text = ("# comment\nrequest: 履歴書\nnonsense: x y\nrequest 履歴書\nrequest: 履\nrequest: 履歴書\n"
            "credentials: pass\u202eword\n" + "internal: " + "あ" * 201 + "\n")
    entries, errors = parse_theme_list(text, "themes.txt")
    assert [e.phrase for e in entries] == ["履歴書"]
    lines = [e.line for e in errors]
    assert lines == [3, 4, 5, 6, 7, 8]
    for e in errors:
        assert str(e).startswith("themes.txt:") and e.ja and e.message and e.ja != e.message
    assert "duplicate phrase (first on line 2)" in errors[3].message and "重複" in errors[3].ja


def test_policy_loads_theme_phrases_from_its_list_files(tmp_path):
    for name in ("mail.yaml", "freemail-domains.txt"):
        shutil.copy(REPO / "policies" / name, tmp_path / name)
    (tmp_path / "mail-themes.txt").write_text("org-notice: 新年度の座席表\n", encoding="utf-8")
    policy = load_mail_policy(tmp_path / "mail.yaml")
    assert [p.phrase for p in policy.themes.phrases] == ["新年度の座席表"]
    raw = _mail("seat", frm=FROM, subject="新年度の座席表", body="ご確認ください。\n")
    assert "theme-organization-notice" in fired(raw, policy)
    assert "theme-organization-notice" not in fired(_mail("seat2", frm=FROM, subject="職員各位", body="x\n"), policy)


def test_policy_reports_a_missing_or_bad_theme_list(tmp_path):
    for name in ("mail.yaml", "freemail-domains.txt"):
        shutil.copy(REPO / "policies" / name, tmp_path / name)
    with pytest.raises(SourceErrors) as exc:
        load_mail_policy(tmp_path / "mail.yaml")
    (err,) = exc.value.errors
    assert "themes.lists[0]: " in str(err) and "を読めません: ファイルを読めません: ファイルがありません" in str(err)
    assert f"/ cannot read {tmp_path / 'mail-themes.txt'}: cannot read file: file not found" in str(err)
    (tmp_path / "mail-themes.txt").write_text("request: 履歴書\nbogus: x\n", encoding="utf-8")
    with pytest.raises(SourceErrors) as exc:
        load_mail_policy(tmp_path / "mail.yaml")
    (err,) = exc.value.errors
    assert str(err).startswith(f"{tmp_path / 'mail-themes.txt'}:2:")


def test_shipped_theme_list_loads_clean_and_has_every_theme_in_both_languages():
    text = (REPO / "policies" / "mail-themes.txt").read_text(encoding="utf-8")
    entries, errors = parse_theme_list(text, "mail-themes.txt")
    assert not errors
    for theme in ("request", "internal", "public-notice", "org-notice", "delivery", "credentials"):
        phrases = [e.phrase for e in entries if e.theme == theme]
        assert any(p.isascii() for p in phrases) and any(not p.isascii() for p in phrases), theme


def test_matcher_normalizes_width_and_case_and_respects_word_ends():
    entries, _ = parse_theme_list("request: my cv\ncredentials: パスワードを入力\n", "t.txt")
    matcher = pickle.loads(pickle.dumps(ThemeMatcher(tuple(entries))))   # as the judge pool sends it
    assert [p.phrase for p in matcher.match("Please see MY ＣＶ attached")] == ["my cv"]
    assert matcher.match("my cvs are here") == []
    assert [p.phrase for p in matcher.match("ﾊﾟｽﾜｰﾄﾞを入力してください")] == ["パスワードを入力"]


@pytest.mark.parametrize("charset", ["iso-2022-jp", "shift_jis", "utf-8"])
def test_themes_in_japanese_encodings(charset):
    raw = _mail(f"theme-{charset}", frm="採用担当 <saiyo@jobs.example.net>", subject="履歴書の送付",
                body="メールボックスの容量が上限に達しました。\n人事異動のお知らせです。\n", charset=charset)
    names = fired(raw)
    assert {"theme-request", "theme-credential-request", "theme-organization-notice"} <= names
    (ev,) = evidence(raw, "theme-request")
    assert "件名に「履歴書」" in ev.ja and "subject has '履歴書'" in ev.en


def test_themes_in_english_and_in_attachment_names():
    raw = _mail("theme-en", frm="Courier <noreply@parcel.example.com>", subject="Notice",
                body="We could not deliver your parcel.\n",
                attachments=(("flight booking.pdf", "application/pdf", PDF_STUB),))
    names = fired(raw)
    assert "theme-delivery-notice" in names
    (ev,) = evidence(raw, "theme-delivery-notice")
    assert "attachment name has 'flight booking'" in ev.en and "body has 'your parcel'" in ev.en


def test_a_mail_without_theme_words_fires_no_theme():
    raw = _mail("plain", frm=FROM, subject="打合せ", body="明日の打合せは10時からです。\n")
    assert not {n for n in fired(raw) if n.startswith("theme-")}


# -- Han characters Japanese does not use ----------------------------------------------------

def test_codecs_decide_which_han_are_japanese():
    assert is_japanese_han("吉") and is_japanese_han("髙") and is_japanese_han("﨑") and is_japanese_han("學")
    assert not is_japanese_han("这") and not is_japanese_han("请") and not is_japanese_han("𠮷")


def test_one_rare_name_does_not_fire_three_simplified_characters_do():
    assert not non_japanese_han("𠮷野家の髙橋です").fires(3)
    assert not non_japanese_han("張偉 (张伟) です").fires(3)
    assert non_japanese_han("请查收这个").fires(3)
    report = non_japanese_han("《报告》をご覧ください")          # 告 is a JIS kanji, 报 is not
    assert report.chars == ("报",) and report.punctuation == ("《", "》") and report.fires(3)


@pytest.mark.parametrize("charset", ["utf-8", "gb2312"])
def test_simplified_chinese_mail_fires(charset):
    raw = _mail(f"han-{charset}", frm="李 <li@cn.example.com>", subject="关于报告",
                body="各位同事：\n根据公司安排，请于本周五前提交报告。\n谢谢！\n", charset=charset)
    assert "non-japanese-han" in fired(raw)
    (ev,) = evidence(raw, "non-japanese-han")
    assert "Han characters Japanese does not use" in ev.en and "日本語では使われない漢字" in ev.ja


@pytest.mark.parametrize("charset", ["iso-2022-jp", "shift_jis", "utf-8"])
def test_japanese_mail_in_any_encoding_does_not_fire_han(charset):
    raw = _mail(f"ja-{charset}", frm=FROM, subject="ご連絡", charset=charset,
                body="渡邉様\n\nいつもお世話になっております。國學院大學の件、承知いたしました。\n")
    assert "non-japanese-han" not in fired(raw)


def test_han_threshold_comes_from_the_policy(tmp_path):
    for name in ("freemail-domains.txt", "mail-themes.txt"):
        shutil.copy(REPO / "policies" / name, tmp_path / name)
    text = (REPO / "policies" / "mail.yaml").read_text(encoding="utf-8").replace("  min_chars: 3", "  min_chars: 1")
    (tmp_path / "mail.yaml").write_text(text, encoding="utf-8")
    policy = load_mail_policy(tmp_path / "mail.yaml")
    raw = _mail("one", frm=FROM, subject="x", body="担当の𠮷田です。\n")
    assert "non-japanese-han" in fired(raw, policy) and "non-japanese-han" not in fired(raw)


# -- unnatural Japanese ----------------------------------------------------------------------

@pytest.mark.parametrize("text, sign", [
    ("親愛なるお客様、ご確認をお願いいたします。本日中にお願いします。", "translated-phrase"),
    ("お客様のアカウントをが確認する必要があります。ご対応ください。", "particle-collision"),
    ("お 客様 の 情報 を 更新 して ください 。 ご 協力 を お願い します 。", "spaced-kana"),
])
def test_each_strong_sign_alone_makes_text_unnatural(text, sign):
    signs = unnatural_signs(text)
    assert sign in [s.name for s in signs] and is_unnatural(signs)


def test_chinese_han_inside_japanese_is_a_sign_one_rare_name_only_a_weak_one():
    rare = unnatural_signs("担当の𠮷田です。よろしくお願いいたします。")
    assert [(s.name, s.points) for s in rare] == [("chinese-han", 1)] and not is_unnatural(rare)
    mixed = unnatural_signs("お客様の账户に异常が见つかりました。下記より确认してください。")
    assert ("chinese-han", 2) in [(s.name, s.points) for s in mixed] and is_unnatural(mixed)


def test_weak_signs_need_company():
    one = unnatural_signs("いつもお世話になっております。ご確認ください.")
    assert [s.name for s in one] == ["half-width-punctuation"] and not is_unnatural(one)
    two = unnatural_signs("いつも、お世話になっております，ご確認ください.")
    assert {s.name for s in two} == {"half-width-punctuation", "mixed-commas"} and is_unnatural(two)


@pytest.mark.parametrize("text", [
    "いつもお世話になっております。見積書を添付いたしますので、ご確認ください。",
    "標記の件について，下記のとおり定めましたので，お知らせします。",          # 公用文: ， with 。
    "業務システムをVer.2.1に更新いたします。Windows 11 と macOS 14 に対応しております。",
    "Dear customer, thank you. Your order has shipped.",                  # not Japanese: not judged
])
def test_natural_or_non_japanese_text_is_not_unnatural(text):
    assert not is_unnatural(unnatural_signs(text))


@pytest.mark.parametrize("charset", ["iso-2022-jp", "shift_jis", "utf-8"])
def test_unnatural_japanese_through_the_engine(charset):
    raw = _mail(f"mt-{charset}", frm="サポート <support@acct.example.com>", subject="お知らせ", charset=charset,
                body="尊敬するお客様\n私たちのシステムはあなたのメールボックスを確認しました。\n")
    assert "unnatural-japanese" in fired(raw)
    (ev,) = evidence(raw, "unnatural-japanese")
    assert "translated-phrase" in ev.en and "不自然" in ev.ja


# -- signature errors ------------------------------------------------------------------------

SIG = "\n\n--\n関門商事株式会社\n山田 花子\n{lines}\nE-mail: hanako@" + PARTNER + "\n"


@pytest.mark.parametrize("lines, kinds", [
    ("TEL: 03-6800-1234\nFAX: 03-6800-1235", []),
    ("TEL/FAX: 083-222-3344", []),                               # one shared line, labelled so
    ("TEL: 03-0000-0000", ["invalid-number"]),
    ("電話 03-6800-1234 / FAX 03-6800-1234", ["phone-as-fax"]),
    ("ＴＥＬ：０３－００００－１２３４", ["invalid-number"]),        # full width, NFKC first
    ("TEL: 03-6800-1234\nURL: https://www.other-corp.example.com/", ["domain-differs"]),
    ("TEL: 03-6800-1234\nURL: https://www." + PARTNER + "/", []),
    ("携帯: 090-1234-5678", []),
    ("Phone: +81 3 0000 1111", ["invalid-number"]),
    ("Hotel Kanmon 0000-00-0000", []),                          # "tel" inside a word is no label
    ("TEL: 03-6800-1234 (内線 567)", []),
])
def test_signature_problems(lines, kinds):
    block = SIG.format(lines=lines).split("--\n", 1)[1]
    assert [p.kind for p in signature_problems(block, PARTNER)] == kinds


@pytest.mark.parametrize("charset", ["iso-2022-jp", "shift_jis", "utf-8"])
def test_signature_error_through_the_engine(charset):
    raw = _mail(f"sig-{charset}", frm=FROM, subject="ご連絡", charset=charset,
                body="いつもお世話になっております。" + SIG.format(lines="TEL: 03-6800-1234\nFAX: 03-6800-1234"))
    assert "signature-error" in fired(raw)
    (ev,) = evidence(raw, "signature-error")
    assert "same number as phone and FAX" in ev.en and "同じ" in ev.ja


def test_english_signature_with_a_valid_number_is_fine():
    raw = _mail("sig-en", frm="Alice <alice@northwind.example.com>", subject="Hello",
                body="Hi,\n\nSee you soon.\n\n-- \nAlice\nNorthwind\nPhone: +81 3-6800-1234\nhttps://www.northwind.example.com/\n")
    assert "signature-error" not in fired(raw)


# -- any attachment, icon disguise -----------------------------------------------------------

def test_any_attachment_fires_low_and_is_never_removed_for_being_one():
    raw = _mail("att", frm=FROM, subject="資料", body="資料です。\n",
                attachments=(("資料.pdf", "application/pdf", PDF_STUB), ("表.csv", "text/csv", b"a,b\n")))
    verdict = evaluate_message(raw, POLICY)
    (ind,) = [i for i in verdict.indicators if i.name == "attachment-present"]
    assert "2 attachment(s)" in ind.evidence.en and "2 個" in ind.evidence.ja
    assert ind.weight < POLICY.thresholds[MailAction.TAG] and verdict.action == MailAction.DELIVER
    assert "attachment-present" not in ATTACHMENT_NAMES and "icon-disguise" in ATTACHMENT_NAMES
    assert "attachment-present" not in fired(_mail("noatt", frm=FROM, subject="x", body="y\n"))


def test_pe_icons_are_read_with_pefile():
    assert pe_icons(pe_with_icons(3)).icons == 3
    assert pe_icons(pe_without_icons()) is None and pe_icons(build_pe()) is None
    assert pe_icons(pe_with_icons(3)[:0x208]) is None        # resource directory cut off: no error
    assert pe_icons(b"MZ" + b"\xff" * 500) is None            # not a PE at all
    assert pe_icons(PDF_STUB) is None


@pytest.mark.parametrize("names, ctype, claim", [
    (("請求書.pdf",), "application/pdf", "name shown as .pdf"),
    (("共有資料",), "application/octet-stream", "name without extension (folder-like)"),
    (("報告書.docx.exe",), "application/octet-stream", "name .docx.exe"),
    (("報告書\u202excod.exe",), "application/octet-stream", "name shown as .docx"),
    (("setup.exe",), "application/msword", "type application/msword"),
    (("setup.exe",), "application/octet-stream", None),
    (("tool.scr",), "application/x-msdownload", None),
])
def test_what_an_attachment_claims_to_be(names, ctype, claim):
    assert document_claim(names, ctype, DECOY_EXTENSIONS, EXECUTABLE_EXTENSIONS) == claim


@pytest.mark.parametrize("charset, subject, body", [
    ("iso-2022-jp", "請求書", "請求書です。\n"), ("shift_jis", "請求書", "請求書です。\n"),
    ("utf-8", "Invoice", "Please find the invoice attached.\n")])
def test_icon_disguise_in_japanese_and_english_mail(charset, subject, body):
    raw = _mail(f"icon-{charset}", frm=FROM, subject=subject, body=body, charset=charset,
                attachments=(("請求書.pdf", "application/pdf", pe_with_icons(2)),))
    assert {"icon-disguise", "attachment-present"} <= fired(raw)


def test_english_machine_like_text_is_not_judged_as_japanese():
    raw = _mail("en-mt", frm="Support <support@acct.example.com>", subject="Notice",
                body="Dear valued customer, your account your account has been been suspended.\n")
    assert "unnatural-japanese" not in fired(raw)


def test_icon_disguise_through_the_engine():
    raw = _mail("icon", frm=FROM, subject="請求書", body="請求書です。\n",
                attachments=(("請求書.pdf", "application/pdf", pe_with_icons(2)),))
    verdict = evaluate_message(raw, POLICY)
    names = {i.name for i in verdict.indicators}
    assert {"icon-disguise", "executable-attachment", "attachment-present"} <= names
    assert verdict.action.rank >= MailAction.NEUTRALIZE.rank
    (ev,) = evidence(raw, "icon-disguise")
    assert "posing as a document" in ev.en and "文書を装う" in ev.ja
    honest = _mail("icon2", frm=FROM, subject="ツール", body="ツールです。\n",
                   attachments=(("setup.exe", "application/octet-stream", pe_with_icons(2)),))
    assert "icon-disguise" not in fired(honest)
    plain_pe = _mail("icon3", frm=FROM, subject="請求書", body="請求書です。\n",
                     attachments=(("請求書.pdf", "application/pdf", pe_without_icons()),))
    assert "icon-disguise" not in fired(plain_pe) and "executable-attachment" in fired(plain_pe)


def test_outbound_mail_is_not_judged_on_the_new_content_indicators():
    from gateway.mail.engine import MailContext
    raw = _mail("out", frm=FROM, subject="履歴書の送付", body="履歴書です。\n",
                attachments=(("履歴書.pdf", "application/pdf", PDF_STUB),))
    assert evaluate_message(raw, POLICY, MailContext(direction="outbound")).indicators == ()


def test_view_subject_survives_a_hostile_header():
    mail = parse_message(b"From: a@b.example\r\nSubject: =?utf-8?q?=E5=B1=A5=E6=AD=B4=E6=9B=B8?=\r\n\r\nx\r\n")
    assert subject_of(mail) == "履歴書"
    assert MailView(mail, subject_of(mail), readable_text(mail), None).subject == "履歴書"


def test_pefile_sees_only_files_whose_headers_name_a_resource_directory():
    from gateway.mail.pe_icons import has_resource_directory
    from tests.mailcorpus.build import PE_STUB
    assert has_resource_directory(pe_with_icons(1)) and has_resource_directory(pe_without_icons())
    assert not has_resource_directory(build_pe()) and not has_resource_directory(PE_STUB)
    assert not has_resource_directory(b"MZ" + b"\x00" * 58 + b"\xff\xff\xff\x7f")   # e_lfanew far outside
    broken = bytearray(pe_with_icons(2))
    broken[0x200:0x240] = b"\xff" * 0x40                       # resource directory garbage
    assert pe_icons(bytes(broken)) is None


def test_pefile_reads_at_most_a_few_pe_attachments_per_message():
    from gateway.mail.pe_icons import MAX_PE_PER_MESSAGE
    many = tuple((f"資料{i}.pdf", "application/pdf", pe_with_icons(1)) for i in range(MAX_PE_PER_MESSAGE + 4))
    verdict = evaluate_message(_mail("many", frm=FROM, subject="資料", body="x\n", attachments=many), POLICY)
    icons = [i for i in verdict.indicators if i.name == "icon-disguise"]
    assert len(icons) == MAX_PE_PER_MESSAGE
    assert len([i for i in verdict.indicators if i.name == "executable-attachment"]) == MAX_PE_PER_MESSAGE + 4


def test_web_addresses_count_only_in_a_marked_signature():
    unsigned = _mail("nosig", frm=FROM, subject="ご案内", body="詳しくは次をご覧ください。\nhttps://www.other-corp.example.com/\n")
    assert "signature-error" not in fired(unsigned)
    signed = _mail("sig", frm=FROM, subject="ご案内", body="ご案内です。\n\n――――――――――\n関門商事\nhttps://www.other-corp.example.com/\n")
    assert "signature-error" in fired(signed)


def test_the_largest_theme_list_loads_and_compiles_within_bounds():
    import time

    from gateway.mail.themes import MAX_PHRASES
    text = "".join(f"request: 語句{i}番の依頼\n" if i % 2 else f"delivery: phrase number {i}\n"
                   for i in range(MAX_PHRASES + 1))
    start = time.process_time()
    entries, errors = parse_theme_list(text, "big.txt")
    matcher = ThemeMatcher(tuple(entries))
    assert [p.phrase for p in matcher.match("about phrase number 19998 today")] == ["phrase number 19998"]
    assert time.process_time() - start < 2.0          # measured 0.17 s: parse 0.08, RE2 set 0.10
    assert len(entries) == MAX_PHRASES
    (err,) = errors
    assert err.line == MAX_PHRASES + 1 and "too many phrases" in err.message and "多すぎ" in err.ja
