"""Write the mail regression corpus (issue #15): every input that hung the gateway or blew up
its memory before the fix, small enough to store (< 64 KB), as ``NAME.eml``; larger ones are
listed in MANIFEST.json by generator and size and rebuilt by the test. Re-run after adding a
class to tests/fuzz/mail_hostile.py:

    python -m tests.fuzz.regressions.mail.make
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.fuzz import mail_hostile as hostile

HERE = Path(__file__).resolve().parent
STORE_LIMIT = 64 * 1024

# name -> (generator, n, what it did before the fix, expected action, expected indicators)
ENTRIES = {
    "anchor-redos-402b": ("anchor_redos", 40, "backtracking host pattern: never returns (24 reps 7.5 s, 26 -> 29 s)", "deliver", []),
    "anchor-redos-26": ("anchor_redos", 26, "29 s with the interpreter lock held", "deliver", []),
    "huge-charref-5000": ("huge_charref", 5000, "ValueError from int() in html.unescape: judgement failed", "deliver", []),
    "from-quotes-8000": ("from_quotes", 8000, "0.8 s in the address parser, 32k quotes 11 s", "quarantine", ["message-too-complex"]),
    "amp-body-100k": ("amp_body", 25_000, "quadratic address scan (100k chars 7 s)", "deliver", []),
    "display-name-1mb": ("display_name", 1_000_000, "quadratic address scan, killed at 120 s", "quarantine", ["message-too-complex"]),
    "from-dots-200k": ("from_dots", 200_000, "quadratic address scan", "quarantine", ["message-too-complex"]),
    "unclosed-tag-100k": ("unclosed_tag", 100_000, "quadratic address scan of the converted text", "deliver", []),
    "content-type-200k-params": ("content_type_params", 200_000, "200k parameters to the header parser", "quarantine", ["message-too-complex"]),
    "mime-100k-parts": ("mime_parts", 100_000, "56 s", "quarantine", ["message-too-complex"]),
    "padding-100k": ("padding_filename", 100_000, "quadratic padding pattern, 23 s", "quarantine", ["message-too-complex"]),
    "encoded-words-50k": ("encoded_words", 50_000, "8 GB and MemoryError in the header parser", "quarantine", ["message-too-complex"]),
    "tar-300k-dirs": ("tar_dirs", 300_000, "directories not counted: 3M entries 56 s, 1.4 GB", "neutralize",
                      ["archive-threat", "attachment-present"]),
}


def main() -> None:
    manifest = {}
    for name, (gen, n, before, action, indicators) in ENTRIES.items():
        raw = getattr(hostile, gen)(n)
        stored = len(raw) <= STORE_LIMIT
        if stored:
            (HERE / f"{name}.eml").write_bytes(raw)
        manifest[name] = {"file": f"{name}.eml" if stored else None, "generator": gen, "n": n,
                          "bytes": len(raw), "before_fix": before, "action": action, "indicators": indicators}
    (HERE / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
