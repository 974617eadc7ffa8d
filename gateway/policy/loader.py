"""The I/O edge of the policy layer: read the policy file and its list files, compile."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from gateway.policy.compiler import compile_policy, parse_policy
from gateway.policy.snapshot import PolicySnapshot
from gateway.yamlsource import SourceError, SourceErrors


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceErrors([SourceError(str(path), 1, (), f"cannot read file: {exc}")]) from None


def load_policy(path: str | Path, now: datetime | None = None) -> PolicySnapshot:
    """Read, validate and compile a policy. Raises SourceErrors listing every problem
    (``file:line: key: message``); nothing is half-built."""
    policy_path = Path(path)
    text = _read(policy_path)
    doc, sources = parse_policy(text, str(policy_path))
    list_texts: dict[str, tuple[str, str]] = {}
    errors: list[SourceError] = []
    for src in sources:
        list_path = Path(src.file)
        if not list_path.is_absolute():
            list_path = policy_path.parent / list_path
        try:
            list_texts[src.name] = (str(list_path), _read(list_path))
        except SourceErrors as exc:
            # Point at the policy line that names the file, and say which file.
            errors.append(doc.error(("lists", src.name, "file"), exc.errors[0].message + f" ({list_path})"))
    if errors:
        raise SourceErrors(errors)
    return compile_policy(doc, text, sources, list_texts, now or datetime.now(timezone.utc))
