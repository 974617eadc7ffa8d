"""Issue #19: the staff pages' message catalogs, templates and settings.

Every message the templates and the code mark (``_``, ``both``, ``N_``) is in the Japanese
catalog with a translation and the same placeholders; the catalog has no stale entries; a
broken or incomplete catalog stops the start with a bilingual error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from gateway.config import load_config_text
from gateway.pages import catalog
from gateway.pages.catalog import CatalogError, LANGS, po_path
from gateway.pages.kinds import CATEGORY_MESSAGES, GENERAL_MESSAGE, PageKind, StaffMessage, page_kind, staff_message
from gateway.pages.organization import Helpdesk, Organization
from gateway.pages.render import render_block
from gateway.policy import compile_text
from gateway.verdict import RULE_FAIL_CLOSED, RULE_QUARANTINE, RULE_UNDECIDED, Action, Stage, Verdict
from gateway.yamlsource import SourceErrors

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _source_messages() -> set[str]:
    method_map = [("gateway/pages/templates/**.html", "jinja2.ext:babel_extract"),
                  ("gateway/**.py", "python"), ("addons/**.py", "python")]
    keywords = {"_": None, "both": None, "N_": None}
    found = set()
    for _file, _line, message, _comments, _ctx in extract_from_dir(str(ROOT), method_map, keywords=keywords,
                                                                   options_map={}):
        if isinstance(message, str) and message:
            found.add(message)
    return found


def _ja_catalog():
    with po_path("ja").open("rb") as f:
        return {m.id: m for m in read_po(f, locale="ja") if m.id}


def test_every_message_has_japanese_and_english_with_the_same_placeholders():
    source = _source_messages()
    ja = _ja_catalog()
    assert len(source) > 60, "the extraction found the pages' messages"
    missing = sorted(source - set(ja))
    assert missing == [], f"messages without a Japanese entry (run pybabel update, gateway/pages/__init__.py): {missing}"
    for msgid in source:
        entry = ja[msgid]
        assert msgid.strip(), "English text (the message id) is not empty"
        assert entry.string and entry.string.strip() and not entry.fuzzy, f"no Japanese text for {msgid!r}"
        assert entry.string != msgid, f"Japanese text is the English one: {msgid!r}"
        assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", entry.string), f"not Japanese: {entry.string!r}"
        assert sorted(PLACEHOLDER.findall(entry.string)) == sorted(PLACEHOLDER.findall(msgid)), msgid


def test_the_catalog_has_no_stale_entries():
    stale = sorted(set(_ja_catalog()) - _source_messages())
    assert stale == [], f"entries no template or code uses any more: {stale}"


def test_every_built_in_category_message_renders_in_both_languages():
    ja, en = LANGS
    for name, message in [*CATEGORY_MESSAGES.items(), ("general", GENERAL_MESSAGE)]:
        assert ja.gettext(message) != message and en.gettext(message) == message, name


def test_an_incomplete_or_broken_catalog_refuses_to_load(tmp_path, monkeypatch):
    good = po_path("ja").read_text(encoding="utf-8")
    lang_dir = tmp_path / "ja" / "LC_MESSAGES"
    lang_dir.mkdir(parents=True)
    monkeypatch.setattr(catalog.CATALOG, "locale_dir", tmp_path)
    # one translation emptied
    first = re.search(r'msgstr "[^"\n]+"', good.split('msgid "Request ID"', 1)[1]).group(0)
    (lang_dir / "kanmon.po").write_text(good.replace('msgid "Request ID"\n' + first, 'msgid "Request ID"\nmsgstr ""'),
                                        encoding="utf-8")
    catalog.translations.cache_clear()
    try:
        with pytest.raises(CatalogError) as exc:
            catalog.translations("ja")
        assert "Request ID" in exc.value.text.en and "訳のないメッセージ" in exc.value.text.ja
        (lang_dir / "kanmon.po").unlink()   # gone (a broken install)
        catalog.translations.cache_clear()
        with pytest.raises(CatalogError) as exc:
            catalog.translations("ja")
        assert "kanmon.po" in exc.value.text.en and "読めません" in exc.value.text.ja
    finally:
        catalog.translations.cache_clear()


# -- kinds and staff messages --------------------------------------------------------------

def _v(rule: str | None, category: str | None = None) -> Verdict:
    return Verdict(Action.BLOCK, rule, "rule x (block): host in list y", Stage.REQUEST, category=category)


def test_page_kinds_and_their_status():
    assert page_kind(_v(RULE_FAIL_CLOSED)) is PageKind.FAULT and page_kind(_v(RULE_UNDECIDED)) is PageKind.FAULT
    assert page_kind(_v(RULE_QUARANTINE)) is PageKind.QUARANTINE
    assert page_kind(_v("webmail")) is PageKind.POLICY
    assert page_kind(_v("webmail"), signature="Eicar") is PageKind.INFECTED
    assert page_kind(_v(RULE_FAIL_CLOSED), signature="Eicar") is PageKind.FAULT, "a fault is a fault"


POLICY = """
version: 1
categories:
  storage: {description_ja: 承認済みのストレージを使ってください, alternative: "https://box.example.lg.jp/"}
rules:
  - {id: webmail, action: block, category: webmail, description: "Use the city mail.",
     description_ja: 市のメールを使ってください, alternative: "https://mail.example.lg.jp/", match: {domain: a.test}}
  - {id: old-style, action: block, category: storage, description: 旧形式の日本語の説明, match: {domain: b.test}}
  - {id: bare, action: block, category: sns, match: {domain: c.test}}
  - {id: plain, action: block, match: {domain: d.test}}
"""


def test_staff_message_comes_from_the_rule_then_the_category_then_the_catalog():
    snap = compile_text(POLICY)
    ja, en = LANGS

    def staff(rule_id):
        info = snap.rule(rule_id)
        return staff_message(_v(rule_id, info.category), info, snap.categories)

    assert staff("webmail") == StaffMessage("市のメールを使ってください", "Use the city mail.", "https://mail.example.lg.jp/")
    old = staff("old-style")   # an older policy's Japanese description is shown as Japanese, not under English
    assert old.ja == "旧形式の日本語の説明" and old.en == en.gettext(CATEGORY_MESSAGES["storage"])
    assert old.alternative == "https://box.example.lg.jp/"
    assert staff("bare") == StaffMessage(ja.gettext(CATEGORY_MESSAGES["sns"]), CATEGORY_MESSAGES["sns"], None)
    assert staff("plain") == StaffMessage(ja.gettext(GENERAL_MESSAGE), GENERAL_MESSAGE, None)


@pytest.mark.parametrize("value", ["javascript:alert(1)", "mail.example.lg.jp", "https://", "https://a b/",
                                   'https://x/"onmouseover="x'])
def test_an_alternative_that_is_not_a_web_link_is_refused_with_its_line(value):
    text = POLICY.replace('"https://mail.example.lg.jp/"', f"'{value}'")
    with pytest.raises(SourceErrors) as exc:
        compile_text(text)
    err = exc.value.errors[0]
    assert err.line == 7 and "alternative" in err.dotted
    assert "http:// or https:// URL" in err.message and "URL で書いてください" in (err.ja or "")


def test_the_dns_stage_answers_the_sinkhole_unless_the_policy_says_nxdomain():
    assert compile_text(POLICY).dns_block_mode("webmail") == "sinkhole"
    snap = compile_text(POLICY.replace("version: 1", "version: 1\nsettings: {dns_block: nxdomain}"))
    assert snap.dns_block_mode("webmail") == "nxdomain"


def test_block_page_escapes_and_wraps_only_the_url():
    org = Organization("例<市>", "Ex & Co", None, Helpdesk("課", "desk", mail="help@example.lg.jp"))
    page = render_block(PageKind.POLICY, organization=org, url="http://x.test/<script>", device_id="d1",
                        rule_id="r", category=None, explain="e", request_id="rid-1",
                        staff=StaffMessage("<b>ja</b>", "en", "https://alt.example/?a=1&b=2"))
    assert "<script>" not in page and "<b>ja" not in page and "例&lt;市&gt;" in page and "Ex &amp; Co" in page
    assert 'href="https://alt.example/?a=1&amp;b=2"' in page
    assert "break-all" not in page and ".url { overflow-wrap: anywhere; }" in page
    assert re.search(r'id="helpdesk-mail" href="mailto:help@example.lg.jp\?subject=[^"]*rid-1', page)


# -- the organization: section ---------------------------------------------------------------

BASE = """
state_dir: /tmp/kanmon-test
tunnel: {interface: wg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}
uplink: {interface: eth0}
"""


def test_organization_section_is_read():
    cfg = load_config_text(BASE + """
organization:
  name_ja: 例市役所
  name_en: Example City Office
  logo_url: "data:image/png;base64,iVBORw0KGgo="
  helpdesk: {name_ja: 情報政策課, name_en: IT desk, mail: helpdesk@example.lg.jp, phone: "03-1234-5678"}
helpdesk: {contact: 内線 1234}
""")
    org = cfg.organization
    assert (org.name_ja, org.name_en, org.logo_url) == ("例市役所", "Example City Office", "data:image/png;base64,iVBORw0KGgo=")
    assert org.helpdesk == Helpdesk("情報政策課", "IT desk", "内線 1234", "helpdesk@example.lg.jp", "03-1234-5678")
    assert org.helpdesk.tel_href == "tel:03-1234-5678"
    assert load_config_text(BASE).organization.helpdesk.name_ja == "情報システム担当"


@pytest.mark.parametrize("key, value, en, ja", [
    ("mail", "helpdesk@example.lg.jp?cc=x@evil.test", "not a valid mail address", "メールアドレスとして正しくありません"),
    ("mail", "Help Desk <helpdesk@example.lg.jp>", "not a valid mail address", "メールアドレスとして正しくありません"),
    ("phone", "call 1234", "not a valid phone number", "電話番号として正しくありません"),
    ("phone", "03-1234-5678;ext=9", "not a valid phone number", "電話番号として正しくありません"),
])
def test_bad_helpdesk_values_are_refused_bilingually_with_their_line(key, value, en, ja):
    text = BASE + f'organization:\n  name_ja: 例\n  name_en: Ex\n  helpdesk:\n    {key}: "{value}"\n'
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text, "kanmon.yaml")
    err = exc.value.errors[0]
    assert err.line == 9 and err.dotted.endswith(key)
    assert en in err.message and ja in (err.ja or "")


@pytest.mark.parametrize("logo", ["http://intranet.example/logo.png", "javascript:alert(1)",
                                  "data:text/html;base64,PHNjcmlwdD4=", "https://x/\"onerror=\"x"])
def test_a_logo_that_is_not_https_or_an_inline_image_is_refused(logo):
    text = BASE + f"organization:\n  name_ja: 例\n  name_en: Ex\n  logo_url: '{logo}'\n"
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text)
    err = exc.value.errors[0]
    assert "logo_url" in err.dotted and "https://" in err.message and "ロゴは" in (err.ja or "")


def test_organization_needs_both_names():
    with pytest.raises(SourceErrors) as exc:
        load_config_text(BASE + "organization: {name_ja: 例市役所}\n")
    assert any("name_en" in str(e) for e in exc.value.errors)
