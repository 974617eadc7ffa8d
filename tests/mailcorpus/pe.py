"""Small synthetic PE files for the icon-disguise tests: headers and a .rsrc section written
from the PE/COFF specification (Microsoft, "PE Format": DOS stub, COFF header, PE32 optional
header, section table, resource directory tree type -> name -> language -> data entry). No
code section, nothing runs: a valid container with or without icon resources.
"""

from __future__ import annotations

import struct

RT_ICON = 3
RT_GROUP_ICON = 14
RT_VERSION = 16
_FILE_ALIGN = 0x200
_SECTION_ALIGN = 0x1000
_RSRC_RVA = 0x1000


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _resource_section(resources: list[tuple[int, list[tuple[int, bytes]]]]) -> bytes:
    """The .rsrc bytes for ``[(type_id, [(name_id, data), ...]), ...]`` (language 0x0411)."""
    dirs = bytearray()
    # Layout: root dir, then for each type its name dir, then for each name its language dir,
    # then the data entries, then the data. Offsets are computed in a first pass.
    n_types = len(resources)
    n_names = sum(len(items) for _, items in resources)
    root_size = 16 + 8 * n_types
    name_dirs_size = sum(16 + 8 * len(items) for _, items in resources)
    lang_dirs_size = n_names * (16 + 8)
    entries_off = root_size + name_dirs_size + lang_dirs_size
    data_off = entries_off + 16 * n_names
    header = struct.pack("<IIHHHH", 0, 0, 0, 0, 0, n_types)
    dirs += header
    name_dir_off = root_size
    for type_id, items in resources:
        dirs += struct.pack("<II", type_id, 0x80000000 | name_dir_off)
        name_dir_off += 16 + 8 * len(items)
    lang_dir_off = root_size + name_dirs_size
    for _type_id, items in resources:
        dirs += struct.pack("<IIHHHH", 0, 0, 0, 0, 0, len(items))
        for name_id, _data in items:
            dirs += struct.pack("<II", name_id, 0x80000000 | lang_dir_off)
            lang_dir_off += 16 + 8
    entry_index = 0
    for _type_id, items in resources:
        for _ in items:
            dirs += struct.pack("<IIHHHH", 0, 0, 0, 0, 0, 1)
            dirs += struct.pack("<II", 0x0411, entries_off + 16 * entry_index)
            entry_index += 1
    blobs = bytearray()
    for _type_id, items in resources:
        for _name_id, data in items:
            offset = data_off + len(blobs)
            dirs += struct.pack("<IIII", _RSRC_RVA + offset, len(data), 0, 0)
            blobs += data + b"\x00" * (_align(len(data), 4) - len(data))
    assert len(dirs) == data_off
    return bytes(dirs + blobs)


def icon_group(n_icons: int) -> bytes:
    """A GRPICONDIR with ``n_icons`` entries of 32x32, 32 bpp."""
    out = struct.pack("<HHH", 0, 1, n_icons)
    for i in range(n_icons):
        out += struct.pack("<BBBBHHIH", 32, 32, 0, 0, 1, 32, 40 + 32 * 32 * 4, i + 1)
    return out


def icon_image(seed: int = 0) -> bytes:
    """A BITMAPINFOHEADER and a tiny pixel block: enough to be an icon resource."""
    return struct.pack("<IiiHHIIiiII", 40, 32, 64, 1, 32, 0, 0, 0, 0, 0, 0) + bytes([seed % 256]) * 64


def build_pe(resources: list[tuple[int, list[tuple[int, bytes]]]] | None = None) -> bytes:
    """A PE32 (i386) image with one .rsrc section holding ``resources`` (none: no resource
    directory at all)."""
    rsrc = _resource_section(resources) if resources else b""
    n_sections = 1 if resources else 0
    e_lfanew = 0x40
    dos = b"MZ" + b"\x00" * (0x3C - 2) + struct.pack("<I", e_lfanew)
    coff = struct.pack("<HHIIIHH", 0x14C, n_sections, 0, 0, 0, 0xE0, 0x0102)
    raw_size = _align(len(rsrc), _FILE_ALIGN) if rsrc else 0
    image_size = _RSRC_RVA + _align(max(len(rsrc), 1), _SECTION_ALIGN)
    optional = struct.pack(
        "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII",
        0x10B, 14, 0, 0, raw_size, 0, 0, 0, 0, 0x400000, _SECTION_ALIGN, _FILE_ALIGN,
        6, 0, 0, 0, 6, 0, 0, image_size, _FILE_ALIGN, 0, 2, 0x8140,
        0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    directories = bytearray(16 * 8)
    if rsrc:
        struct.pack_into("<II", directories, 2 * 8, _RSRC_RVA, len(rsrc))
    section = b""
    if rsrc:
        section = struct.pack("<8sIIIIIIHHI", b".rsrc", len(rsrc), _RSRC_RVA, raw_size, _FILE_ALIGN, 0, 0, 0, 0,
                              0x40000040)
    headers = dos + b"PE\x00\x00" + coff + optional + bytes(directories) + section
    headers += b"\x00" * (_FILE_ALIGN - len(headers))
    body = rsrc + b"\x00" * (raw_size - len(rsrc))
    return headers + body


def pe_with_icons(n_icons: int = 2) -> bytes:
    return build_pe([(RT_ICON, [(i + 1, icon_image(i)) for i in range(n_icons)]),
                     (RT_GROUP_ICON, [(1, icon_group(n_icons))])])


def pe_without_icons() -> bytes:
    return build_pe([(RT_VERSION, [(1, b"\x00" * 64)])])
