"""Which malloc the gateway runs on: jemalloc when the host has it, glibc otherwise.

Why (issue #7): under steady load for an hour glibc's malloc grew the gateway's RSS in a
straight line (68 MB/h, not levelling off) while live memory stayed flat — the bursts of
short-lived DNS and connection objects leave freed blocks scattered through glibc's heap,
which it keeps. Periodic ``malloc_trim`` only slowed that down by about a third. With
jemalloc (Debian ``libjemalloc2``) the same load keeps RSS level after the warm-up and is
faster. So ``kanmon run`` restarts itself once, before anything else runs, with jemalloc
preloaded (``LD_PRELOAD``; the process keeps its PID, so systemd's ``Type=notify`` still
sees the same main process).

``KANMON_ALLOCATOR`` chooses: ``auto`` (default: jemalloc when installed, else glibc with a
warning), ``jemalloc`` (refuse to start without it), ``glibc`` (never preload). An operator
who already preloads a malloc of their own (``LD_PRELOAD`` naming ``*malloc*``) is left alone.

The decision (:func:`plan`) is pure; looking at the host and ``exec`` are at the edges.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV = "KANMON_ALLOCATOR"
# Set in the environment of the re-executed process, so a preload that the dynamic loader
# ignores (it only warns) cannot make the gateway restart itself forever.
REEXEC_MARK = "KANMON_ALLOCATOR_REEXEC"
CHOICES = ("auto", "jemalloc", "glibc")
JEMALLOC_SONAME = "libjemalloc.so.2"
# Preloads known to deadlock with jemalloc's initialisation (they call clock_gettime/dlsym,
# which allocate, while jemalloc is initialising): libfaketime issues #130 and #478,
# fakechroot #21; seen here with libfaketime 0.9.10 and the PyPI libfaketime 3.0.1 — the
# clock-jump fault test runs the gateway under libfaketime.
CLASHES = ("libfaketime", "libfakechroot")


class AllocatorError(ValueError):
    """A setting that cannot be honoured; the message names the variable."""


@dataclass(frozen=True)
class Plan:
    """What to do at start-up: ``exec_env`` set means restart with that environment."""

    allocator: str  # "jemalloc" or "glibc": what the gateway will run on
    exec_env: dict[str, str] | None = None
    warning: str | None = None


def jemalloc_candidates() -> list[Path]:
    """Where Debian/Ubuntu, Fedora and /usr/local builds put the shared library."""
    dirs = []
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs.append(Path("/usr/lib") / multiarch)
    dirs += [Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    return [d / JEMALLOC_SONAME for d in dirs]


def find_jemalloc(candidates: Sequence[Path] | None = None) -> Path | None:
    for path in jemalloc_candidates() if candidates is None else candidates:
        if path.is_file():
            return path
    return None


def loaded_allocator(maps_text: str) -> str:
    """From ``/proc/PID/maps``: "jemalloc" when libjemalloc is mapped, else "glibc"."""
    return "jemalloc" if "libjemalloc" in maps_text else "glibc"


def plan(environ: Mapping[str, str], jemalloc: Path | None, current: str) -> Plan:
    """Decide from the environment, the library found (or None) and the malloc this
    process already runs on. Raises :class:`AllocatorError` for a bad or unmet setting."""
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV} must be one of {', '.join(CHOICES)}, not {environ.get(ENV)!r}")
    if current == "jemalloc":
        if choice == "glibc":
            raise AllocatorError(f"{ENV}=glibc but jemalloc is already preloaded (LD_PRELOAD); remove it from LD_PRELOAD")
        return Plan("jemalloc")
    if choice == "glibc":
        return Plan("glibc")
    preload = environ.get("LD_PRELOAD", "")
    if environ.get(REEXEC_MARK):
        message = f"jemalloc was preloaded but is not in use (LD_PRELOAD={preload!r}); running on glibc malloc"
        if choice == "jemalloc":
            raise AllocatorError(f"{ENV}=jemalloc: {message}")
        return Plan("glibc", warning=message)
    names = [Path(entry).name for entry in preload.replace(":", " ").split()]
    if any("malloc" in name for name in names):
        return Plan("glibc", warning=f"LD_PRELOAD already names an allocator ({preload}); jemalloc not added")
    clash = next((name for name in names if any(lib in name for lib in CLASHES)), None)
    if clash is not None:
        message = f"{clash} in LD_PRELOAD does not work with jemalloc (both hang at start-up); running on glibc malloc"
        if choice == "jemalloc":
            raise AllocatorError(f"{ENV}=jemalloc: {message}")
        return Plan("glibc", warning=message)
    if jemalloc is None:
        message = f"{JEMALLOC_SONAME} not found (Debian: apt-get install libjemalloc2); running on glibc malloc, whose RSS creeps under long load"
        if choice == "jemalloc":
            raise AllocatorError(f"{ENV}=jemalloc: {message}")
        return Plan("glibc", warning=message)
    env = dict(environ)
    env["LD_PRELOAD"] = f"{jemalloc}:{preload}" if preload else str(jemalloc)
    env[REEXEC_MARK] = "1"
    return Plan("jemalloc", exec_env=env)


def current_allocator() -> str:
    try:
        return loaded_allocator(Path("/proc/self/maps").read_text())
    except OSError:
        return "glibc"


def ensure(environ: Mapping[str, str] | None = None) -> Plan:
    """Apply the plan for this process: return it when nothing needs doing, otherwise
    ``exec`` the same command line again (does not return)."""
    environ = os.environ if environ is None else environ
    decided = plan(environ, find_jemalloc(), current_allocator())
    if decided.exec_env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
        os.execve(sys.executable, argv, decided.exec_env)
    if environ is os.environ and environ.get(REEXEC_MARK):
        # Running after our own restart: children (nft, wireguard-go, ClamAV helpers) get
        # the environment the operator gave, not our preload.
        restored = restored_environment(environ)
        for name in (REEXEC_MARK, "LD_PRELOAD"):
            if name in restored:
                environ[name] = restored[name]
            else:
                environ.pop(name, None)
    return decided


def restored_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment before :func:`plan` added jemalloc: its mark and preload removed."""
    env = {k: v for k, v in environ.items() if k != REEXEC_MARK}
    if environ.get(REEXEC_MARK):
        rest = [e for e in env.get("LD_PRELOAD", "").split(":") if e and Path(e).name != JEMALLOC_SONAME]
        if rest:
            env["LD_PRELOAD"] = ":".join(rest)
        else:
            env.pop("LD_PRELOAD", None)
    return env


def _mallctl():
    try:
        fn = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def jemalloc_stats() -> dict[str, int] | None:
    """jemalloc's totals in bytes (``allocated``: live objects; ``active``: pages holding
    them; ``resident``: what the allocator keeps in RAM; ``retained``: address space kept
    but returned to the kernel). None when jemalloc is not this process's malloc."""
    mallctl = _mallctl()
    if mallctl is None:
        return None
    epoch = ctypes.c_uint64(1)
    size = ctypes.c_size_t(ctypes.sizeof(epoch))
    # Statistics are a snapshot taken at the last "epoch" write: refresh it first.
    if mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), size) != 0:
        return None
    out = {}
    for name in ("allocated", "active", "resident", "retained"):
        value = ctypes.c_size_t(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None
        out[name] = value.value
    return out
