"""The addon chain, built in one place. `kanmon run` (gateway/runtime/app.py) builds it here,
so the order that decides verdicts is the same wherever the gateway runs (the e2e lab starts
the real `kanmon run`; tests/unit/test_chain.py checks the order).

The order (each addon wrapped by `Guarded`, so any exception fails closed):

    identity ─► per-device limits ─► authority ─► decision (policy, or host rules)
      ─► no-inspect binding ─► DNS bypass guard ─► operator extras ─► quarantine
      ─► mail filter ─► sign-in gate ─► enforcer ─► download scanner ─► block observer
      ─► access log ─► connection cutter

Deciders only record verdicts (the strictest wins, addons/flowverdict.py); the enforcer acts on
the combined verdict; the download scanner (issue #18) holds risky downloads for clamd and the
block observer feeds automatic quarantine (both act on the verdict that stood); the access log
writes what was decided; the cutter closes connections
the reconciler cut. The layer decision (addons/protocol.py) runs before the chain, in the
proxy's own layer hook (`layer_decision`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from addons.accesslog import AccessLog
from addons.autoquarantine import BlockObserver
from addons.blockpage import Helpdesk
from addons.cutoff import ConnectionCutter
from addons.dnsguard import DnsBypassGuard, NoInspectBinding
from addons.enforce import Enforcer
from addons.failclosed import FailClosedActions, Guarded
from addons.hostrules import HostRuleDecider
from addons.identity import DeviceDirectory, DeviceIdentity
from addons.limits import DeviceLimits
from addons.policy import PolicyDecider, PolicyHolder
from addons.protocol import ProtocolIdentifier
from addons.quarantine import QuarantineGate
from addons.requesttarget import RequestAuthority
from addons.scan import DownloadScanner
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.net import limitsnft
from gateway.proxy.connections import LiveConnections
from gateway.proxy.dnsbinding import DnsBindings
from gateway.scan.clamdclient import AsyncClamd
from gateway.i18n import Text
from gateway.yamlsource import SourceErrors, errors_text


class ChainError(Exception):
    """An addon of the chain cannot be built (an operator extra does not load, the mail policy
    has errors): the gateway must not start (fail closed). ``text``: why, in both languages."""

    def __init__(self, text: Text) -> None:
        self.text = text
        super().__init__(text.en)


@dataclass
class ChainParts:
    """What the chain needs from the gateway process."""

    cfg: GatewayConfig
    connections: LiveConnections
    directory: DeviceDirectory
    metrics: GatewayMetrics
    logstore: Any                         # gateway.logstore.LogStore
    cutter: ConnectionCutter
    internal_networks: list
    dns_bindings: DnsBindings
    fail: Callable[[str], None]           # stop the gateway (an addon that cannot go on)
    underlay: Any = None                  # gateway.net.underlay.UnderlayAddresses (policy conditions)
    policy: PolicyHolder | None = None    # None: the config's host rules decide
    signin: Any = None                    # gateway.signin.service.SignInService, when configured
    autoquarantine: Any = None            # gateway.autoquarantine.service.AutoQuarantiner, when configured


def load_extra_addon(spec: str) -> Any:
    module_name, _, class_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)()
    except Exception as exc:
        raise ChainError(Text(f"addons.extra: {spec} を読み込めません: {exc}", f"addons.extra: cannot load {spec}: {exc}")) from exc


def build_chain(parts: ChainParts) -> list[Any]:
    """The production chain, every addon guarded. Raises ChainError."""
    cfg = parts.cfg
    signin = parts.signin
    helpdesk = Helpdesk(cfg.helpdesk_ja, cfg.helpdesk_en, cfg.helpdesk_contact)
    policy = parts.policy
    enforcer = Enforcer(parts.connections, parts.metrics, helpdesk, parts.internal_networks, parts.cutter.cut,
                        sinkhole=(cfg.sinkhole_ipv4, cfg.sinkhole_ipv6),
                        # issue #19: the block pages' organization, rule texts and sign-in link
                        organization=cfg.organization,
                        policy_view=(lambda: policy.current.snapshot) if policy is not None else None,
                        signin_portal=cfg.signin.portal_host if cfg.signin is not None else None)

    def signed_in_user(device) -> str | None:
        session = signin.session_for(device) if signin is not None else None
        return session.user if session is not None else None

    user_of = signed_in_user if signin is not None else None
    accesslog = AccessLog(parts.logstore, on_log_failure=cfg.log_on_write_error, connections=parts.connections,
                          user_of=user_of)
    actions = FailClosedActions(parts.connections, parts.metrics, enforcer.block_http, parts.cutter.cut, parts.fail)
    session_of = signin.session_for if signin is not None else None
    if policy is not None:
        decider = PolicyDecider(policy, parts.connections, underlay_of=parts.underlay,
                                decision_seconds=parts.metrics.decision_seconds, session_of=session_of)
    else:
        decider = HostRuleDecider(cfg.host_rules, cfg.default_action, parts.connections, cfg.no_sni)
    rule_info = (lambda rule_id: policy.current.snapshot.rule(rule_id)) if policy is not None else None
    chain = [
        DeviceIdentity(parts.directory, parts.connections, parts.metrics, on_refused=accesslog.refused_client),
        # issue #14: over its per-device limits a device's connection is refused here, before any work
        DeviceLimits(cfg.limits, parts.connections, parts.directory, parts.metrics, parts.logstore,
                     kernel_counters=lambda: limitsnft.read_counters(limitsnft.table_name(cfg.nft_table))),
        RequestAuthority(parts.connections),   # issue #14: judge the authority the upstream will see
        decider,
        NoInspectBinding(parts.connections, parts.dns_bindings),
        DnsBypassGuard(parts.connections, dot_resolvers=cfg.dot_resolvers, rule_info=rule_info),
        *[load_extra_addon(spec) for spec in cfg.extra_addons],
        QuarantineGate(parts.connections, cfg.quarantine_allow_hosts),
        *_mail_addons(parts, user_of),     # issue #5: decides (private mail servers) before the enforcer
        *_signin_addons(parts, helpdesk),  # issue #9: unsigned devices reach only the sign-in path
        enforcer,
        *_data_path_addons(parts, enforcer, user_of),   # issue #18: after the enforcer
        accesslog,
        parts.cutter,
    ]
    return [Guarded(addon, actions) for addon in chain]


def layer_decision(parts: ChainParts) -> ProtocolIdentifier:
    """The proxy's layer hook (which protocol a connection speaks), before the chain."""
    return ProtocolIdentifier(parts.connections)


def chain_names(chain: list[Any]) -> list[str]:
    """The class names of a built chain, in order (logged at start; compared by the tests)."""
    return [type(guarded.inner).__name__ for guarded in chain]


def _mail_addons(parts: ChainParts, user_of) -> list[Any]:
    """The mail filter when the config has a `mail:` section. Its policy must load, or the
    gateway does not start (fail closed, errors with file:line)."""
    cfg = parts.cfg
    if cfg.mail is None:
        return []
    from addons.mail import MailFilter
    try:
        mail = MailFilter.from_config(cfg.mail, cfg.state_dir, parts.connections, parts.metrics,
                                      parts.logstore, parts.cutter.cut)
    except SourceErrors as exc:
        raise ChainError(errors_text(Text("メールポリシーを読み込めません:", "the mail policy does not load:"),
                                     exc.errors)) from None
    if user_of is not None:
        mail.user_of = user_of
    if parts.autoquarantine is not None:
        mail.on_virus = parts.autoquarantine.virus   # issue #18: a virus in received mail
    return [mail]


def _data_path_addons(parts: ChainParts, enforcer: Enforcer, user_of) -> list[Any]:
    """Issue #18: the download scanner (when `scan:` is configured) and automatic quarantine's
    block observer (when `auto_quarantine:` is). Right after the enforcer: they act on the
    verdict that stood."""
    cfg, quarantiner = parts.cfg, parts.autoquarantine
    out: list[Any] = []
    if getattr(cfg, "scan", None) is not None:
        s = cfg.scan
        client = AsyncClamd(s.clamd_socket, s.clamd_host, s.clamd_port, s.timeout_seconds, s.max_concurrent)
        out.append(DownloadScanner(s, client, parts.connections, parts.metrics, parts.logstore, enforcer.block_http,
                                   parts.cutter.cut, on_virus=quarantiner.virus if quarantiner is not None else None,
                                   user_of=user_of))
    if quarantiner is not None:
        out.append(BlockObserver(parts.connections, quarantiner.blocked, user_of=user_of))
    return out


def _signin_addons(parts: ChainParts, helpdesk: Helpdesk) -> list[Any]:
    if parts.signin is None:
        return []
    from addons.signin import SignInGate
    cfg = parts.cfg
    return [SignInGate(parts.signin, parts.connections, helpdesk.contact,
                       portal_addresses=(cfg.sinkhole_ipv4, cfg.sinkhole_ipv6),
                       organization=cfg.organization)]   # issue #19
