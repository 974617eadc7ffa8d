"""Is a download of a risky type? Decided from its first bytes (content sniffing), and also
from its name and declared Content-Type, the riskiest of the three winning: a program served
as ``text/plain`` under ``notes.txt`` is still a program, and a ``.exe`` whose bytes are not
recognised is still treated as one. Pure.

Magic numbers come from the formats' specifications (gateway/mail/sniff.py for executables,
scripts and archives; PDF ISO 32000-1 7.5.2 "%PDF-" within the first 1024 bytes; OLE2
compound files [MS-CFB] 2.2; RTF "{\\rtf"; ZIP local file headers PKWARE APPNOTE 4.3.7,
whose first entry names tell an Office Open XML / OpenDocument file, an Android package or
an iOS app from a plain archive). Only ``head`` (the first SNIFF_BYTES) is looked at.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote, urlsplit

from gateway.mail.sniff import archive_kind, executable_kind, is_lnk

SNIFF_BYTES = 4096


class FileKind(StrEnum):
    EXECUTABLE = "executable"
    SCRIPT = "script"
    MOBILE_APP = "mobile-app"
    DOCUMENT = "document"
    PDF = "pdf"
    ARCHIVE = "archive"


# Riskiest first: when sniffing, the name and the Content-Type disagree, the first one here wins.
RISK_ORDER = (FileKind.EXECUTABLE, FileKind.SCRIPT, FileKind.MOBILE_APP, FileKind.DOCUMENT, FileKind.PDF,
              FileKind.ARCHIVE)

OLE2 = bytes.fromhex("d0cf11e0a1b11ae1")
_EXTENSIONS: dict[FileKind, tuple[str, ...]] = {
    FileKind.EXECUTABLE: ("exe", "dll", "scr", "com", "pif", "cpl", "msi", "msix", "msixbundle", "appx", "appxbundle",
                          "jar", "lnk", "elf", "run", "dmg", "pkg", "deb", "rpm", "iso", "img", "vhd", "vhdx"),
    FileKind.SCRIPT: ("bat", "cmd", "ps1", "psm1", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta", "sh", "scf",
                      "reg", "inf"),
    FileKind.MOBILE_APP: ("apk", "xapk", "apks", "aab", "ipa", "mobileconfig"),
    FileKind.DOCUMENT: ("doc", "docx", "docm", "dot", "dotm", "xls", "xlsx", "xlsm", "xlsb", "xlam", "ppt", "pptx",
                        "pptm", "ppsm", "rtf", "odt", "ods", "odp", "one"),
    FileKind.PDF: ("pdf",),
    FileKind.ARCHIVE: ("zip", "rar", "7z", "gz", "tgz", "bz2", "xz", "txz", "cab", "tar", "lzh", "lha", "arj", "ace"),
}
_BY_EXTENSION = {ext: kind for kind, exts in _EXTENSIONS.items() for ext in exts}

_CONTENT_TYPES: dict[str, FileKind] = {
    "application/x-msdownload": FileKind.EXECUTABLE, "application/x-msdos-program": FileKind.EXECUTABLE,
    "application/vnd.microsoft.portable-executable": FileKind.EXECUTABLE, "application/x-dosexec": FileKind.EXECUTABLE,
    "application/x-executable": FileKind.EXECUTABLE, "application/x-elf": FileKind.EXECUTABLE,
    "application/x-mach-binary": FileKind.EXECUTABLE, "application/x-msi": FileKind.EXECUTABLE,
    "application/x-ms-installer": FileKind.EXECUTABLE, "application/java-archive": FileKind.EXECUTABLE,
    "application/x-apple-diskimage": FileKind.EXECUTABLE, "application/x-iso9660-image": FileKind.EXECUTABLE,
    "application/x-sh": FileKind.SCRIPT, "application/x-shellscript": FileKind.SCRIPT,
    "application/x-bat": FileKind.SCRIPT, "application/hta": FileKind.SCRIPT,
    "application/vnd.android.package-archive": FileKind.MOBILE_APP, "application/octet-stream+ipa": FileKind.MOBILE_APP,
    "application/x-apple-aspen-config": FileKind.MOBILE_APP,
    "application/pdf": FileKind.PDF,
    "application/msword": FileKind.DOCUMENT, "application/rtf": FileKind.DOCUMENT, "text/rtf": FileKind.DOCUMENT,
    "application/zip": FileKind.ARCHIVE, "application/x-zip-compressed": FileKind.ARCHIVE,
    "application/x-7z-compressed": FileKind.ARCHIVE, "application/x-rar-compressed": FileKind.ARCHIVE,
    "application/vnd.rar": FileKind.ARCHIVE, "application/gzip": FileKind.ARCHIVE, "application/x-gzip": FileKind.ARCHIVE,
    "application/x-tar": FileKind.ARCHIVE, "application/x-bzip2": FileKind.ARCHIVE, "application/x-xz": FileKind.ARCHIVE,
    "application/vnd.ms-cab-compressed": FileKind.ARCHIVE,
}
_CONTENT_TYPE_PREFIXES = (("application/vnd.ms-", FileKind.DOCUMENT),
                          ("application/vnd.openxmlformats-officedocument.", FileKind.DOCUMENT),
                          ("application/vnd.oasis.opendocument.", FileKind.DOCUMENT))


@dataclass(frozen=True)
class Classification:
    kind: FileKind
    why: str          # "content: Windows PE executable (MZ)", "name: setup.exe", "content-type: application/pdf"


def _zip_kind(head: bytes) -> FileKind:
    # The names of the first entries (local headers in the first bytes) tell what the zip is.
    if b"AndroidManifest.xml" in head or b"classes.dex" in head:
        return FileKind.MOBILE_APP
    if re.search(rb"Payload/[^/\x00]{1,200}\.app/", head):
        return FileKind.MOBILE_APP
    if b"[Content_Types].xml" in head or re.search(rb"(word|xl|ppt)/", head) or \
            b"mimetypeapplication/vnd.oasis.opendocument" in head:
        return FileKind.DOCUMENT
    if b"META-INF/MANIFEST.MF" in head:
        return FileKind.EXECUTABLE   # a Java archive runs as a program
    return FileKind.ARCHIVE


def sniff(head: bytes) -> Classification | None:
    """What the first bytes say, or None for anything not risky (text, images, media, ...)."""
    head = head[:SNIFF_BYTES]
    if is_lnk(head):
        return Classification(FileKind.EXECUTABLE, "content: Windows shortcut (LNK)")
    if head.startswith(b"dex\n"):
        return Classification(FileKind.MOBILE_APP, "content: Android DEX")
    label = executable_kind(head)
    if label is not None:
        kind = FileKind.SCRIPT if "script" in label.lower() or head.startswith(b"#!") else FileKind.EXECUTABLE
        return Classification(kind, f"content: {label}")
    if b"%PDF-" in head[:1024]:
        return Classification(FileKind.PDF, "content: PDF")
    if head.startswith(OLE2):
        return Classification(FileKind.DOCUMENT, "content: OLE2 compound file (Office 97-2003, MSI)")
    if head.startswith(b"{\\rtf"):
        return Classification(FileKind.DOCUMENT, "content: RTF")
    archive = archive_kind(head)
    if archive is not None:
        kind = _zip_kind(head) if archive == "zip" else FileKind.ARCHIVE
        return Classification(kind, f"content: {archive}" + (f" ({kind})" if kind is not FileKind.ARCHIVE else ""))
    return None


def filename_of(url: str | None, content_disposition: str | None) -> str | None:
    """The file name the device will save: Content-Disposition's filename*/filename, else
    the last segment of the URL path."""
    if content_disposition:
        m = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", content_disposition, re.IGNORECASE)
        if m:
            return unquote(m.group(1).strip().strip('"'))
        m = re.search(r'filename\s*=\s*("([^"]*)"|[^;]+)', content_disposition, re.IGNORECASE)
        if m:
            return (m.group(2) if m.group(2) is not None else m.group(1)).strip()
    if url:
        name = posixpath.basename(unquote(urlsplit(url).path))
        return name or None
    return None


def by_name(filename: str | None) -> Classification | None:
    if not filename:
        return None
    # Trailing dots and spaces are dropped by Windows ("setup.exe." runs as setup.exe).
    name = filename.strip().rstrip(". ").lower()
    ext = name.rpartition(".")[2] if "." in name else ""
    kind = _BY_EXTENSION.get(ext)
    return Classification(kind, f"name: {filename}") if kind else None


def by_content_type(content_type: str | None) -> Classification | None:
    if not content_type:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    kind = _CONTENT_TYPES.get(mime)
    if kind is None:
        kind = next((k for prefix, k in _CONTENT_TYPE_PREFIXES if mime.startswith(prefix)), None)
    return Classification(kind, f"content-type: {mime}") if kind else None


def classify(head: bytes, *, filename: str | None = None, content_type: str | None = None) -> Classification | None:
    """The riskiest of what the content, the name and the Content-Type say; None: not risky."""
    found = [c for c in (sniff(head), by_name(filename), by_content_type(content_type)) if c is not None]
    if not found:
        return None
    return min(found, key=lambda c: RISK_ORDER.index(c.kind))
