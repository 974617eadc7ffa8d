"""Fuzz, differential (issue #22, engine scale): the fast paths of the compile give exactly
what the plain paths give.

1. ``parse_list`` in chunks (clean chunks checked by one RE2 match and added as they are)
   gives the same entries and the same errors (file, line, text) as line by line
   (``chunk_lines=0``), for every format and match mode, on text mixing clean domains with
   upper case, IDN, blanks, comments, CR/LF, hosts and ABP lines, bad lines and long lines.
2. The host-keyed URL set matched scheme apart (gateway/policy/urlsets.py) names the same
   patterns as one RE2 set of the whole wildcard regexes, on URLs with odd schemes (upper
   case, ``ſ``/``K`` that fold to ASCII letters, none), user info, ports, IDN, %-escapes,
   dot segments and long paths.
"""

from __future__ import annotations

import re2
from hypothesis import strategies as st

from gateway.policy.lists import parse_list
from gateway.policy.urlpattern import compile_wildcard
from gateway.policy.urlsets import SchemeSplitSet
from tests.fuzz.harness import Harness

_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_ODD = st.sampled_from(["", " ", "#", "# comment", "Example.COM", "例え.jp", "faß.de", "a..b", "-a.b", "a.b.",
                        "0.0.0.0 host.example", "127.0.0.1 localhost", "||ads.example^", "/ad[s]/", "/(/",
                        "!abp comment", "[Adblock Plus 2.0]", "a b", "x/y", "*.wild", "a" * 64 + ".com",
                        ".".join(["abcdefghi"] * 28), "x" * 5000, "a.example  # trailing", "\ta.example",
                        "a.example\t#t", "xn--fa-hia.de", "ſ.example", "1.2.3.4", "[::1]"])
_LINE = st.one_of(_DOMAIN, _DOMAIN, _DOMAIN, _ODD, st.text(max_size=20))


@st.composite
def _list_text(draw):
    lines = draw(st.lists(_LINE, max_size=60))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    return (newline.join(lines) + draw(st.sampled_from(["", newline])), draw(st.sampled_from(["auto", "domains", "hosts", "abp"])),
            draw(st.sampled_from(["suffix", "exact"])), draw(st.integers(min_value=1, max_value=7)))


def _errors(errors) -> list[str]:
    return [str(e) for e in errors]


def check_chunked_list_parse_is_line_by_line(value) -> None:
    text, fmt, match, chunk = value
    reference, ref_errors = parse_list(text, "l", "l.txt", fmt, match, chunk_lines=0)
    got, errors = parse_list(text, "l", "l.txt", fmt, match, chunk_lines=chunk)
    assert got == reference, (text, fmt, match, chunk)
    assert _errors(errors) == _errors(ref_errors), (text, fmt, match, chunk)


_SCHEME = st.sampled_from(["", "", "https://", "http://", "HTTPS://", "wss://", "ftp://", "git+ssh://"])
_PATH = st.sampled_from(["", "/", "/path", "/path*", "/a/*/b", "/x?y=1", "/*.apk", "/dl/"])
_PORT = st.sampled_from(["", "", ":443", ":8080", ":*"])
_HOST = st.one_of(_DOMAIN, st.sampled_from(["*.site.example", "site.example", "例え.jp", "*.xn--fa-hia.de"]),
                  _DOMAIN.map(lambda d: "*." + d))


@st.composite
def _patterns_and_url(draw):
    patterns = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        wc = compile_wildcard(draw(_SCHEME) + draw(_HOST) + draw(_PORT) + draw(_PATH))
        if wc.host is not None:  # the keyed set holds only patterns tied to a host
            patterns.append(wc)
    scheme = draw(st.sampled_from(["https", "HTTPS", "http", "httpſ", "wss", "ftp", "git+ssh", "h", "1http", "",
                                   "ht:tp", "https:", "ſſ", "ＨＴＴＰＳ"]))
    sep = draw(st.sampled_from(["://", "://", ":/", ":", "//"]))
    userinfo = draw(st.sampled_from(["", "", "user@", "user:pw@", "@"]))
    host = draw(st.one_of(*(st.just(p.host) for p in patterns), _DOMAIN, st.sampled_from(
        ["sub.site.example", "SITE.example", "site.example.", "xn--r8jz45g.jp", "a:b.site.example", "[::1]"])))
    port = draw(st.sampled_from(["", ":443", ":8080", ":x"]))
    path = draw(st.sampled_from(["", "/", "/path", "/PATH/x", "/a/q/b", "/x?y=1", "/f.apk", "/dl/../x",
                                 "/%70ath", "/%2e%2e/", "#frag", "?q", "/" + "a/" * 200]))
    return patterns, f"{scheme}{sep}{userinfo}{host}{port}{path}"


def _options():
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    return options


def check_scheme_split_set_matches_the_whole_regexes(value) -> None:
    patterns, url = value
    if not patterns:
        return
    whole = re2.Set.SearchSet(_options())
    tails = re2.Set.SearchSet(_options())
    for wc in patterns:
        whole.Add(wc.regex)
        tails.Add(wc.tail)
    whole.Compile()
    tails.Compile()
    split = SchemeSplitSet(tails._set, tuple(wc.scheme for wc in patterns), _options())
    data = url.encode()
    assert sorted(split.Match(data)) == sorted(whole._set.Match(data) or []), (url, [p.regex for p in patterns])


HARNESSES = [
    Harness("list-chunked-parse", _list_text(), check_chunked_list_parse_is_line_by_line, ci_examples=300),
    Harness("keyed-url-set-scheme-split", _patterns_and_url(), check_scheme_split_set_matches_the_whole_regexes,
            ci_examples=300),
]

for _h in HARNESSES:
    globals()[_h.as_test().__name__] = _h.as_test()


def test_the_fast_paths_are_taken():
    """The differential checks above compare something: clean chunks do take the bulk path
    (a chunk with a bad line does not), and the split set does match."""
    import gateway.policy.lists as lists

    calls = []
    real = lists._CLEAN_CHUNK

    class Spy:
        def fullmatch(self, text):
            result = real.fullmatch(text)
            calls.append(result is not None)
            return result

    lists._CLEAN_CHUNK = Spy()
    try:
        parsed, errors = parse_list("a.example\nb.example\n\nBAD LINE\nc.example\n", "l", "l.txt", chunk_lines=2)
    finally:
        lists._CLEAN_CHUNK = real
    assert calls == [True, False, True] and parsed.suffix == {"a.example", "b.example", "c.example"}
    assert [e.line for e in errors] == [4]
    check_scheme_split_set_matches_the_whole_regexes(([compile_wildcard("site.example/path*")], "https://site.example/path/x"))
    wc = compile_wildcard("site.example/path*")
    tails = re2.Set.SearchSet(_options())
    tails.Add(wc.tail)
    tails.Compile()
    assert SchemeSplitSet(tails._set, (None,), _options()).Match(b"HTTPS://site.example/path/x") == [0]


def test_too_many_errors_stop_both_paths_at_the_same_line():
    """The error limit (yamlsource.MAX_ERRORS) is reached in a chunk with bad lines and the
    next chunk is clean: line by line the file stops at that clean chunk's first line, and
    so must the chunked path (it takes a chunk in bulk only below the limit)."""
    bad = "\n".join(f"bad line {i}" for i in range(150))
    for text in (bad, bad + "\n" + "\n".join(f"ok{i}.example" for i in range(50)),
                 "\n".join(f"ok{i}.example" for i in range(20)) + "\n" + bad + "\nlast.example\n"):
        for chunk in (1, 3, 8, 4096):
            got, errors = parse_list(text, "l", "l.txt", chunk_lines=chunk)
            reference, ref_errors = parse_list(text, "l", "l.txt", chunk_lines=0)
            assert got == reference and _errors(errors) == _errors(ref_errors), chunk
            assert "too many" in _errors(errors)[-1].lower() or "多すぎ" in _errors(errors)[-1]


def test_a_wildcard_regex_is_still_checked_when_only_parsed():
    """The compiler only parses a short wildcard's regex; one RE2 refuses still gets
    regex_error's message, and so does every pattern the parse accepts but that is long."""
    from gateway.policy.compiler import _WILDCARD_PARSE_ONLY, _Compiler

    compiler = _Compiler.__new__(_Compiler)
    compiler.prepared = None
    compiler.valid_patterns = set()
    assert "missing )" in compiler._regex_error("^https://(site/", wildcard=True)
    assert compiler._regex_error("^https://site\\.example/", wildcard=True) is None
    long_regex = "^https://site\\.example/" + "a" * _WILDCARD_PARSE_ONLY
    checked = []
    import gateway.policy.compiler as compiler_module

    real = compiler_module.regex_error
    compiler_module.regex_error = lambda p: checked.append(p) or real(p)
    try:
        assert compiler._regex_error(long_regex, wildcard=True) is None
    finally:
        compiler_module.regex_error = real
    assert checked == [long_regex]
    assert compiler.valid_patterns == {"^https://site\\.example/", long_regex}
