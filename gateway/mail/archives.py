"""Look inside attached archives (IPA SME sample 7.4 via item 11 of issue 5): zip (zipfile),
tar / tar.gz / tar.bz2 / tar.xz (tarfile) and single-file gzip, nested up to a depth, within a
byte and member budget so a zip bomb costs us nothing. Each member gets the same name and
content checks as a top-level attachment. Encrypted members, formats the standard library
cannot open (rar, 7z, lzh, cab, iso) and damaged archives are reported as uninspectable.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field

from gateway.i18n import Text
from gateway.mail.filenames import check_filename
from gateway.mail.indicators import Name, visible
from gateway.mail.sniff import archive_kind, executable_kind, is_lnk


@dataclass(frozen=True)
class ArchiveLimits:
    max_depth: int
    max_members: int
    max_total_bytes: int
    executable: frozenset[str]
    shortcut: frozenset[str]
    decoys: frozenset[str]
    padding_min_run: int


@dataclass
class ArchiveReport:
    threats: list[Text] = field(default_factory=list)      # -> archive-threat
    uninspectable: list[Text] = field(default_factory=list)  # -> archive-encrypted
    members: int = 0
    bytes_read: int = 0


def inspect_archive(data: bytes, name: str, limits: ArchiveLimits) -> ArchiveReport | None:
    """None if ``data`` is not an archive; else what was found inside."""
    kind = archive_kind(data)
    if kind is None:
        return None
    report = ArchiveReport()
    _inspect(data, kind, visible(name), limits, report, depth=1)
    return report


def _member_name(info: zipfile.ZipInfo) -> str:
    # Japanese zip tools write Shift_JIS names without the UTF-8 flag (bit 11); zipfile then
    # decodes them as cp437. Undo that when the bytes are valid cp932.
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("cp932")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def _inspect(data: bytes, kind: str, path: str, limits: ArchiveLimits, report: ArchiveReport, depth: int) -> None:
    if depth > limits.max_depth:
        report.threats.append(Text(f"{path}: 入れ子が深すぎて検査できない (深さ {depth})",
                                   f"{path}: archives nested deeper than {limits.max_depth}"))
        return
    try:
        for member, content, encrypted in _members(data, kind, limits, report):
            member_path = f"{path}/{visible(member)}"
            if encrypted:
                report.uninspectable.append(Text(f"{member_path}: 暗号化されたエントリ (中身を検査できない)",
                                                 f"{member_path}: encrypted entry (cannot be inspected)"))
            _check_member(member, content, member_path, limits, report, depth)
    except _BudgetExceeded as exc:
        report.threats.append(Text(f"{path}: 検査上限を超えた ({exc}) — 圧縮爆弾の疑い",
                                   f"{path}: inspection limit exceeded ({exc}) — possible zip bomb"))
    except _Uninspectable as exc:
        report.uninspectable.append(Text(f"{path}: 検査できないアーカイブ ({exc})",
                                         f"{path}: archive cannot be inspected ({exc})"))


def _check_member(member: str, content: bytes | None, member_path: str, limits: ArchiveLimits,
                  report: ArchiveReport, depth: int) -> None:
    for finding in check_filename(member, limits.executable, limits.shortcut, limits.decoys, limits.padding_min_run):
        report.threats.append(Text(f"{member_path}: [{finding.name}] {finding.evidence.ja}",
                                   f"{member_path}: [{finding.name}] {finding.evidence.en}"))
    if content is None:
        return
    kind = executable_kind(content)
    if kind:
        report.threats.append(Text(f"{member_path}: [{Name.EXECUTABLE_ATTACHMENT}] 中身が実行形式 ({kind})",
                                   f"{member_path}: [{Name.EXECUTABLE_ATTACHMENT}] content is {kind}"))
    if is_lnk(content):
        report.threats.append(Text(f"{member_path}: [{Name.SHORTCUT_ATTACHMENT}] 中身が Windows ショートカット (LNK)",
                                   f"{member_path}: [{Name.SHORTCUT_ATTACHMENT}] content is a Windows shortcut (LNK header)"))
    inner = archive_kind(content)
    if inner:
        _inspect(content, inner, member_path, limits, report, depth + 1)


class _BudgetExceeded(Exception):
    pass


class _Uninspectable(Exception):
    pass


def _take(report: ArchiveReport, limits: ArchiveLimits, size: int) -> int:
    """Charge one member of ``size`` bytes; returns how many bytes may be read."""
    report.members += 1
    if report.members > limits.max_members:
        raise _BudgetExceeded(f"more than {limits.max_members} members")
    remaining = limits.max_total_bytes - report.bytes_read
    if size > remaining:
        raise _BudgetExceeded(f"more than {limits.max_total_bytes} bytes uncompressed")
    return remaining


def _members(data: bytes, kind: str, limits: ArchiveLimits, report: ArchiveReport):
    if kind == "zip":
        # zipfile reads the whole central directory at open (3M entries: gigabytes): count
        # its headers first. A stray signature inside compressed data only over-counts.
        if report.members + data.count(b"PK\x01\x02") > limits.max_members:
            raise _BudgetExceeded(f"more than {limits.max_members} members")
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            raise _Uninspectable(f"damaged zip: {exc}") from None
        for info in infos:
            remaining = _take(report, limits, info.file_size)   # directories count too
            if info.is_dir():
                continue
            name = _member_name(info)
            if info.flag_bits & 0x1:
                yield name, None, True
                continue
            try:
                with zf.open(info) as fh:
                    content = fh.read(remaining + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError, zlib.error) as exc:
                raise _Uninspectable(f"cannot read member {visible(name)}: {exc}") from None
            report.bytes_read += len(content)
            if len(content) > remaining:
                raise _BudgetExceeded(f"more than {limits.max_total_bytes} bytes uncompressed")
            yield name, content, False
    elif kind in ("gzip", "bzip2", "xz", "tar"):
        try:
            tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except tarfile.ReadError:
            tf = None
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise _Uninspectable(f"damaged {kind}: {exc}") from None
        if tf is None:
            if kind != "gzip":
                raise _Uninspectable(f"damaged {kind}")
            yield from _gzip_single(data, limits, report)
            return
        try:
            for member in tf:
                # Every entry counts (directories, links...): 3M directory entries in a
                # tar.gz cost 56 s and 1.4 GB when only files were counted.
                remaining = _take(report, limits, member.size if member.isfile() else 0)
                if not member.isfile():
                    continue
                fh = tf.extractfile(member)
                content = fh.read(remaining + 1) if fh else b""
                report.bytes_read += len(content)
                if len(content) > remaining:
                    raise _BudgetExceeded(f"more than {limits.max_total_bytes} bytes uncompressed")
                yield member.name, content, False
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
            raise _Uninspectable(f"damaged {kind}: {exc}") from None
    else:
        raise _Uninspectable(f"{kind} format is not supported by the inspector")


def _gzip_single(data: bytes, limits: ArchiveLimits, report: ArchiveReport):
    remaining = _take(report, limits, 0)
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        content = decomp.decompress(data, remaining + 1)
    except zlib.error as exc:
        raise _Uninspectable(f"damaged gzip: {exc}") from None
    report.bytes_read += len(content)
    if len(content) > remaining:
        raise _BudgetExceeded(f"more than {limits.max_total_bytes} bytes uncompressed")
    yield "(gzip content)", content, False
