"""What a test does when something it needs is not on this machine: outside CI it skips with
the reason; with CI=true it fails, so a CI run can never pass without it."""

from __future__ import annotations

import os

import pytest


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: this test must run)")
    pytest.skip(reason)
