"""redact_url / redact_query: secrets in URLs are replaced, nothing else changes."""

from __future__ import annotations

import pytest

from gateway.logstore import DEFAULT_REDACTED_PARAMS, RedactionRule, redact_query, redact_url


@pytest.mark.parametrize("url, expected", [
    ("https://a.jp/cb?code=abc&state=xyz", "https://a.jp/cb?code=REDACTED&state=xyz"),
    ("https://a.jp/?Access_Token=t&x=1", "https://a.jp/?Access_Token=REDACTED&x=1"),
    ("https://s3.example/o?X-Amz-Signature=ff&X-Amz-Credential=c%2F1&v=2",
     "https://s3.example/o?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&v=2"),
    ("https://b.jp/s?sig=abc;sp=r", "https://b.jp/s?sig=REDACTED;sp=r"),
    ("https://a.jp/cb#access_token=t&token_type=bearer", "https://a.jp/cb#access_token=REDACTED&token_type=bearer"),
    ("https://a.jp/page#section-2", "https://a.jp/page#section-2"),
    ("ftp://user:pa55@files.jp/x?y=1", "ftp://user:REDACTED@files.jp/x?y=1"),
    ("https://user@files.jp/", "https://user@files.jp/"),
    ("https://a.jp/p?q=%E6%97%A5%E6%9C%AC+x&password=p&empty=&flag",
     "https://a.jp/p?q=%E6%97%A5%E6%9C%AC+x&password=REDACTED&empty=&flag"),
    ("https://a.jp/p?%74oken=encoded-name", "https://a.jp/p?%74oken=REDACTED"),
    ("https://a.jp/plain/path", "https://a.jp/plain/path"),
])
def test_default_rule(url, expected):
    assert redact_url(url) == expected


def test_default_set_has_the_documented_names():
    for name in ("token", "access_token", "code", "password", "sig"):
        assert name in DEFAULT_REDACTED_PARAMS


def test_custom_rule_names_and_patterns():
    rule = RedactionRule(params=frozenset({"Ticket"}), patterns=(r"x-.*-auth",))
    assert redact_url("https://a.jp/?ticket=1&code=2&X-My-Auth=3", rule) == \
        "https://a.jp/?ticket=REDACTED&code=2&X-My-Auth=REDACTED"
    extended = RedactionRule.with_extra(params=["pin"])
    assert redact_query("pin=1234&code=9&a=b", extended) == "pin=REDACTED&code=REDACTED&a=b"
    assert redact_query("a=1", RedactionRule(replacement="***")) == "a=1"
    assert redact_query("token=1", RedactionRule(replacement="***")) == "token=***"
