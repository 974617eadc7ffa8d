"""Issue #16: the layering contract ([tool.importlinter] in pyproject.toml, ARCHITECTURE.md)
holds, and it is not vacuous: an upward import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lint_available():
    if not LINT.exists():
        pytest.fail(f"lint-imports is not installed beside {sys.executable} (pip install -e '.[test]')")


def test_the_layers_hold(lint_available):
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(lint_available, tmp_path):
    copy = tmp_path / "tree"
    for part in ("gateway", "addons"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    steering = copy / "gateway" / "net" / "steering.py"
    steering.write_text(steering.read_text().replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nfrom gateway.runtime.gatewayprocess import poke_reconcile  # noqa\n", 1))
    done = lint(copy)
    assert done.returncode != 0
    assert "gateway.net is not allowed to import gateway.runtime" in done.stdout
