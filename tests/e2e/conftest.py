"""Fixtures for end-to-end tests in network namespaces (see gateway/lab/topology.py).

Outside CI these tests skip with the reason when the machine cannot run them (not root,
tools missing); with CI=true they fail instead, so a CI run can never pass without them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.lab.topology import Lab, lab_prerequisites
from tests.availability import unavailable

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def require_lab() -> None:
    missing = lab_prerequisites()
    if not missing:
        return
    reason = "end-to-end lab cannot run here: missing " + ", ".join(missing)
    unavailable(reason)


def _keep_evidence(lab: Lab, name: str) -> None:
    """Copy the gateway log and logs into artifacts/ for a failed or interesting run."""
    dest = ARTIFACTS / "e2e" / name
    dest.mkdir(parents=True, exist_ok=True)
    for src in (lab.workdir / "gateway.log", lab.web_dir / "access.log", lab.workdir / "dns-server.log"):
        if src.exists():
            shutil.copy(src, dest / src.name)


@pytest.fixture
def make_lab(tmp_path_factory, request):
    """Factory: build a lab with N devices and optional gateway config overrides."""
    require_lab()
    labs: list[Lab] = []

    def factory(n_devices: int = 2, overrides: dict | None = None, start: bool = True) -> Lab:
        lab = Lab(tmp_path_factory.mktemp("lab"), n_devices=n_devices, config_overrides=overrides or {})
        labs.append(lab)
        lab.build()
        if start:
            lab.start_gateway()
            for device in lab.devices:
                lab.wait_for_peer(device)
        return lab

    yield factory
    for lab in labs:
        try:
            _keep_evidence(lab, request.node.name)
        finally:
            lab.teardown()


FAULTY_ADDON = "tests.e2e.faulty_addon:ExplodeOnMarkedRequest"


@contextmanager
def running_lab(lab: Lab, evidence: str, *, start: bool = True) -> Iterator[Lab]:
    """Build the lab (and with ``start``, start the gateway and wait for every device's
    peer); on the way out keep its logs under artifacts/e2e/<evidence>/, then tear it down."""
    try:
        lab.build()
        if start:
            lab.start_gateway()
            for device in lab.devices:
                lab.wait_for_peer(device)
        yield lab
    finally:
        try:
            _keep_evidence(lab, evidence)
        finally:
            lab.teardown()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    """One running gateway with two devices, shared by a module's tests that leave it as
    they found it. Includes a deliberately faulty extra addon (fail-closed test)."""
    require_lab()
    lab = Lab(tmp_path_factory.mktemp("lab"), n_devices=2, config_overrides={"addons": {"extra": [FAULTY_ADDON]}})
    with running_lab(lab, request.module.__name__.rsplit(".", 1)[-1]):
        yield lab
