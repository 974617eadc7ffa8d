"""Icon disguise (IPA SME sample 7.4, 添付ファイル ④ アイコンが偽装されている): a Windows PE
executable that carries icon resources (so Explorer shows it with a picture of its own
choosing, typically a document or folder icon) while its name or MIME type claims a
document, an image, or a folder (no extension at all).

Read with **pefile** (``fast_load``, then only the resource directory; pefile bounds the
entries it reads at 0x8000 and the depth at 32). An attachment that does not parse as PE is
not judged here (executable-attachment already reports the ``MZ`` content).

What the icon depicts cannot be told reliably from the bytes (a document icon is a picture
like any other), so the check is: icons present + a document / folder claim. pefile does not
read a resource directory of more than 4,096 entries: such a file is not icon-disguise, but it
is still executable-attachment (its ``MZ`` content).
"""

from __future__ import annotations

import struct
import unicodedata
from dataclasses import dataclass

# Content types that claim a document or a picture (prefixes).
DOCUMENT_TYPES = (
    "application/pdf", "application/msword", "application/vnd.ms-", "application/vnd.openxmlformats-officedocument",
    "application/vnd.oasis.opendocument", "application/rtf", "application/x-hwp", "application/vnd.justsystems",
    "text/", "image/",
)
MAX_PE_BYTES = 64 * 1024 * 1024
MAX_PE_PER_MESSAGE = 8     # pefile looks at this many PE attachments of one message, no more
_RT_ICON = 3
_RT_GROUP_ICON = 14
_RESOURCE_DIRECTORY = 2


@dataclass(frozen=True)
class IconInfo:
    groups: int      # RT_GROUP_ICON entries
    icons: int       # RT_ICON entries


def has_resource_directory(data: bytes) -> bool:
    """The PE headers (PE/COFF spec: e_lfanew at 0x3C, "PE\\0\\0", optional header magic 0x10B
    or 0x20B, data directory 2) name a resource directory. Read with struct, before pefile:
    pefile runs a full ``gc.collect()`` whenever it gives up on a file, which a message of many
    broken ``MZ`` attachments would otherwise trigger once each."""
    if len(data) < 64 or not data.startswith(b"MZ"):
        return False
    (e_lfanew,) = struct.unpack_from("<I", data, 0x3C)
    optional = e_lfanew + 24
    if optional + 2 > len(data) or data[e_lfanew:e_lfanew + 4] != b"PE\x00\x00":
        return False
    (magic,) = struct.unpack_from("<H", data, optional)
    if magic not in (0x10B, 0x20B):
        return False
    count_at = optional + (92 if magic == 0x10B else 108)
    if count_at + 4 + 8 * 3 > len(data):
        return False
    (count,) = struct.unpack_from("<I", data, count_at)
    rva, size = struct.unpack_from("<II", data, count_at + 4 + 8 * _RESOURCE_DIRECTORY)
    return count > _RESOURCE_DIRECTORY and rva > 0 and size > 0


def pe_icons(data: bytes) -> IconInfo | None:
    """Icon resources of a PE file, or None when ``data`` is not a parsable PE or has none."""
    if len(data) > MAX_PE_BYTES or not has_resource_directory(data):
        return None
    import pefile   # imported here: only attachments that start with MZ pay for it

    try:
        # Not pe.close(): with data= there is no file to close, and close() runs gc.collect(),
        # which costs tens of milliseconds in a process with a large heap (bench/mail.py).
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(directories=[_RESOURCE_DIRECTORY])
        root = getattr(pe, "DIRECTORY_ENTRY_RESOURCE", None)
        counts = {_RT_ICON: 0, _RT_GROUP_ICON: 0}
        for entry in getattr(root, "entries", ()) or ():
            if entry.id in counts:
                sub = getattr(getattr(entry, "directory", None), "entries", ()) or ()
                counts[entry.id] += len(sub)
    except (pefile.PEFormatError, ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError):
        return None
    if not counts[_RT_ICON] and not counts[_RT_GROUP_ICON]:
        return None
    return IconInfo(counts[_RT_GROUP_ICON], counts[_RT_ICON])


def document_claim(filenames: tuple[str, ...], content_type: str, decoys: frozenset[str],
                   executable: frozenset[str]) -> str | None:
    """What the attachment pretends to be, or None if its name admits an executable."""
    for name in filenames:
        base = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(" .\u3000")
        # What the reader sees: after a right-to-left override the rest is shown reversed
        # (資料\u202excod.scr is displayed 資料rcs.docx).
        shown = base
        if "\u202e" in base:
            head, _, tail = base.partition("\u202e")
            shown = head + tail[::-1]
        shown = "".join(ch for ch in shown if unicodedata.category(ch) not in ("Cf", "Cc"))
        stem, dot, ext = shown.rpartition(".")
        ext = ext.lower().strip()
        if dot and ext in decoys:
            return f"name shown as .{ext}"
        inner = stem.rpartition(".")[2].lower().strip() if "." in stem else ""
        if dot and ext in executable and inner in decoys:
            return f"name .{inner}.{ext}"
        if not dot:
            return "name without extension (folder-like)"
    ctype = content_type.lower()
    if any(ctype.startswith(t) for t in DOCUMENT_TYPES):
        return f"type {ctype}"
    return None
