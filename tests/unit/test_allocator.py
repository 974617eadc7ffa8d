"""gateway/runtime/allocator.py: which malloc `kanmon run` ends up on, and the real re-exec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.runtime import allocator, diagnostics
from gateway.runtime.allocator import AllocatorError, plan
from tests.availability import unavailable

LIB = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
ROOT = Path(__file__).resolve().parents[2]


def test_default_restarts_with_jemalloc_preloaded_and_marked():
    decided = plan({"PATH": "/usr/bin"}, LIB, "glibc")
    assert decided.allocator == "jemalloc"
    assert decided.exec_env == {"PATH": "/usr/bin", "LD_PRELOAD": str(LIB), allocator.REEXEC_MARK: "1"}


def test_an_existing_preload_is_kept_after_jemalloc():
    decided = plan({"LD_PRELOAD": "/opt/lib/libmytrace.so"}, LIB, "glibc")
    assert decided.exec_env["LD_PRELOAD"] == f"{LIB}:/opt/lib/libmytrace.so"


def test_libfaketime_keeps_glibc_because_the_two_hang_together():
    decided = plan({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"}, LIB, "glibc")
    assert decided.exec_env is None and decided.allocator == "glibc" and "libfaketime.so.1" in decided.warning
    with pytest.raises(AllocatorError, match="does not work with jemalloc"):
        plan({"LD_PRELOAD": "libfaketimeMT.so.1", allocator.ENV: "jemalloc"}, LIB, "glibc")


def test_already_on_jemalloc_nothing_to_do():
    assert plan({"LD_PRELOAD": str(LIB), allocator.REEXEC_MARK: "1"}, LIB, "jemalloc") == allocator.Plan("jemalloc")
    assert plan({allocator.ENV: "jemalloc"}, LIB, "jemalloc") == allocator.Plan("jemalloc")


def test_glibc_is_honoured_and_contradicting_preload_refused():
    assert plan({allocator.ENV: "GLIBC"}, LIB, "glibc") == allocator.Plan("glibc")
    with pytest.raises(AllocatorError, match="KANMON_ALLOCATOR=glibc but jemalloc is already preloaded"):
        plan({allocator.ENV: "glibc"}, LIB, "jemalloc")


def test_missing_library_warns_under_auto_and_refuses_when_required():
    decided = plan({}, None, "glibc")
    assert decided.allocator == "glibc" and decided.exec_env is None
    assert "apt-get install libjemalloc2" in decided.warning
    with pytest.raises(AllocatorError, match="KANMON_ALLOCATOR=jemalloc: libjemalloc.so.2 not found"):
        plan({allocator.ENV: "jemalloc"}, None, "glibc")


def test_a_preload_the_loader_ignored_does_not_restart_again():
    env = {"LD_PRELOAD": str(LIB), allocator.REEXEC_MARK: "1"}
    decided = plan(env, LIB, "glibc")
    assert decided.exec_env is None and decided.allocator == "glibc" and "not in use" in decided.warning
    with pytest.raises(AllocatorError):
        plan({**env, allocator.ENV: "jemalloc"}, LIB, "glibc")


def test_an_operator_chosen_malloc_is_left_alone():
    decided = plan({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, LIB, "glibc")
    assert decided.exec_env is None and "tcmalloc" in decided.warning


def test_bad_setting_names_the_variable():
    with pytest.raises(AllocatorError, match=r"KANMON_ALLOCATOR must be one of auto, jemalloc, glibc, not 'tcmalloc'"):
        plan({allocator.ENV: "tcmalloc"}, LIB, "glibc")


def test_loaded_allocator_reads_proc_maps():
    maps = ("7f0000000000-7f0000001000 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
            "7f0000002000-7f0000003000 r--p 00000000 08:01 124 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded_allocator(maps) == "jemalloc"
    assert allocator.loaded_allocator(maps.splitlines()[1]) == "glibc"


def test_jemalloc_figures_in_the_memory_report_parse_back():
    je = {"allocated": 40 * 2**20, "active": 44 * 2**20, "resident": int(60.5 * 2**20), "retained": 12 * 2**20}
    lines = diagnostics.format_malloc_stats(None, 10, je)
    assert lines[1] == "jemalloc: 40.0 MiB allocated, 44.0 MiB active, 60.5 MiB resident, 12.0 MiB retained"
    assert diagnostics.parse_allocator("\n".join(lines)) == {
        "python_blocks": 10, "jemalloc_allocated_mib": 40.0, "jemalloc_active_mib": 44.0,
        "jemalloc_resident_mib": 60.5, "jemalloc_retained_mib": 12.0}


PROBE = ("import json; from gateway.runtime import allocator; p = allocator.ensure(); "
         "print(json.dumps([p.allocator, allocator.current_allocator(), allocator.jemalloc_stats(), "
         "os.environ.get('LD_PRELOAD'), os.environ.get(allocator.REEXEC_MARK)]))")


def _probe(env: dict[str, str]) -> list:
    out = subprocess.run([sys.executable, "-c", "import os; " + PROBE], env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def test_the_real_restart_lands_on_jemalloc_with_its_statistics():
    if allocator.find_jemalloc() is None:
        unavailable("libjemalloc2 not installed")
    env = {k: "" for k in (allocator.ENV, allocator.REEXEC_MARK, "LD_PRELOAD")}
    chosen, running, stats, preload, mark = _probe(env)
    assert chosen == running == "jemalloc"
    assert stats["allocated"] > 1_000_000 and stats["resident"] >= stats["active"] >= stats["allocated"]
    assert (preload, mark) == (None, None), "children of the gateway get the operator's environment back"
    chosen, running, stats, preload, mark = _probe({**env, allocator.ENV: "glibc"})
    assert (chosen, running, stats) == ("glibc", "glibc", None)


def test_restored_environment_keeps_the_operators_preload():
    env = {"LD_PRELOAD": f"{LIB}:/opt/lib/libmytrace.so", allocator.REEXEC_MARK: "1", "HOME": "/root"}
    assert allocator.restored_environment(env) == {"LD_PRELOAD": "/opt/lib/libmytrace.so", "HOME": "/root"}
    assert allocator.restored_environment({"LD_PRELOAD": str(LIB), allocator.REEXEC_MARK: "1"}) == {}
    # an operator's own jemalloc preload (no mark) is theirs: untouched
    assert allocator.restored_environment({"LD_PRELOAD": str(LIB)}) == {"LD_PRELOAD": str(LIB)}
