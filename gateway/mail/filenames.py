"""Checks on one attachment file name (IPA SME sample 7.4, 添付ファイル ②③⑤): dangerous
extension, shortcut extension, double extension, padding before the extension, and bidi /
zero-width characters. The name is the one after RFC 2231 / RFC 2047 decoding.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import re2

from gateway.i18n import Text
from gateway.mail.indicators import Name, visible
from gateway.mail.limits import RE2_SPACE

# Bidi controls (UAX #9) and zero-width characters, named for the evidence.
_NAMED_CONTROLS = {
    0x200B: "ZERO WIDTH SPACE", 0x200C: "ZERO WIDTH NON-JOINER", 0x200D: "ZERO WIDTH JOINER",
    0x200E: "LEFT-TO-RIGHT MARK", 0x200F: "RIGHT-TO-LEFT MARK", 0x061C: "ARABIC LETTER MARK",
    0x202A: "LEFT-TO-RIGHT EMBEDDING", 0x202B: "RIGHT-TO-LEFT EMBEDDING",
    0x202C: "POP DIRECTIONAL FORMATTING", 0x202D: "LEFT-TO-RIGHT OVERRIDE",
    0x202E: "RIGHT-TO-LEFT OVERRIDE (RLO)", 0x2066: "LEFT-TO-RIGHT ISOLATE",
    0x2067: "RIGHT-TO-LEFT ISOLATE", 0x2068: "FIRST STRONG ISOLATE",
    0x2069: "POP DIRECTIONAL ISOLATE", 0x2060: "WORD JOINER", 0xFEFF: "ZERO WIDTH NO-BREAK SPACE",
    0x180E: "MONGOLIAN VOWEL SEPARATOR", 0x034F: "COMBINING GRAPHEME JOINER",
}
# Characters that pad a name: any Unicode space (incl. U+3000 ideographic space), tab, and
# runs of filler punctuation.
# RE2 (linear time): "{n,}$" searched from every position is quadratic in a backtracking
# engine (100k "_" before the extension: 23 s).
_PAD_CHARS = r"[" + RE2_SPACE + r"\x{2800}\x{3164}\x{ffa0}_\-~・･]"
_SPACE_RUN = re2.compile(r"[" + RE2_SPACE + r"]+")


@dataclass(frozen=True)
class NameFinding:
    name: Name
    evidence: Text


def control_chars(filename: str) -> list[str]:
    out = []
    for ch in filename:
        cp = ord(ch)
        if cp in _NAMED_CONTROLS:
            out.append(f"U+{cp:04X} {_NAMED_CONTROLS[cp]}")
        elif unicodedata.category(ch) in ("Cf", "Cc"):
            out.append(f"U+{cp:04X} {unicodedata.name(ch, 'CONTROL CHARACTER')}")
    return out


def real_extension(filename: str) -> tuple[str, list[str]]:
    """(the extension Windows uses, all extensions) — trailing dots and spaces are dropped
    as Windows does, format characters are ignored when splitting."""
    cleaned = "".join(ch for ch in filename if unicodedata.category(ch) not in ("Cf", "Cc"))
    cleaned = cleaned.replace("\\", "/").rsplit("/", 1)[-1].rstrip(" .\u3000")
    parts = cleaned.split(".")
    if len(parts) < 2:
        return "", []
    exts = [p.strip().lower() for p in parts[1:]]
    return exts[-1], exts


def check_filename(filename: str, executable: frozenset[str], shortcut: frozenset[str],
                   decoys: frozenset[str], padding_min_run: int) -> list[NameFinding]:
    shown = visible(filename)
    found: list[NameFinding] = []
    controls = control_chars(filename)
    if controls:
        found.append(NameFinding(Name.FILENAME_CONTROL_CHARS, Text(
            f"ファイル名「{shown}」に表示を偽装する制御文字: {', '.join(controls)}",
            f"file name '{shown}' contains display-spoofing characters: {', '.join(controls)}")))
    ext, exts = real_extension(filename)
    if ext in executable:
        found.append(NameFinding(Name.EXECUTABLE_ATTACHMENT, Text(
            f"ファイル「{shown}」は実行形式の拡張子 .{ext}", f"file '{shown}' has executable extension .{ext}")))
    if ext in shortcut:
        found.append(NameFinding(Name.SHORTCUT_ATTACHMENT, Text(
            f"ファイル「{shown}」はショートカットの拡張子 .{ext}", f"file '{shown}' has shortcut extension .{ext}")))
    if len(exts) >= 2 and (ext in executable or ext in shortcut) and exts[-2] in decoys:
        found.append(NameFinding(Name.DOUBLE_EXTENSION, Text(
            f"ファイル「{shown}」は二重拡張子 .{exts[-2]}.{ext}",
            f"file '{shown}' has a double extension .{exts[-2]}.{ext}")))
    stem = filename.rstrip(" .\u3000")
    if "." in stem:
        before_ext = stem.rsplit(".", 1)[0]
        run = re2.search(_PAD_CHARS + "{%d,}$" % padding_min_run, before_ext)
        longest = max((len(m.group()) for m in _SPACE_RUN.finditer(stem)), default=0)
        if run or longest >= 10:
            count = len(run.group()) if run else longest
            found.append(NameFinding(Name.EXTENSION_PADDING, Text(
                f"ファイル名「{shown}」の拡張子の前に {count} 文字の空白・詰め物",
                f"file name '{shown}' has {count} padding characters before the extension")))
    return found
