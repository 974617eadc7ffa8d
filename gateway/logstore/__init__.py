"""Kanmon's log store: tamper-evident, per-day JSON Lines files for the proxy, conn, dns,
auth, mail and audit streams (issue #6, "Logs"). Field names: FIELDS.md."""

from .chain import GENESIS
from .fields import REQUIRED_FIELDS, missing_required_fields, verdict_fields
from .layout import STREAMS
from .redact import DEFAULT_REDACTED_PARAMS, DEFAULT_REDACTION, RedactionRule, redact_query, redact_url
from .retention import DEFAULT_RETENTION_DAYS, PurgeReport, purge, retention_cutoff
from .search import search
from .syslog_forward import SyslogForwarder, format_rfc5424
from .verify import Finding, VerifyReport, verify
from .writer import FSYNC_MODES, LogStore, LogWriteError

__all__ = [
    "DEFAULT_REDACTED_PARAMS", "DEFAULT_REDACTION", "DEFAULT_RETENTION_DAYS", "FSYNC_MODES",
    "Finding", "GENESIS", "LogStore", "LogWriteError", "PurgeReport", "REQUIRED_FIELDS",
    "RedactionRule", "STREAMS", "SyslogForwarder", "VerifyReport", "format_rfc5424",
    "missing_required_fields", "purge", "redact_query", "redact_url", "retention_cutoff",
    "search", "verdict_fields", "verify",
]
