"""Each category feed's state as `kanmon lists status` and the console's feeds page show it
(issue #21): source, last success, the copy in use (age, entries per category), the last
error and the allow exceptions. Reads the feed directory; never fetches."""

from __future__ import annotations

from pathlib import Path


def feed_status(spec, directory: Path, now: float) -> dict:
    from gateway.feeds.store import load_snapshot, load_state

    state = load_state(directory, spec.name)
    try:
        snap = load_snapshot(directory, spec.name)
    except Exception as exc:  # noqa: BLE001 - a damaged copy is shown as such
        snap, damaged = None, str(exc)
    else:
        damaged = None
    return {
        "name": spec.name, "source": spec.url, "format": spec.format,
        "last_success": state.last_success, "last_attempt": state.last_attempt,
        "copy_fetched_at": snap.fetched_at if snap else None,
        "copy_sha256": snap.sha256 if snap else None,
        "age_seconds": round(now - snap.fetched_at) if snap else None,
        "entries": {c: len(v) for c, v in snap.categories.items()} if snap else {},
        "skipped_lines": snap.skipped() if snap else 0,
        "last_error": damaged or state.last_error, "last_error_reason": state.last_error_reason,
        "failures": dict(state.failures or {}),
        "exceptions": [{"host": a.host, "reason": a.reason, "expires": a.expires.isoformat()} for a in spec.allow],
    }


def policy_feeds(policy_path: Path) -> list:
    """The feeds the policy file declares (its ``lists:`` with a ``url``). SourceErrors when
    the policy cannot be read or parsed."""
    from gateway.policy.compiler import parse_policy
    from gateway.yamlsource import MAX_YAML_BYTES, read_text_file

    _doc, sources = parse_policy(read_text_file(policy_path, MAX_YAML_BYTES), str(policy_path))
    return [s.feed for s in sources if s.feed is not None]
