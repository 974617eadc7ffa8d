"""What a file's first bytes say it is, whatever its name claims (content sniffing).

Magic numbers from the formats' own specifications (PE/COFF, ELF, Mach-O, [MS-SHLLINK],
PKWARE APPNOTE, RFC 1952, POSIX ustar). Script detection looks for interpreter directives
and the markers Windows script hosts need; it is a heuristic, documented in INDICATORS.md.
"""

from __future__ import annotations

from gateway.mail.limits import bytes_re2

# [MS-SHLLINK] 2.1: HeaderSize 0x0000004C then LinkCLSID 00021401-0000-0000-C000-000000000046.
LNK_HEADER = bytes.fromhex("4c000000" "0114020000000000c000000000000046")

_EXECUTABLE_MAGIC = (
    (b"MZ", "Windows PE executable (MZ)"),
    (b"\x7fELF", "ELF executable"),
    (b"\xcf\xfa\xed\xfe", "Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "Mach-O universal binary / Java class"),
    (b"#!", "script with interpreter line (#!)"),
)
# RE2 (linear time) over attachment bytes; \s spelled out as Python's bytes \s (RE2's lacks \v).
_SCRIPT_START = bytes_re2(
    rb"(?i)^[\s\x0b]*(@echo[\s\x0b]+off|<job[\s\x0b>]|<package[\s\x0b>]|<\?xml[^>]*>[\s\x0b]*<(job|package)[\s\x0b>])")
_SCRIPT_ANYWHERE = bytes_re2(
    rb"(?i)<hta:application|wscript\.shell|createobject\s*\(\s*[\"'](wscript|shell\.application|scripting\.filesystemobject)"
    rb"|powershell(\.exe)?\s+-(e|enc|encodedcommand|nop|noprofile|w|windowstyle|exec|executionpolicy)\b"
    rb"|invoke-expression|\biex\s*\(|new-object\s+net\.webclient|frombase64string\s*\("
)

ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"Rar!\x1a\x07", "rar"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"MSCF", "cab"),
)


def executable_kind(data: bytes) -> str | None:
    """A description if ``data`` is a native executable or a script, else None."""
    head = data[:4096]
    for magic, label in _EXECUTABLE_MAGIC:
        if head.startswith(magic):
            if magic == b"MZ" and len(head) < 64:
                continue  # two letters "MZ" alone are not a PE header
            return label
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if _SCRIPT_START.search(head):
        return "Windows batch / script host file"
    if _SCRIPT_ANYWHERE.search(head):
        return "Windows script (script host or PowerShell markers)"
    return None


def is_lnk(data: bytes) -> bool:
    return data[:20] == LNK_HEADER


def archive_kind(data: bytes) -> str | None:
    for magic, kind in ARCHIVE_MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) > 262 and data[257:262] == b"ustar":
        return "tar"
    if len(data) > 7 and data[2:4] == b"-l" and data[6:7] == b"-" and data[4:6] in (b"h0", b"h5", b"h6", b"h7", b"zs", b"z5", b"h1"):
        return "lzh"
    if len(data) > 0x8006 and data[0x8001:0x8006] == b"CD001":
        return "iso9660"
    return None
