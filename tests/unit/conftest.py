"""Fixtures shared by unit tests."""

from __future__ import annotations

import os

import pytest

from tests.availability import unavailable


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the registry tests (initdb/pg_ctl in a temp dir, own
    port and socket dir; never the system cluster). Fails instead of skipping with CI=true."""
    from gateway.lab.cluster import PostgresServer, postgres_prerequisites

    missing = postgres_prerequisites()
    if missing:
        reason = "PostgreSQL tests cannot run here: missing " + ", ".join(missing)
        unavailable(reason)
    server = PostgresServer().init().start()
    yield server
    server.destroy()
