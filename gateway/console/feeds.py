"""Feeds status (issue #21): every category feed of the policy in force, as `kanmon lists
status` shows it (gateway/feeds/status.py, the same function): source, last success, the copy
in use (age, entries per category, checksum), failures and the last error. Read roles only;
reading never fetches."""

from __future__ import annotations

import time

from flask import Blueprint

from gateway.console import auth
from gateway.console.opscatalog import TEMPLATES, install, page
from gateway.feeds.status import feed_status, policy_feeds
from gateway.runtime.policyapply import policy_in_force
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK
from gateway.yamlsource import SourceErrors

bp = Blueprint("feeds", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


@bp.get("/feeds")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def feeds_page():
    cfg = auth.services().cfg
    path, _status = policy_in_force(cfg)
    rows, errors = [], ()
    if path is not None:
        try:
            specs = policy_feeds(path)
        except SourceErrors as exc:
            specs, errors = [], tuple(str(e) for e in exc.errors)
        now = time.time()
        rows = [feed_status(s, cfg.state_dir / "feeds", now) for s in specs]
    return page("ops_feeds.html", rows=rows, policy=path, errors=errors, when=_when,
                stale=[r["name"] for r in rows if not r["copy_fetched_at"]])
