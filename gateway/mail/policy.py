"""The mail policy: schema, semantic checks and the immutable object the engine reads.

Loading (``load_mail_policy``) is the I/O edge: it reads the YAML with gateway.yamlsource and
the free-mail list files it names. Every problem is reported as ``file:line: key: message``
and nothing is applied when there is any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.i18n import Text
from gateway.mail.freemail import parse_freemail_list
from gateway.mail.indicators import ALL_NAMES, MailAction, Name
from gateway.mail.outbound import GUARD_NAMES, OutboundGuard  # noqa: I001 (own line: merges with issue #20's other half)
from gateway.mail.limits import MessageLimits
from gateway.mail.themes import ThemeMatcher, ThemePhrase, parse_theme_list
from gateway.yamlsource import MAX_LIST_BYTES, LoadedYaml, SourceErrors, load_yaml_file, read_text_file, schema_errors

_ACTIONS = [str(a) for a in MailAction]
_DOMAIN_PATTERN = r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\.?$"

# Default lists; the policy can add to them (attachments.extra_*).
EXECUTABLE_EXTENSIONS = frozenset({
    "exe", "scr", "cpl", "com", "pif", "bat", "cmd", "js", "jse", "vbs", "vbe", "wsf", "wsh",
    "wsc", "hta", "ps1", "psm1", "psd1", "msi", "msp", "mst", "jar", "reg", "dll", "ocx", "sys",
    "gadget", "application", "appref-ms", "msc", "inf", "sct", "chm", "xll", "xlam", "ppam",
    "sh", "bash", "run", "elf", "bin", "app", "command", "apk", "ipa", "mobileconfig",
    # Disk images auto-mount on Windows and drop the Mark-of-the-Web of what they contain.
    "iso", "img", "vhd", "vhdx",
})
SHORTCUT_EXTENSIONS = frozenset({"lnk", "url", "scf", "website", "desktop", "settingcontent-ms"})
# What a double extension pretends to be (the part before the real, dangerous extension).
DECOY_EXTENSIONS = frozenset({
    "pdf", "doc", "docx", "docm", "xls", "xlsx", "xlsm", "ppt", "pptx", "txt", "rtf", "csv",
    "jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "mp3", "mp4", "mov", "avi", "wav",
    "htm", "html", "zip", "lzh", "7z", "rar", "jtd", "jtdc", "hwp", "odt", "ods", "odp", "xml",
})

# always: every message with HTML is delivered as text, in both directions (IMAP FETCH, POP3
# RETR, SMTP submission); inbound: only mail a device receives; neutralized: only messages the
# neutralize action rewrites (the behaviour before issue #20).
HTML_TO_TEXT = ("always", "inbound", "neutralized")

_STR_LIST = {"type": "array", "items": {"type": "string", "minLength": 1}}
_DOMAIN_LIST = {"type": "array", "items": {"type": "string", "pattern": _DOMAIN_PATTERN}}
_ENTITY = {
    "type": "object", "additionalProperties": False, "required": ["domains"],
    "properties": {"label": {"type": "string"}, "names": _STR_LIST, "domains": _DOMAIN_LIST},
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "thresholds", "indicators", "organization"],
    "properties": {
        "version": {"const": 1},
        "thresholds": {
            "type": "object", "additionalProperties": False,
            "required": ["tag", "neutralize", "quarantine", "reject"],
            "properties": {k: {"type": "integer", "minimum": 1} for k in ("tag", "neutralize", "quarantine", "reject")},
        },
        "indicators": {
            "type": "object", "additionalProperties": False, "required": list(ALL_NAMES),
            "properties": {
                name: {
                    "type": "object", "additionalProperties": False, "required": ["weight"],
                    "properties": {
                        "weight": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "at_least": {"enum": _ACTIONS},
                    },
                } for name in ALL_NAMES
            },
        },
        "encrypted_archive": {"enum": _ACTIONS},
        "scanner_unavailable": {"enum": _ACTIONS},
        "malformed_message": {"enum": _ACTIONS},
        "too_complex": {"enum": _ACTIONS},
        "limits": {
            "type": "object", "additionalProperties": False,
            "properties": {k: {"type": "integer", "minimum": 1} for k in MessageLimits.__dataclass_fields__},
        },
        "judge": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "cpu_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
                "memory_mb": {"type": "integer", "minimum": 128},
                "wall_seconds": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "organization": _ENTITY,
        "partners": {"type": "array", "items": _ENTITY},
        "trusted_authserv_ids": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "authentication": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "verify_dkim": {"type": "boolean"},
                "failing_results": {
                    "type": "object", "additionalProperties": False,
                    "properties": {m: _STR_LIST for m in ("spf", "dkim", "dmarc")},
                },
            },
        },
        "lookalike": {
            "type": "object", "additionalProperties": False,
            "properties": {"max_edit_distance": {"type": "integer", "minimum": 0, "maximum": 3}},
        },
        "freemail": {
            "type": "object", "additionalProperties": False,
            "properties": {"lists": _STR_LIST, "extra": _DOMAIN_LIST, "allow": _DOMAIN_LIST},
        },
        "themes": {   # issue 20: phrase lists of the mail themes (gateway/mail/themes.py)
            "type": "object", "additionalProperties": False,
            "properties": {"lists": _STR_LIST},
        },
        "non_japanese_han": {
            "type": "object", "additionalProperties": False,
            "properties": {"min_chars": {"type": "integer", "minimum": 1, "maximum": 1000}},
        },
        "attachments": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "extra_executable_extensions": _STR_LIST,
                "extra_shortcut_extensions": _STR_LIST,
                "padding_min_run": {"type": "integer", "minimum": 2, "maximum": 64},
            },
        },
        "archives": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "max_depth": {"type": "integer", "minimum": 1, "maximum": 10},
                "max_members": {"type": "integer", "minimum": 1},
                "max_total_bytes": {"type": "integer", "minimum": 1},
            },
        },
        "tag": {
            "type": "object", "additionalProperties": False,
            "properties": {"subject_prefix": {"type": "string", "minLength": 1}},
        },
        "outbound_indicators": {"type": "array", "items": {"enum": list(ALL_NAMES)}},
        # issue #20: HTML mail delivered as text (rewrite.py) and the outbound guard (outbound.py).
        "html_to_text": {"enum": list(HTML_TO_TEXT)},
        "outbound_guard": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "max_external_recipients": {"type": "integer", "minimum": 0},
                "max_external_domains": {"type": "integer", "minimum": 0},
                "labels": _STR_LIST,
                "action": {"enum": ["reject", "quarantine"]},
                "internal_domains": _DOMAIN_LIST,
                "transfer_service": {"type": "string", "minLength": 1, "maxLength": 200},
            },
        },
        "clamd": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "socket": {"type": "string", "minLength": 1},
                "host": {"type": "string", "minLength": 1},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "timeout_seconds": {"type": "number", "exclusiveMinimum": 0},
            },
        },
    },
}


@dataclass(frozen=True)
class Entity:
    """An organization or partner whose names and domains may be impersonated."""

    label: str
    names: tuple[str, ...]
    domains: tuple[str, ...]


@dataclass(frozen=True)
class ClamdAddress:
    socket: str | None = None
    host: str | None = None
    port: int | None = None
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class JudgeLimits:
    """The gateway's mail judge pool (judgepool.py): worker processes, and what one judgement
    may use before its worker is ended and the message gets message-too-complex."""

    workers: int = 2
    cpu_seconds: int = 10
    memory_mb: int = 1024
    wall_seconds: float = 120.0


@dataclass(frozen=True)
class MailPolicy:
    thresholds: dict[MailAction, int]
    weights: dict[str, int]
    floors: dict[str, MailAction]
    organization: Entity
    partners: tuple[Entity, ...] = ()
    trusted_authserv_ids: frozenset[str] = frozenset()
    verify_dkim: bool = True
    failing_results: dict[str, frozenset[str]] = field(default_factory=lambda: {
        "spf": frozenset({"fail", "softfail", "permerror"}),
        "dkim": frozenset({"fail", "permerror"}),
        "dmarc": frozenset({"fail"}),
    })
    max_edit_distance: int = 1
    freemail_domains: frozenset[str] = frozenset()
    executable_extensions: frozenset[str] = EXECUTABLE_EXTENSIONS
    shortcut_extensions: frozenset[str] = SHORTCUT_EXTENSIONS
    decoy_extensions: frozenset[str] = DECOY_EXTENSIONS
    padding_min_run: int = 3
    archive_max_depth: int = 3
    archive_max_members: int = 500
    archive_max_total_bytes: int = 50 * 1024 * 1024
    subject_prefix: str = "[要注意/SUSPICIOUS] "
    malformed_message: MailAction = MailAction.QUARANTINE
    too_complex: MailAction = MailAction.QUARANTINE   # action for message-too-complex (limits.py)
    limits: MessageLimits = MessageLimits()
    judge: JudgeLimits = JudgeLimits()
    outbound_indicators: frozenset[str] = frozenset({
        Name.EXECUTABLE_ATTACHMENT, Name.SHORTCUT_ATTACHMENT, Name.DOUBLE_EXTENSION,
        Name.EXTENSION_PADDING, Name.FILENAME_CONTROL_CHARS, Name.ARCHIVE_THREAT,
        Name.ARCHIVE_ENCRYPTED, Name.VIRUS_DETECTED, Name.VIRUS_SCAN_UNAVAILABLE,
    })
    html_to_text: str = "always"                        # issue #20 (rewrite.html_as_text)
    outbound_guard: OutboundGuard = OutboundGuard()     # issue #20 (outbound.py)
    clamd: ClamdAddress | None = None
    themes: ThemeMatcher = field(default_factory=ThemeMatcher)   # issue 20
    han_min_chars: int = 3

    @property
    def protected(self) -> tuple[Entity, ...]:
        return (self.organization, *self.partners)

    def converts_html(self, direction: str) -> bool:
        """Whether a message in ``direction`` has its HTML delivered as text (rewrite.py)."""
        return self.html_to_text == "always" or (self.html_to_text == "inbound" and direction == "inbound")

    @property
    def protected_domains(self) -> tuple[str, ...]:
        return tuple(d for e in self.protected for d in e.domains)


def policy_from_doc(doc: LoadedYaml, freemail_domains: frozenset[str],
                    themes: tuple[ThemePhrase, ...] = ()) -> MailPolicy:
    """Build the policy from a validated document (pure). Raises SourceErrors."""
    errors = schema_errors(doc, SCHEMA)
    if errors:
        raise SourceErrors(errors)
    data = doc.data
    thresholds = {MailAction(k): v for k, v in data["thresholds"].items()}
    order = [MailAction.TAG, MailAction.NEUTRALIZE, MailAction.QUARANTINE, MailAction.REJECT]
    for lower, upper in zip(order, order[1:]):
        if thresholds[lower] > thresholds[upper]:
            errors.append(doc.error(("thresholds", str(upper)),
                                    Text(f"thresholds.{lower} ({thresholds[lower]}) 以上にしてください",
                                         f"must be >= thresholds.{lower} ({thresholds[lower]})")))
    weights = {name: spec["weight"] for name, spec in data["indicators"].items()}
    floors = {name: MailAction(spec["at_least"]) for name, spec in data["indicators"].items() if "at_least" in spec}
    for name, key in ((Name.ARCHIVE_ENCRYPTED, "encrypted_archive"), (Name.VIRUS_SCAN_UNAVAILABLE, "scanner_unavailable")):
        if name in floors:
            errors.append(doc.error(("indicators", str(name), "at_least"),
                                    Text(f"これは最上位のキー {key} で設定してください", f"set this with the top-level key {key}")))
    floors[str(Name.ARCHIVE_ENCRYPTED)] = MailAction(data.get("encrypted_archive", "tag"))
    floors[str(Name.VIRUS_SCAN_UNAVAILABLE)] = MailAction(data.get("scanner_unavailable", "quarantine"))
    clamd = None
    if "clamd" in data:
        c = data["clamd"]
        if ("socket" in c) == ("host" in c):
            errors.append(doc.error(("clamd",), Text("socket か host (+ port) のどちらか一方を書いてください",
                                                 "give exactly one of socket or host (+ port)")))
        elif "host" in c and "port" not in c:
            errors.append(doc.error(("clamd", "host"), Text("host には port が必要です", "host needs port")))
        clamd = ClamdAddress(c.get("socket"), c.get("host"), c.get("port"), float(c.get("timeout_seconds", 30)))
    if errors:
        raise SourceErrors(errors)

    def entity(d: dict[str, Any], default_label: str) -> Entity:
        return Entity(d.get("label", default_label), tuple(d.get("names", ())),
                      tuple(x.lower().rstrip(".") for x in d["domains"]))

    auth = data.get("authentication", {})
    failing = dict(MailPolicy.__dataclass_fields__["failing_results"].default_factory())  # type: ignore[misc]
    for method, results in auth.get("failing_results", {}).items():
        failing[method] = frozenset(r.lower() for r in results)
    fm = data.get("freemail", {})
    allow = {d.lower() for d in fm.get("allow", ())}
    domains = (freemail_domains | {d.lower() for d in fm.get("extra", ())}) - allow
    att = data.get("attachments", {})
    arc = data.get("archives", {})
    kwargs: dict[str, Any] = {}
    if "outbound_indicators" in data:
        kwargs["outbound_indicators"] = frozenset(data["outbound_indicators"])
    if "tag" in data and "subject_prefix" in data["tag"]:
        kwargs["subject_prefix"] = data["tag"]["subject_prefix"]
    if "html_to_text" in data:
        kwargs["html_to_text"] = data["html_to_text"]
    guard = outbound_guard_from(data.get("outbound_guard", {}))
    for name in GUARD_NAMES:   # the guard's action whatever the score (weight 0)
        floors[name] = guard.action
    return MailPolicy(
        thresholds=thresholds,
        weights=weights,
        floors=floors,
        organization=entity(data["organization"], "organization"),
        partners=tuple(entity(p, f"partner {i + 1}") for i, p in enumerate(data.get("partners", ()))),
        trusted_authserv_ids=frozenset(x.lower() for x in data.get("trusted_authserv_ids", ())),
        verify_dkim=auth.get("verify_dkim", True),
        failing_results=failing,
        max_edit_distance=data.get("lookalike", {}).get("max_edit_distance", 1),
        freemail_domains=frozenset(domains),
        executable_extensions=EXECUTABLE_EXTENSIONS | {e.lower().lstrip(".") for e in att.get("extra_executable_extensions", ())},
        shortcut_extensions=SHORTCUT_EXTENSIONS | {e.lower().lstrip(".") for e in att.get("extra_shortcut_extensions", ())},
        padding_min_run=att.get("padding_min_run", 3),
        archive_max_depth=arc.get("max_depth", 3),
        archive_max_members=arc.get("max_members", 500),
        archive_max_total_bytes=arc.get("max_total_bytes", 50 * 1024 * 1024),
        malformed_message=MailAction(data.get("malformed_message", "quarantine")),
        too_complex=MailAction(data.get("too_complex", "quarantine")),
        limits=MessageLimits(**data.get("limits", {})),
        judge=JudgeLimits(**data.get("judge", {})),
        outbound_guard=guard,
        clamd=clamd,
        themes=ThemeMatcher(themes),
        han_min_chars=data.get("non_japanese_han", {}).get("min_chars", 3),
        **kwargs,
    )


def outbound_guard_from(g: dict[str, Any]) -> OutboundGuard:
    default = OutboundGuard()
    return OutboundGuard(
        enabled=g.get("enabled", default.enabled),
        max_external_recipients=g.get("max_external_recipients", default.max_external_recipients),
        max_external_domains=g.get("max_external_domains", default.max_external_domains),
        labels=tuple(g.get("labels", default.labels)),
        action=MailAction(g.get("action", str(default.action))),
        internal_domains=tuple(d.lower().rstrip(".") for d in g.get("internal_domains", ())),
        transfer_service=g.get("transfer_service", default.transfer_service),
    )


def _cannot_read(path: Path, exc: SourceErrors) -> Text:
    first = exc.errors[0]
    return Text(f"{path} を読めません: {first.ja or first.message}", f"cannot read {path}: {first.message}")


def load_mail_policy(path: str | Path) -> MailPolicy:
    """Read the policy file and the free-mail and theme lists it names (paths relative to it)."""
    doc = load_yaml_file(path)
    errors = schema_errors(doc, SCHEMA)
    if errors:
        raise SourceErrors(errors)
    base = Path(path).parent
    domains: set[str] = set()
    for index, name in enumerate(doc.data.get("freemail", {}).get("lists", ())):
        list_path = base / name
        try:
            text = read_text_file(list_path, MAX_LIST_BYTES)  # a regular file within a bound (issue #15)
        except SourceErrors as exc:
            errors.append(doc.error(("freemail", "lists", index), _cannot_read(list_path, exc)))
            continue
        entries, list_errors = parse_freemail_list(text, str(list_path))
        errors.extend(list_errors)
        domains.update(e.domain for e in entries)
    phrases: list[ThemePhrase] = []
    for index, name in enumerate(doc.data.get("themes", {}).get("lists", ())):
        list_path = base / name
        try:
            text = read_text_file(list_path, MAX_LIST_BYTES)
        except SourceErrors as exc:
            errors.append(doc.error(("themes", "lists", index), _cannot_read(list_path, exc)))
            continue
        entries, list_errors = parse_theme_list(text, str(list_path))
        errors.extend(list_errors)
        phrases.extend(entries)
    if errors:
        raise SourceErrors(errors)
    return policy_from_doc(doc, frozenset(domains), tuple(phrases))
