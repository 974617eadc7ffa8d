"""Errors of the gateway process that the CLI reports (bilingual text, exit 1)."""


class StartupError(Exception):
    """The gateway refused to start (fail closed: nothing is forwarded); the message says why."""
