"""Mail at the edge (issue #5): the I/O side of the mail filter.

Decision part (before the enforcer): on the mail ports 25/465/587 (SMTP), 110/995 (POP3),
143/993 (IMAP) only the organization's mail hosts (config ``mail.organization_hosts``) are
reachable; every other destination is blocked (IPA SME sample 7.3: no private mail
servers). Names are matched against the TLS SNI, addresses against the destination; the
upstream certificate is verified against the SNI before any byte is relayed, so a forged
SNI towards another server fails the handshake. STARTTLS cannot be intercepted, which is
why the plaintext ports reach only the organization's own hosts.

Data part: a mail connection gets a protocol adapter (gateway/mail/adapters) that holds
each message, has it judged by the verdict engine (gateway/mail/engine.py, clamd for the
virus scan) and releases the original, a rewrite or a notice; quarantined messages go to
the quarantine store under the state dir. Every verdict is logged to the ``mail`` stream and
counted in ``kanmon_mail_messages_total{verdict,direction}`` (once per message) and
``kanmon_mail_verdicts_total{verdict,indicator}`` (once per indicator).

mitmproxy specifics:
* TLS mail ports: the server connection is made before the client handshake
  (``establish_server_tls_first``), so the server's greeting reaches the client; the flow
  then becomes a raw TCP flow. Plaintext mail ports: the server speaks first and the client
  sends nothing, so mitmproxy's layer detection would wait forever — the connection's top
  layer is replaced by one that goes straight to raw TCP.
* The adapter's answers in the other direction (a 550 for a refused recipient, the message
  released towards the server after a server reply) are injected with ``inject.tcp``; the
  injected chunk comes back through ``tcp_message`` and is recognised by identity.
* Judging runs in a worker thread (clamd and DKIM lookups block); mitmproxy holds the
  connection's next events until the hook returns, so chunks stay in order. The thread only
  waits: the message itself is judged in a worker process of the judge pool
  (gateway/mail/judgepool.py, issue #15), so no message can stall the proxy; a judgement that
  cannot be made (no worker, a worker failed) raises, and the fail-closed guard cuts the
  connection.
* ``flow.kill()`` does not close raw TCP flows: cuts go through ConnectionCutter.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import logging
import threading
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, ctx, tcp, tls
from mitmproxy.proxy import commands, events, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.utils import expect

from addons.flowverdict import record_verdict
from gateway.proxy.flowstate import METADATA_DEVICE, METADATA_VERDICT
from gateway.autoquarantine.triggers import Trigger
from gateway.config import MailSettings
from gateway.proxy.connections import LiveConnections
from gateway.hostname import canonical_address, host_in, normalize_host
from gateway.logstore import verdict_fields
from gateway.mail.adapters import Judgement, Output
from gateway.mail.adapters.imap import ImapAdapter
from gateway.mail.adapters.pop3 import Pop3Adapter
from gateway.mail.adapters.smtp import SmtpAdapter
from gateway.mail.clamd import ClamdScanner
from gateway.mail.engine import MailContext, MailVerdict
from gateway.mail.freemail import freemail_match
from gateway.mail.indicators import Name
from gateway.mail.judgement import Outcome, judge_message
from gateway.mail.judgepool import JudgePool
from gateway.mail.policy import MailPolicy, load_mail_policy
from gateway.mail.quarantine import QuarantineStore
from gateway.metrics import GatewayMetrics
from gateway.verdict import Action, Stage, Verdict

log = logging.getLogger("kanmon.mail")

MAIL_PORTS = {25: "smtp", 465: "smtp", 587: "smtp", 110: "pop3", 995: "pop3", 143: "imap", 993: "imap"}
SERVER_FIRST_PLAINTEXT = frozenset({25, 587, 110, 143})
RULE_PRIVATE_SERVER = "kanmon:mail-private-server"
RULE_PRIVATE_RECIPIENT = "kanmon:mail-private-recipient"
RULE_STARTTLS = "kanmon:mail-starttls"
RULE_PROTOCOL = "kanmon:mail-protocol-error"
METADATA_ADAPTER = "kanmon.mail.adapter"
METADATA_INJECTED = "kanmon.mail.injected"
JUDGED_CACHE_SIZE = 256


class _ServerFirstTransparent(modes.TransparentProxy):
    """Transparent mode whose child is raw TCP from the start (no wait for client bytes)."""

    @expect(events.Start)
    def _handle_event(self, event: events.Event):
        self.child_layer = layers.TCPLayer(self.context)
        err = yield from self.finish_start()
        if err:
            yield commands.CloseConnection(self.context.client)


class OrganizationHosts:
    """Names (exact, or ``.suffix``) and addresses/networks of the organization's mail hosts."""

    def __init__(self, entries: tuple[str, ...]):
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list = []
        for e in entries:
            try:
                self.networks.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                (self.suffixes.append(e) if e.startswith(".") else self.names.add(e))

    def allows(self, sni: str | None, address: tuple | None) -> bool:
        if sni:
            host = normalize_host(sni) or ""
            if host_in(host, self.names, self.suffixes):
                return True
        if address:
            ip = canonical_address(address[0])
            if ip is None:
                return False
            return any(ip in net for net in self.networks)
        return False


def recipient_refusal_for(settings: MailSettings, policy: MailPolicy) -> Callable[[str], str | None]:
    """IPA SME sample 7.3: business mail is not forwarded to private (free-mail) addresses."""
    own = {d.lower() for d in policy.organization.domains}

    def refusal(address: str) -> str | None:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if not domain:
            return None
        if settings.allowed_recipient_domains:
            allowed = own | set(settings.allowed_recipient_domains)
            if not any(domain == d or domain.endswith("." + d) for d in allowed):
                return f"Kanmon: sending to {address} is not allowed by the mail policy (recipient domain not allowed)"
        if settings.reject_freemail_recipients and freemail_match(domain, policy.freemail_domains):
            return (f"Kanmon: sending business mail to the private/free-mail address {address} "
                    "is not allowed (IPA 7.3)")
        return None
    return refusal


class MailFilter:
    name = "kanmon-mail"

    def __init__(self, settings: MailSettings, policy: MailPolicy, connections: LiveConnections,
                 metrics: GatewayMetrics, sink, quarantine: QuarantineStore, cut: Callable[..., bool],
                 scanner=None, dns_txt=None, pool: JudgePool | None = None):
        self.settings = settings
        self.policy = policy
        self.connections = connections
        self.metrics = metrics
        self.sink = sink
        self.quarantine = quarantine
        self.cut = cut
        self.scanner = scanner
        self.dns_txt = dns_txt
        # None: judged in the calling thread (tests, tools); the gateway always has a pool.
        self.pool = pool
        self.hosts = OrganizationHosts(settings.organization_hosts)
        self.refusal = recipient_refusal_for(settings, policy)
        # DeviceRecord -> the signed-in user (issue #9); None: the registered owner is logged.
        self.user_of = None
        # issue #18: (Trigger, DeviceRecord, user, evidence) -> automatic quarantine, for a virus
        # in received mail (gateway/autoquarantine); None: no automatic quarantine.
        self.on_virus = None
        # Same message fetched again (IMAP clients refetch; section fetches): judged once, so
        # a quarantined message is stored once and every fetch shows the same notice.
        # Worker threads judge concurrently: every use of the cache holds the lock (issue #16).
        self._judged: collections.OrderedDict[tuple[str, str], Outcome] = collections.OrderedDict()
        self._judged_lock = threading.Lock()

    def _user(self, device) -> str | None:
        if device is None:
            return None
        return self.user_of(device) if self.user_of is not None else (device.owner or None)

    @classmethod
    def from_config(cls, settings: MailSettings, state_dir, connections, metrics, sink, cut) -> "MailFilter":
        policy = load_mail_policy(settings.policy_path)   # SourceErrors: the caller stops the start
        scanner = None
        if settings.clamd_socket:
            scanner = ClamdScanner.unix(settings.clamd_socket)
        elif policy.clamd is not None:
            c = policy.clamd
            scanner = ClamdScanner(c.socket, c.host, c.port, c.timeout_seconds)
        dns_txt = None
        if policy.verify_dkim:
            from gateway.mail.dns_lookup import resolver_txt
            dns_txt = resolver_txt
        quarantine = QuarantineStore(state_dir / "mail-quarantine")
        pool = JudgePool(policy, quarantine, scanner=scanner, dns_txt=dns_txt)
        pool.warm()
        return cls(settings, policy, connections, metrics, sink, quarantine, cut, scanner, dns_txt, pool)

    def done(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # -- which connections are mail -------------------------------------------------------
    @staticmethod
    def port_of(address: tuple | None) -> int | None:
        return address[1] if address else None

    def _block(self, client_id: str, flow, why: str, port: int | None) -> Verdict:
        verdict = Verdict(Action.BLOCK, RULE_PRIVATE_SERVER, why, Stage.TCP if flow is not None else Stage.TLS,
                          category="mail")
        state = self.connections.get(client_id)
        if flow is not None:
            record_verdict(flow, verdict, self.connections)   # the strictest wins; on the connection too
        elif state is not None:
            state.record(verdict)
        if state is not None:
            state.blocked = verdict
        self.metrics.mail_verdicts.labels("block", "private-mail-server").inc()
        return verdict

    def client_connected(self, client: connection.Client) -> None:
        port = self.port_of(client.sockname)
        if port not in SERVER_FIRST_PLAINTEXT or client.error:
            return
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(client.id) if proxyserver else None
        if handler is not None and isinstance(handler.layer, modes.TransparentProxy):
            handler.layer = _ServerFirstTransparent(handler.layer.context)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        server = data.context.server.address
        port = self.port_of(server)
        if port not in MAIL_PORTS:
            return
        data.ignore_connection = False   # mail is always inspected, whatever the web policy says
        sni = data.client_hello.sni
        if self.hosts.allows(sni, server):
            data.establish_server_tls_first = True
            return
        self._block(data.context.client.id, None,
                    f"mail port {port} to {sni or server[0]} is not an organization mail server (IPA 7.3)", port)
        data.establish_server_tls_first = False
        self.cut(data.context.client.id, "private mail server")

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        server = flow.server_conn.address
        port = self.port_of(server)
        if port not in MAIL_PORTS:
            return
        sni = flow.client_conn.sni
        if not self.hosts.allows(sni, server):
            self._block(flow.client_conn.id, flow,
                        f"mail port {port} to {sni or server[0]} is not an organization mail server (IPA 7.3)", port)
            return
        verdict = flow.metadata.get(METADATA_VERDICT)
        if not (isinstance(verdict, Verdict) and verdict.passes):
            return  # the enforcer blocks it
        device = flow.metadata.get(METADATA_DEVICE)
        device_id = device.device_id if device is not None else None
        kind = MAIL_PORTS[port]
        judge = self._judge_for(flow, kind)
        limit = self.settings.max_message_bytes
        if kind == "smtp":
            adapter = SmtpAdapter(judge, self.refusal, device=device_id, max_message_bytes=limit)
        elif kind == "pop3":
            adapter = Pop3Adapter(judge, device=device_id, max_message_bytes=limit)
        else:
            adapter = ImapAdapter(judge, device=device_id, max_message_bytes=limit)
        flow.metadata[METADATA_ADAPTER] = adapter
        flow.metadata[METADATA_INJECTED] = collections.deque()
        self._raise_idle_timeout(flow.client_conn.id)

    def _raise_idle_timeout(self, client_id: str) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(client_id) if proxyserver else None
        if handler is not None:
            handler.timeout_watchdog.timeout = max(handler.timeout_watchdog.timeout, self.settings.idle_timeout_seconds)

    # -- data ----------------------------------------------------------------------------
    async def tcp_message(self, flow: tcp.TCPFlow) -> None:
        adapter = flow.metadata.get(METADATA_ADAPTER)
        if adapter is None:
            return
        message = flow.messages[-1]
        injected = flow.metadata[METADATA_INJECTED]
        if injected and message.content is injected[0]:
            injected.popleft()
            return
        state = self.connections.get(flow.client_conn.id)
        if state is not None and (state.blocked is not None or state.failed):
            message.content = b""
            self.cut(flow.client_conn.id, "mail connection blocked")
            return
        feed = adapter.from_client if message.from_client else adapter.from_server
        out: Output = await asyncio.to_thread(feed, message.content)
        onward, back = (out.to_server, out.to_client) if message.from_client else (out.to_client, out.to_server)
        message.content = bytes(onward)
        if back:
            data = bytes(back)
            injected.append(data)
            ctx.master.commands.call("inject.tcp", flow, message.from_client, data)
        for event in out.events:
            if event.get("kind") == "recipient-refused":
                self._log_refused_recipient(flow, event)
        if out.close:
            self._log_connection_event(flow, RULE_PROTOCOL, f"mail protocol error, connection closed: {out.close}")
            message.content = b""
            self.cut(flow.client_conn.id, out.close)
        elif out.opaque and self.settings.starttls == "cut":
            self._log_connection_event(flow, RULE_STARTTLS,
                                       "TLS started inside the mail stream (STARTTLS) cannot be inspected; "
                                       "connection closed — use the implicit-TLS port")
            flow.metadata[METADATA_ADAPTER] = None
            self.cut(flow.client_conn.id, "STARTTLS in a mail stream")

    # -- judging (worker thread) ---------------------------------------------------------
    def _judge_for(self, flow: tcp.TCPFlow, protocol: str):
        base = self._base_record(flow, protocol)
        device = flow.metadata.get(METADATA_DEVICE)

        def judge(raw: bytes, context: MailContext) -> Judgement:
            # The envelope is part of the key: the outbound guard (issue #20) judges the same
            # bytes differently for an internal and an external recipient.
            key = (context.direction, hashlib.sha256(raw).hexdigest(), context.rcpt_to)
            with self._judged_lock:
                cached = self._judged.get(key)
                if cached is not None:
                    self._judged.move_to_end(key)
            if cached is not None:
                self._log_verdict(base, raw, context, cached, repeated=True)
                return cached.judgement
            outcome = self._outcome(raw, context)
            with self._judged_lock:
                self._judged[key] = outcome
                while len(self._judged) > JUDGED_CACHE_SIZE:
                    self._judged.popitem(last=False)
            self._log_verdict(base, raw, context, outcome)
            self._report_virus(device, base, raw, context, outcome)
            return outcome.judgement
        return judge

    def _report_virus(self, device, base: dict, raw: bytes, context: MailContext, outcome: Outcome) -> None:
        """Issue #18: a virus in received mail quarantines the device that fetched it."""
        if self.on_virus is None or context.direction != "inbound":
            return
        found = [i for i in outcome.verdict.indicators if i.name == Name.VIRUS_DETECTED]
        if not found:
            return
        headers = outcome.headers
        self.on_virus(Trigger.MAIL_VIRUS, device, base.get("user.name"), {
            "signature": found[0].evidence.en.removeprefix("virus found: "),
            "email.from.address": context.mail_from or headers.get("from"), "email.subject": headers.get("subject"),
            "email.message_id": headers.get("message-id"), "kanmon.mail.sha256": hashlib.sha256(raw).hexdigest(),
            "kanmon.mail.quarantine_id": outcome.quarantine_id, "network.protocol": base.get("network.protocol")})

    def _outcome(self, raw: bytes, context: MailContext) -> Outcome:
        if self.pool is not None:
            return self.pool.judge(raw, context)   # JudgeFailed: the guard fails closed
        return judge_message(raw, context, self.policy, self.quarantine, scanner=self.scanner, dns_txt=self.dns_txt)

    def _judge(self, raw: bytes, context: MailContext) -> tuple[Judgement, MailVerdict, str | None]:
        outcome = self._outcome(raw, context)
        return outcome.judgement, outcome.verdict, outcome.quarantine_id

    # -- logs and metrics ----------------------------------------------------------------
    def _base_record(self, flow: tcp.TCPFlow, protocol: str) -> dict[str, Any]:
        device = flow.metadata.get(METADATA_DEVICE)
        server = flow.server_conn.address
        return {
            "event.dataset": "kanmon.mail",
            "device.id": device.device_id if device is not None else None,
            "user.name": self._user(device),
            "source.ip": flow.client_conn.peername[0],
            "destination.ip": str(server[0]) if server else None,
            "destination.port": server[1] if server else None,
            "tls.client.server_name": flow.client_conn.sni,
            "network.protocol": protocol,
        }

    def _write(self, record: dict[str, Any]) -> None:
        # A mail verdict that cannot be logged is an addon error: the guard cuts the connection.
        self.sink.append("mail", record)

    def _log_verdict(self, base: dict, raw: bytes, context: MailContext, outcome: Outcome,
                     repeated: bool = False) -> None:
        verdict, judgement = outcome.verdict, outcome.judgement
        quarantine_id = None if repeated else outcome.quarantine_id
        names = sorted({i.name for i in verdict.indicators})
        for name in names or ["none"]:
            self.metrics.mail_verdicts.labels(str(verdict.action), name).inc()
        self.metrics.mail_messages.labels(str(verdict.action), context.direction).inc()   # once per message
        headers = outcome.headers
        record = dict(base)
        record.update(verdict_fields(verdict.gateway_verdict()))
        record.update({
            "event.action": "mail-" + context.direction,
            "kanmon.mail.verdict": str(verdict.action),
            "kanmon.mail.score": verdict.score,
            "kanmon.mail.direction": context.direction,
            "kanmon.mail.indicators": [i.as_dict() for i in verdict.indicators],
            "kanmon.mail.scanned": verdict.scanned,
            "kanmon.mail.quarantine_id": quarantine_id,
            "kanmon.mail.repeated": repeated,
            "email.from.address": context.mail_from or headers.get("from"),
            "email.to.address": list(context.rcpt_to) or ([headers["to"]] if headers.get("to") else []),
            "email.subject": headers.get("subject"),
            "email.message_id": headers.get("message-id"),
            "kanmon.mail.size": len(raw),
            "kanmon.mail.delivered_bytes": len(judgement.data) if judgement.data is not None else None,
            "kanmon.mail.html_to_text": outcome.html_as_text,   # HTML delivered as text (issue #20)
        })
        self._write(record)

    def _log_refused_recipient(self, flow: tcp.TCPFlow, event: dict) -> None:
        self.metrics.mail_verdicts.labels("reject", "private-recipient").inc()
        verdict = Verdict(Action.BLOCK, RULE_PRIVATE_RECIPIENT, event["reason"], Stage.TCP, category="mail")
        record = self._base_record(flow, "smtp")
        record.update(verdict_fields(verdict))
        record.update({"event.action": "mail-recipient-refused", "kanmon.mail.verdict": "reject",
                       "kanmon.mail.direction": "outbound",
                       "email.from.address": event.get("mail_from") or None, "email.to.address": [event["address"]]})
        self._write(record)

    def _log_connection_event(self, flow: tcp.TCPFlow, rule: str, why: str) -> None:
        verdict = Verdict(Action.BLOCK, rule, why, Stage.TCP, category="mail")
        port = self.port_of(flow.server_conn.address)
        record = self._base_record(flow, MAIL_PORTS.get(port, "mail"))
        record.update(verdict_fields(verdict))
        record.update({"event.action": "mail-connection-cut", "email.from.address": None})
        self._write(record)

