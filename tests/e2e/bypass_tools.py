"""Shared machinery of the bypass corpus (issue #14): a lab whose fake internet records every
byte it receives, the shipped example policy plus two lab names, the attacker's probe run
from a device, and the checks every case makes.

What a case proves, in two halves that must both hold:
(a) upstream: nothing the gateway should have refused reached any recording server (the
    blocked host name, the case's marker, or for raw cases any application byte at all);
(b) log: the gateway's access log (`conn`/`proxy`/`dns`, gateway/logstore/FIELDS.md) has a denying
    record for the device's connection (matched by tunnel address and source port) that
    names the reason rule id or the blocked host, and no record of that connection passes
    after one denied it (no stage loosens an earlier verdict).
Control cases prove the other direction: an allowed request reaches the upstream, with the
allowed Host only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.lab.recorder import read_log
from gateway.lab.topology import SPARE4, WEB4, WEB6, WEB_NAMES, Device, Lab, LabError, wait_until
from tests.e2e.conftest import ARTIFACTS, running_lab

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = "blocked.test"            # blocked by the lab rule added to the example policy
WEBMAIL = "gmail.com"               # blocked by the example policy's webmail list
ALLOWED = "www.example.test"        # allowed (default action of the example policy)
NO_INSPECT = "bank.test"            # no-inspect (lab rule; the example's bank names do not resolve here)
UPSTREAM_PORTS = (53, 80, 443, 853, 2525, 5353, 8080, 8443)
HOST_PORT = 18080                   # a listener on every address of the gateway host
PASSING = frozenset({"allow", "monitor", "no-inspect", "tenant-restrict"})
LOG_FIELDS_NAMING_HOSTS = ("url.domain", "url.full", "destination.domain", "tls.client.server_name",
                           "dns.question.name")
# Reason rule ids of the fixed data path (issue #14).
UNIDENTIFIED = "kanmon:unidentified-protocol"
MISMATCH = "kanmon:authority-mismatch"
MALFORMED = "kanmon:malformed-authority"
NO_INSPECT_UNRESOLVED = "kanmon:no-inspect-unresolved"
DNS_BYPASS = "kanmon:dns-bypass"
INTERNAL = "kanmon:internal-destination"
NO_SNI = "kanmon:no-sni"
BLOCK_RULES = ("lab-block-blocked-test", "webmail")


def bypass_policy(directory: Path) -> Path:
    """policies/example.yaml as shipped (with its lists), plus a block rule for blocked.test
    and a no-inspect rule for bank.test, the lab's names (the lab's DNS knows only `.test`)."""
    target = directory / "policies"
    shutil.copytree(ROOT / "policies", target)
    doc = yaml.safe_load((target / "example.yaml").read_text(encoding="utf-8"))
    doc["rules"] = [
        {"id": "lab-no-inspect-bank", "action": "no-inspect", "reason": "lab: bank.test is not decrypted",
         "match": {"domain": [NO_INSPECT]}},
        *doc.get("rules", []),
        {"id": "lab-block-blocked-test", "action": "block", "reason": "lab: blocked.test is on the block list",
         "match": {"domain": [BLOCKED]}},
    ]
    path = target / "bypass.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


class BypassLab(Lab):
    """The lab with a recording server in nginx's place: every web address (WEB4, WEB6) and
    the spare host (SPARE4) listen on UPSTREAM_PORTS, TLS or plain, and log every byte."""

    def _start_nginx(self) -> None:
        names = sorted({*WEB_NAMES, NO_INSPECT, f"*.{NO_INSPECT}", WEBMAIL, "example.test", "*.example.test"})
        pair = self.ca.issue_server("recorder", names, [WEB4, WEB6, SPARE4])
        self.recorder_cert = pair
        self.recorder_log = self.workdir / "recorder.jsonl"
        listens = [f"{a}:{p}" for a in (WEB4, f"[{WEB6}]", SPARE4) for p in UPSTREAM_PORTS]
        self.server_procs.append(self._recorder(self.inet, self.recorder_log, listens, pair))
        self.host_recorder_log = self.workdir / "host-recorder.jsonl"

    def _recorder(self, ns, log: Path, listens: list[str], pair) -> subprocess.Popen:
        args = [sys.executable, "-m", "gateway.lab.recorder", "--log", str(log),
                "--cert", str(pair.cert_path), "--key", str(pair.key_path)]
        for spec in listens:
            args += ["--listen", spec]
        proc = subprocess.Popen(ns.cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                start_new_session=True)
        line = proc.stdout.readline()
        if "recorder ready" not in line:
            raise LabError(f"recorder did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}")
        return proc

    def start_host_recorder(self) -> None:
        """A listener on every address of the gateway host (0.0.0.0 and ::), as a management
        port bound to all addresses would be: no device may reach it."""
        self.server_procs.append(self._recorder(self.gw, self.host_recorder_log,
                                                [f"0.0.0.0:{HOST_PORT}", f"[::]:{HOST_PORT}"], self.recorder_cert))

    @property
    def recorder_cert_sha256(self) -> str:
        import hashlib
        der = ssl.PEM_cert_to_DER_cert(self.recorder_cert.cert_path.read_text())
        return hashlib.sha256(der).hexdigest()


@contextmanager
def bypass_lab(tmp_path_factory, evidence: str) -> Iterator[BypassLab]:
    work = tmp_path_factory.mktemp("bypass")
    policy = bypass_policy(work)
    lab = BypassLab(work, n_devices=2, config_overrides={"policy": {"path": str(policy)}})
    with running_lab(lab, evidence) as running:
        running.start_host_recorder()
        for device in running.devices:
            # The first packet waits for the WireGuard handshake: do that before any probe's clock runs.
            warm = device.curl(f"http://{ALLOWED}/warm-up")
            if not warm.stdout.endswith("HTTP_CODE=200"):
                raise LabError(f"device {device.device_id} cannot reach the lab: {warm.stdout} {warm.stderr}")
        try:
            yield running
        finally:
            dest = ARTIFACTS / "e2e" / evidence
            dest.mkdir(parents=True, exist_ok=True)
            for src in (lab.recorder_log, lab.host_recorder_log):
                if src.exists():
                    shutil.copy(src, dest / src.name)
            if (lab.state_dir / "logs").is_dir():
                shutil.rmtree(dest / "logs", ignore_errors=True)
                shutil.copytree(lab.state_dir / "logs", dest / "logs", ignore=shutil.ignore_patterns("*.tmp"))


# -- running a probe -----------------------------------------------------------------------
def run_probe(device: Device, spec: dict) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); from tests.e2e.bypass_probe import probe; "
            "print(json.dumps(probe(json.loads(sys.argv[1]))))") % str(ROOT)
    timeout = float(spec.get("read_timeout", 3)) + float(spec.get("connect_timeout", 3)) + 20
    out = device.ns.run(sys.executable, "-c", code, json.dumps(spec), timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def new_marker() -> str:
    return "kb" + secrets.token_hex(5)


@dataclass
class Observation:
    """What one probe caused: the probe's result, what the upstreams received, the log."""
    result: dict
    upstream: dict[int, dict]        # recorder connections opened during the probe
    host: dict[int, dict]            # the gateway host's own listener's connections
    records: list[dict] = field(default_factory=list)


_SOURCE_PORTS = itertools.count(20000 + (os.getpid() % 50) * 200)


class Observer:
    """Reads the recorders' logs from where the previous probe left them."""

    def __init__(self, lab: BypassLab):
        self.lab = lab
        self.offsets = {"up": 0, "host": 0}
        self.drain()

    def drain(self) -> tuple[dict, dict]:
        up, self.offsets["up"] = read_log(self.lab.recorder_log, self.offsets["up"])
        host, self.offsets["host"] = read_log(self.lab.host_recorder_log, self.offsets["host"])
        return up, host

    def run(self, device: Device, spec: dict, settle: float = 0.2) -> Observation:
        self.drain()
        # A source port never used before in this run: the gateway's redirect is NAT, and
        # conntrack remaps a source port whose earlier connection (TIME_WAIT) would clash, so
        # an ephemeral port reused by a later probe is logged under another number.
        spec = {"sport": next(_SOURCE_PORTS), **spec}
        result = run_probe(device, spec)
        time.sleep(settle)   # anything the gateway relayed reached the recorder before the answer did
        up, host = self.drain()
        return Observation(result, up, host)


# -- the log -------------------------------------------------------------------------------
def connection_records(lab: Lab, device: Device, sport: int | None) -> list[dict]:
    if sport is None:
        return []
    out = []
    for stream in ("conn", "proxy", "dns"):
        for rec in lab.log_records(stream):
            if rec.get("source.port") == sport and rec.get("source.ip") in (device.ipv4, device.ipv6):
                out.append(rec)
    return sorted(out, key=lambda r: r.get("@timestamp", ""))


def denied(rec: dict) -> bool:
    return rec.get("kanmon.verdict") == "block" or "denied" in (rec.get("event.type") or [])


def names_host(rec: dict, hosts) -> bool:
    return any(h.lower() in str(rec.get(f) or "").lower() for f in LOG_FIELDS_NAMING_HOSTS for h in hosts)


def wait_for_denial(lab: Lab, device: Device, sport: int | None, reasons, hosts, timeout: float = 5) -> list[dict]:
    """The connection's records once one denies it for one of ``reasons`` (or naming one of
    ``hosts``); the records seen so far when none does within ``timeout``."""
    records: list[dict] = []

    def found() -> bool:
        nonlocal records
        records = connection_records(lab, device, sport)
        return any(denied(r) and (r.get("rule.id") in reasons or names_host(r, hosts)) for r in records)

    if found():
        return records
    try:
        wait_until(found, timeout, "a denying log record", interval=0.1)
    except LabError:
        pass
    return records


def loosened(records: list[dict]) -> list[dict]:
    """Records of the connection that let it on after an earlier one denied it."""
    out, seen_denial = [], False
    for rec in records:
        if denied(rec):
            seen_denial = True
        elif seen_denial and rec.get("kanmon.verdict") in PASSING and rec.get("event.action") != "connection-closed":
            out.append(rec)
    return out


def host_headers(data: bytes) -> list[str]:
    return [h.decode("latin-1").strip() for h in re.findall(rb"(?im)^host:[ \t]*([^\r\n]*)", data)]


def leaked(conns: dict[int, dict], forbidden) -> list[str]:
    """Which forbidden strings an upstream received (in its data, or as TLS SNI)."""
    hits = []
    for cid, c in conns.items():
        data = c["data"].lower()
        for word in forbidden:
            if word.lower().encode("latin-1") in data or (c["sni"] or "").lower().rstrip(".") == word.lower():
                hits.append(f"conn {cid} on {c['local']}:{c['lport']} got {word!r}: {c['data'][:300]!r}")
    return hits


def describe(obs: Observation) -> str:
    return json.dumps({"probe": obs.result, "records": [
        {k: r.get(k) for k in ("event.dataset", "event.action", "kanmon.verdict", "rule.id", "url.full",
                               "url.domain", "tls.client.server_name", "destination.ip", "destination.port",
                               "kanmon.stage")} for r in obs.records]}, ensure_ascii=False, indent=1)


def check_refused(lab: BypassLab, device: Device, obs: Observation, *, forbidden, reasons, hosts=(BLOCKED,),
                  nothing_reaches: bool = False, may_drop: bool = False, parser_refusal: bool = False) -> None:
    """Half (a) and (b) for a case the gateway must refuse.

    ``parser_refusal``: mitmproxy's own HTTP parser refuses the request before any hook runs
    (an HTTP/1 request line it cannot read gets 400; an HTTP/2 header block that breaks the
    protocol's own rules gets GOAWAY): there is no request, so no request record; the case
    holds when nothing reached the upstream and the device saw that refusal."""
    conns = {**obs.upstream, **{("host", k): v for k, v in obs.host.items()}}
    hits = leaked(conns, forbidden)
    if nothing_reaches:
        hits += [f"conn {cid} on {c['local']}:{c['lport']} got {c['data'][:300]!r}"
                 for cid, c in conns.items() if c["data"]]
    if not hits and may_drop and not obs.result["connected"]:
        return   # dropped by the firewall: no handshake, nothing to log per connection
    if not hits and parser_refusal:
        response = obs.result.get("response") or ""
        h2_events = " ".join(obs.result.get("h2_events") or [])
        assert response.startswith("HTTP/1.1 400") or "ConnectionTerminated" in h2_events, describe(obs)
        return
    obs.records = wait_for_denial(lab, device, obs.result["sport"], reasons, hosts, timeout=0 if hits else 5)
    assert not hits, "BYPASS: the upstream received what the gateway must refuse:\n" + "\n".join(hits) \
        + "\n" + describe(obs)
    denial = [r for r in obs.records if denied(r) and (r.get("rule.id") in reasons or names_host(r, hosts))]
    assert denial, f"no log record names the reason ({', '.join(reasons)}) or {', '.join(hosts)}:\n" + describe(obs)
    looser = loosened(obs.records)
    assert not looser, "a later stage loosened the verdict:\n" + describe(obs)
    let_on = [r for r in obs.records if r.get("kanmon.verdict") in PASSING and names_host(r, hosts)]
    assert not let_on, "a record allows the blocked host:\n" + describe(obs)


def check_reached(lab: BypassLab, obs: Observation, *, marker: str, host: str, sni: str | None = None) -> dict:
    """A control case: the request (its marker) reached an upstream with exactly the allowed
    Host, nothing else; returns that upstream connection."""
    with_marker = [c for c in obs.upstream.values() if marker.encode() in c["data"]]
    assert len(with_marker) == 1, f"the allowed request did not reach the upstream once: {obs.upstream}\n" + describe(obs)
    conn = with_marker[0]
    assert host_headers(conn["data"]) == [host], (host_headers(conn["data"]), conn["data"][:300])
    if sni is not None:
        assert conn["sni"] == sni, conn
    assert "recorded conn=" in obs.result["response"] or obs.result["h2_status"] == "200", describe(obs)
    assert not leaked(obs.upstream, (BLOCKED, WEBMAIL))
    return conn


# -- request builders ----------------------------------------------------------------------
def http_request(path: str, host: str | None, *, method: str = "GET", target: str | None = None,
                 version: str = "1.1", extra: str = "", body: str = "", prefix: str = "") -> str:
    lines = [f"{prefix}{method} {target or path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if body:
        lines.append(f"Content-Length: {len(body.encode('latin-1'))}")
    lines.append("Connection: close")
    text = "\r\n".join(lines) + "\r\n" + extra + "\r\n" + body
    return text


def dns_query_wire(name: str, tcp: bool) -> str:
    """A DNS query for ``name`` (type A) as latin-1 text; ``tcp`` adds the length prefix."""
    body = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.rstrip(".").split("."):
        body += bytes([len(label)]) + label.encode()
    body += b"\x00\x00\x01\x00\x01"
    if tcp:
        body = len(body).to_bytes(2, "big") + body
    return body.decode("latin-1")


CaseSpec = Callable[[str], dict]
