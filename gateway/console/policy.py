"""The policy pages (issue #21): the policy in force, rendered readably; test URLs for a
registered device or a group; diff a candidate against the policy in force; apply it.

One code path with the CLI everywhere: URL tests and verdict changes are
gateway/policy/urltest.py (`kanmon policy test|diff`), a registered device's context is
gateway/runtime/devicecontext.py (`policy test --device`), the apply is
gateway/runtime/policyapply.py (`kanmon policy apply`: compiled first, refused with file:line
when bad, the registry's audit entry with the operator's identity, then SIGHUP and the
gateway's confirmation). A candidate is compiled beside the policy in force (its list files
are found where the policy in force finds its own) and written there only when applied, as
``<name>.console-<UTC time>-<version>.yaml``. Reading: admin, helpdesk, auditor; diff and
apply: admin (the auditor's POST is refused by the core before any view runs).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, request

from gateway.console import auth
from gateway.console.opscatalog import O_, TEMPLATES, install, page, text, tr
from gateway.i18n import Text
from gateway.policy.compiler import parse_policy
from gateway.policy.diff import PolicyDiff, diff_documents
from gateway.policy.loader import load_policy_text
from gateway.policy.query import DeviceContext
from gateway.policy.snapshot import PolicySnapshot
from gateway.policy.urltest import MAX_TEST_URLS, RequestShape, judge_urls, read_urls, verdict_changes
from gateway.runtime.devicecontext import DeviceLookupError, registered_device_context
from gateway.runtime.policyapply import apply_policy, policy_in_force
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK
from gateway.verdict import Stage
from gateway.yamlsource import MAX_YAML_BYTES, SourceErrors, read_text_file

bp = Blueprint("policy", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's

MAX_URLS = 200                       # per request of the page (the CLI's own bound: MAX_TEST_URLS)
APPLY_TIMEOUT = 15.0
T_NOT_UTF8 = Text("候補ポリシーが UTF-8 のテキストではありません。適用していません（現在のポリシーが有効のままです）",
                  "The candidate policy is not UTF-8 text; nothing was applied (the policy in force keeps serving)")
T_EMPTY = Text("候補ポリシーが空です（貼り付けるか、ファイルを選んでください）",
               "The candidate policy is empty (paste it or choose a file)")
T_CANDIDATE_BAD = Text("候補ポリシーに誤りがあります。適用していません（現在のポリシーが有効のままです）:",
                       "The candidate policy is invalid; nothing was applied (the policy in force keeps serving):")
T_IN_FORCE_BAD = Text("適用中のポリシーファイルを読めないか、誤りがあります（ゲートウェイは最後に読み込めた版で動作しています）:",
                      "The policy file in force cannot be read or has errors (the gateway serves the last version it loaded):")
T_NO_DEVICE = Text("登録されていない端末です: {d}", "no registered device {d}")
T_TOO_MANY = Text("URL が多すぎます（1 回に {n} 件まで）", "too many URLs ({n} at most at once)")
T_WRITE_FAILED = Text("候補ポリシーを保存できません: {e}（適用していません）", "Cannot store the candidate policy: {e} (nothing applied)")


@dataclass(frozen=True)
class InForce:
    path: Path | None
    status: dict
    data: dict | None               # the parsed document
    snapshot: PolicySnapshot | None
    errors: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return self.path.parent if self.path is not None else Path(".")


_cache_lock = threading.Lock()
_cache: dict[Any, InForce] = {}


def in_force(cfg) -> InForce:
    """The policy the gateway is pointed at, parsed and compiled with the gateway's feed copies
    (cached while the file, its status and the feed copies are unchanged)."""
    path, status = policy_in_force(cfg)
    if path is None:
        return InForce(None, status, None, None)
    feeds = cfg.state_dir / "feeds"
    try:
        st = path.stat()
        feed_key = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in feeds.glob("*.json"))) if feeds.is_dir() else ()
        key = (str(path), st.st_mtime_ns, st.st_size, status.get("version"), feed_key)
    except OSError:
        key = None
    with _cache_lock:
        if key is not None and key in _cache:
            return _cache[key]
    try:
        text_ = read_text_file(path, MAX_YAML_BYTES)
        data = parse_policy(text_, str(path))[0].data
        snapshot = load_policy_text(text_, path, feeds_dir=feeds)
    except SourceErrors as exc:
        return InForce(path, status, None, None, tuple(str(e) for e in exc.errors))
    found = InForce(path, status, data, snapshot)
    if key is not None:
        with _cache_lock:
            _cache.clear()              # one policy in force: keep only the newest
            _cache[key] = found
    return found


def _lists(data: dict | None, snapshot: PolicySnapshot | None) -> list[dict]:
    out = []
    for name, spec in ((data or {}).get("lists") or {}).items():
        out.append({"name": name, "description": spec.get("description"), "description_ja": spec.get("description_ja"),
                    "source": spec.get("file") or spec.get("url"), "feed": bool(spec.get("url")),
                    "entries": (snapshot.lists.get(name) if snapshot is not None else None)})
    return out


@bp.get("/policy")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def policy_page():
    current = in_force(auth.services().cfg)
    return page("ops_policy.html", current=current, lists=_lists(current.data, current.snapshot),
                form=_test_form({}), results=None, error=None,
                errors_title=tr(T_IN_FORCE_BAD) if current.errors else None)


# -- test URLs ------------------------------------------------------------------------------------

def _test_form(args) -> dict:
    return {"urls": (args.get("urls") or "")[:20000], "device": (args.get("device") or "").strip()[:64],
            "groups": (args.get("groups") or "").strip()[:200], "ownership": args.get("ownership") or "org",
            "stage": args.get("stage") or str(Stage.RESPONSE)}


def device_for(form: dict) -> DeviceContext:
    """The registered device named in the form (as the gateway sees it now), or a test device
    of the groups and ownership given (as `kanmon policy test --group G --ownership O`)."""
    svc = auth.services()
    if form["device"]:
        try:
            return registered_device_context(svc.cfg, form["device"], registry=svc.registry)[0]
        except DeviceLookupError:
            raise ValueError(tr(T_NO_DEVICE.format(d=form["device"]))) from None
    groups = frozenset(g.strip() for g in form["groups"].split(",") if g.strip())
    ownership = form["ownership"] if form["ownership"] in ("org", "byod") else "org"
    return DeviceContext(device_id="policy-test", groups=groups, ownership=ownership)


def _stage(form: dict) -> Stage:
    try:
        return Stage(form["stage"])
    except ValueError:
        return Stage.RESPONSE


@bp.get("/policy/test")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def policy_test():
    current = in_force(auth.services().cfg)
    form = _test_form(request.args)
    urls = read_urls(form["urls"].splitlines())
    error, results = None, None
    if current.path is None:
        error = text(O_("No policy file: the gateway decides by the host rules of its configuration."))
    elif current.snapshot is None:
        error = tr(T_IN_FORCE_BAD)
    elif len(urls) > min(MAX_URLS, MAX_TEST_URLS):
        error = tr(T_TOO_MANY.format(n=MAX_URLS))
    else:
        try:
            device = device_for(form)
        except ValueError as exc:
            error = str(exc)
        else:
            results = judge_urls(current.snapshot, urls, device, RequestShape(stage=_stage(form)), datetime.now(UTC))
    return page("ops_policy.html", 400 if error else 200, current=current, lists=_lists(current.data, current.snapshot),
                form=form, results=results, error=error, errors_title=None)


# -- diff and apply -------------------------------------------------------------------------------

def candidate_text() -> str:
    """The candidate from the form: an uploaded file wins over the pasted text."""
    upload = request.files.get("candidate_file")
    raw = upload.read(MAX_YAML_BYTES + 1) if upload is not None and upload.filename else None
    if raw is None:
        textarea = request.form.get("candidate", "")
        if not textarea.strip():
            raise ValueError(tr(T_EMPTY))
        return textarea.replace("\r\n", "\n")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(tr(T_NOT_UTF8)) from None
    if not decoded.strip():
        raise ValueError(tr(T_EMPTY))
    return decoded.replace("\r\n", "\n")


@dataclass(frozen=True)
class Candidate:
    text: str
    data: dict
    snapshot: PolicySnapshot


def compile_candidate(current: InForce, text_: str, cfg) -> Candidate:
    """Compiled as the file it would become beside the policy in force. SourceErrors when bad."""
    where = current.directory / "candidate.yaml" if current.path is not None else cfg.state_dir / "candidate.yaml"
    data = parse_policy(text_, str(where))[0].data
    snapshot = load_policy_text(text_, where, feeds_dir=cfg.state_dir / "feeds")
    return Candidate(text_, data, snapshot)


def _refused(current: InForce, title: Text, errors: tuple[str, ...], status: int = 400, **extra):
    return page("ops_policy_diff.html", status, current=current, diff=None, changes=None, candidate=None,
                refusal=tr(title), refusal_errors=errors, outcome=None, **extra)


def _read_candidate(current: InForce, cfg):
    """The posted candidate compiled, or the refusal page (too large / not text, or invalid):
    diff and apply read it the same way."""
    try:
        text_ = candidate_text()
    except ValueError as exc:
        return _refused(current, Text(str(exc), str(exc)), ())
    try:
        return compile_candidate(current, text_, cfg)
    except SourceErrors as exc:
        return _refused(current, T_CANDIDATE_BAD, tuple(str(e) for e in exc.errors))


@bp.post("/policy/diff")
@auth.requires_role("admin")
def policy_diff():
    svc = auth.services()
    current = in_force(svc.cfg)
    cand = _read_candidate(current, svc.cfg)
    if not isinstance(cand, Candidate):
        return cand   # the refusal page
    diff: PolicyDiff = diff_documents(current.data or {}, cand.data, current.snapshot, cand.snapshot)
    form = _test_form(request.form)
    urls = read_urls(form["urls"].splitlines())
    changes, error = None, None
    if urls and current.snapshot is not None:
        if len(urls) > MAX_URLS:
            error = tr(T_TOO_MANY.format(n=MAX_URLS))
        else:
            try:
                changes = verdict_changes(current.snapshot, cand.snapshot, urls, device_for(form),
                                          RequestShape(stage=_stage(form)), datetime.now(UTC))
            except ValueError as exc:
                error = str(exc)
    return page("ops_policy_diff.html", current=current, diff=diff, changes=changes, tested=len(urls),
                candidate=cand, refusal=error, refusal_errors=(), outcome=None)


def store_candidate(current: InForce, cand: Candidate, cfg) -> Path:
    """Write the candidate where the policy in force lives (its list paths stay valid)."""
    directory = current.directory if current.path is not None else cfg.state_dir
    stem = current.path.stem if current.path is not None else "policy"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{stem}.console-{stamp}-{cand.snapshot.version}.yaml"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(cand.text, encoding="utf-8")
    tmp.chmod(0o640)
    tmp.replace(path)
    return path


@bp.post("/policy/apply")
@auth.requires_role("admin")
def policy_apply():
    from gateway.console.audit import actor
    svc = auth.services()
    current = in_force(svc.cfg)
    cand = _read_candidate(current, svc.cfg)
    if not isinstance(cand, Candidate):
        return cand   # the refusal page
    try:
        path = store_candidate(current, cand, svc.cfg)
    except OSError as exc:
        return _refused(current, T_WRITE_FAILED.format(e=exc), (), 500)
    outcome = apply_policy(svc.cfg, path, actor(), timeout=APPLY_TIMEOUT)
    if outcome.kind in ("invalid", "unreadable"):
        path.unlink(missing_ok=True)       # refused before anything pointed at it
    status = 200 if outcome.applied else (400 if outcome.code == 2 else 409)
    return page("ops_policy_diff.html", status, current=in_force(svc.cfg), diff=None, changes=None, candidate=None,
                refusal=None if outcome.applied else tr(outcome.text), refusal_errors=outcome.errors,
                outcome={"applied": outcome.applied, "kind": outcome.kind, "text": tr(outcome.text),
                         "version": outcome.version, "path": str(path)})

