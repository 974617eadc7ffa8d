"""Host-table files every process maps (issue #22): the I/O edge of gateway/policy/hosttable.py.

The process that compiles a policy (the gateway's parent) writes each big host table of the
snapshot once, as ``<directory>/<sha256 of the bytes>.hosts``; every process that loads the
policy from the prepared-policy cache (gateway/runtime/policycache.py), the parent and each
inspection worker, maps that same file read-only (``MAP_SHARED``), so the table is one copy in
the page cache instead of one dict per process.

- **Content-addressed**: the name is the SHA-256 of the contents, and the prepared-policy file
  refers to the table by that digest; a file is only ever written whole under its own digest.
- **Atomic write**: a temporary file in the same directory, fsynced, renamed over, the
  directory fsynced.
- **Checked on open**: the SHA-256 of the mapped bytes must be the name's, and the layout
  (hosttable.HostTable) must be sound; anything else (short, damaged, foreign, missing) raises
  ``DamagedTable`` and the caller compiles the policy from its sources: never a different
  verdict. The check reads every page once (they stay in the page cache, shared). The process
  that wrote the file maps it without hashing it again (``written_here``): its digest was
  computed over the bytes written.
- **Removal**: the cache removes files no prepared policy refers to after a write; a process
  that still maps an old one keeps it (an unlinked file lives on until its last mapping goes).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import tempfile
from collections.abc import Buffer, Sequence
from pathlib import Path

from gateway.policy.hosttable import BadTable, HostTable

SUFFIX = ".hosts"
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


class DamagedTable(ValueError):
    """The host-table file is missing, unreadable, or not the one its digest names."""


def path_for(directory: str | Path, digest: str) -> Path:
    return Path(directory) / f"{digest}{SUFFIX}"


_SLICE = 1 << 20   # bytes hashed then written at a time: still in the CPU cache when written


def write(directory: str | Path, data: bytes | Sequence[Buffer]) -> str:
    """Write ``data`` (bytes, or the buffers of hosttable.encode_parts one after the other) as
    ``<sha256>.hosts``, atomically, and return the digest. One pass: each slice is hashed and
    then written while it is still in the CPU cache. Raises OSError."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                for at in range(0, len(view), _SLICE):
                    piece = view[at:at + _SLICE]
                    h.update(piece)
                    while piece:
                        piece = piece[os.write(fd, piece):]
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = h.hexdigest()
        os.chmod(tmp, 0o400)   # never written again: a new table is a new file
        os.replace(tmp, path_for(directory, digest))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


def open_table(directory: str | Path, digest: str, written_here: bool = False) -> HostTable:
    """Map ``<digest>.hosts`` read-only and check it; ``DamagedTable`` saying why not.

    ``written_here``: this process wrote the file a moment ago (``write`` returned ``digest``,
    hashed over the very bytes it wrote): the layout and size are checked, the bytes are not
    hashed again (that would read back the same page-cache pages, and make every page of the
    table resident in this process at once, while the dicts it replaces are still alive)."""
    if type(digest) is not str or not _DIGEST.match(digest):
        raise DamagedTable("not a host-table digest")
    path = path_for(directory, digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise DamagedTable(f"{path.name}: {exc.strerror or exc}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise DamagedTable(f"{path.name}: empty")
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError as exc:
        raise DamagedTable(f"{path.name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)   # the mapping keeps the file
    # A refused mapping is not closed here (a view of it may still be alive in the traceback):
    # it goes with its last reference.
    if not written_here and hashlib.sha256(mapped).hexdigest() != digest:
        raise DamagedTable(f"{path.name}: contents do not match the digest")
    try:
        return HostTable(mapped)
    except BadTable as exc:
        raise DamagedTable(f"{path.name}: {exc}") from None


def remove_unreferenced(directory: str | Path, keep: set[str]) -> None:
    """Remove the ``.hosts`` files whose digest is not in ``keep`` (errors ignored)."""
    for old in Path(directory).glob(f"*{SUFFIX}"):
        if old.name[:-len(SUFFIX)] not in keep:
            try:
                old.unlink()
            except OSError:
                pass
