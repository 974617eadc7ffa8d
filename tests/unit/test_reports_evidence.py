"""Monthly review, issue #18 sections (gateway/reports/evidence.py): firewall drops counted in
packets (not in records, and not as decisions), and tunnel sessions from outer networks not
approved for the device's group; records written with the real LogStore and read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.logstore import LogStore
from gateway.cli import report as commands
from gateway.reports.evidence import parse_approved_lines
from gateway.reports.review import build_review, parse_month
from gateway.reports.sources import stream_records

T0 = datetime(2026, 1, 10, 9, tzinfo=UTC)


class Clock:
    now = T0

    def __call__(self) -> datetime:
        return self.now


def _fw(device, src, dst, port, reason, packets, transport="udp"):
    return {"event.dataset": "kanmon.firewall", "event.action": "packet-dropped", "kanmon.verdict": "block",
            "rule.id": f"kanmon:fw-{reason}", "kanmon.firewall.reason": reason, "kanmon.firewall.packets": packets,
            "device.id": device, "user.name": None if device is None else f"u-{device}", "source.ip": src,
            "destination.ip": dst, "destination.port": port, "network.transport": transport}


def _tunnel(device, event, outer, groups, action="wireguard-handshake"):
    return {"event.dataset": "kanmon.tunnel", "event.action": action, "event.outcome": "success",
            "kanmon.tunnel.event": event, "device.id": device, "user.name": f"u-{device}", "source.ip": outer,
            "client.ip": outer, "device.groups": groups}


@pytest.fixture
def logs(tmp_path):
    clock = Clock()
    store = LogStore(tmp_path, clock=clock)

    def put(stream, when, record):
        clock.now = when
        store.append(stream, {"@timestamp": when, **record})

    # a flood from d1: 12 records of 200 packets (two minutes of 10 s intervals), plus QUIC
    for i in range(12):
        put("conn", T0 + timedelta(seconds=10 * i), _fw("d1", "10.77.0.2", "198.51.100.9", 5000, "not-tcp", 200))
    put("conn", T0, _fw("d1", "10.77.0.2", "198.51.100.9", 443, "quic", 3))
    # a revoked device still sending, and an address of no device
    put("conn", T0, _fw("d9", "10.77.0.9", "192.0.2.1", 80, "blocked-device", 7, "tcp"))
    put("conn", T0, _fw(None, "10.77.0.77", "10.77.0.2", 22, "device-to-device", 1, "tcp"))
    # one ordinary decision record in conn: still counted as a block decision
    put("conn", T0, {"device.id": "d1", "source.ip": "10.77.0.2", "user.name": "u-d1", "kanmon.verdict": "block",
                     "rule.id": "no-ssh", "destination.ip": "192.0.2.5", "destination.port": 22, "network.transport": "tcp"})
    # tunnel: d1 (telework, approved 203.0.113.0/24) from its line, then from a cafe; d2 (no approved list)
    put("auth", T0, _tunnel("d1", "session-start", "203.0.113.7", ["telework"]))
    put("auth", T0 + timedelta(hours=1), _tunnel("d1", "roamed", "198.18.5.5", ["telework"], "wireguard-endpoint-changed"))
    put("auth", T0 + timedelta(hours=2), _tunnel("d1", "resumed", "198.18.5.5", ["telework"]))
    put("auth", T0, _tunnel("d2", "session-start", "100.64.1.1", ["office"]))
    put("auth", T0 + timedelta(days=40), _tunnel("d1", "session-start", "198.18.9.9", ["telework"]))   # February
    store.close()
    return tmp_path


def review(directory, **kw):
    start, end = parse_month("2026-01", UTC)
    return build_review("2026-01", start, end, "UTC", stream_records(directory, start, end),
                        generated_at=datetime(2026, 2, 1, tzinfo=UTC), **kw)


def test_firewall_section_counts_packets_and_stays_out_of_the_decisions(logs):
    report = review(logs)
    fw = report.firewall
    assert (fw.records, fw.packets) == (15, 12 * 200 + 3 + 7 + 1)
    assert [(c.key, c.count) for c in fw.by_reason] == [("not-tcp", 2400), ("blocked-device", 7), ("quic", 3),
                                                         ("device-to-device", 1)]
    assert [(c.key, c.count) for c in fw.by_source] == [("d1", 2403), ("d9", 7), ("(10.77.0.77)", 1)]
    assert fw.top_destinations[0].key == "198.51.100.9:5000/udp" and fw.top_destinations[0].count == 2400
    assert [(c.key, c.count) for c in fw.blocked_devices] == [("d9", 7)]
    # the decision statistics see the one policy block, not the 15 firewall records
    assert report.blocked_total == 1
    assert [(c.key, c.count) for c in report.top_blocking_rules] == [("no-ssh", 1)]
    assert next(c.count for c in report.records_by_stream if c.key == "conn") == 16


def test_tunnel_sessions_off_the_approved_lines(logs):
    approved = parse_approved_lines({"telework": ["203.0.113.0/24"], "office": "100.64.0.0/16"})
    report = review(logs, approved_lines=approved)
    tn = report.tunnel
    assert tn.devices == 2
    assert {c.key: c.count for c in tn.events} == {"session-start": 2, "roamed": 1, "resumed": 1}
    assert [(c.key, c.count) for c in tn.many_outer_addresses] == [("d1", 2)]
    [off] = tn.off_line
    assert (off.device_id, off.outer_ip, off.groups, off.events) == ("d1", "198.18.5.5", ("telework",), 2)
    assert (off.first, off.last) == (T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    # without approved lines nothing is judged (None, not an empty list that would look clean)
    assert review(logs).tunnel.off_line is None


def test_rendered_review_has_both_sections(logs):
    from gateway.reports.charts import ChartMaker
    from gateway.reports.html import render_review
    html = render_review(review(logs, approved_lines=parse_approved_lines({"telework": ["203.0.113.0/24"]})),
                         ChartMaker())
    assert 'id="firewall-drops"' in html and 'id="tunnel-sessions"' in html
    assert "198.18.5.5" in html and "blocked-device" in html


@pytest.mark.parametrize("data,message", [
    ([], "mapping"), ({"g": []}, "list"), ({"g": ["not-a-net"]}, "not a network"), ({1: ["10.0.0.0/8"]}, "not a text")])
def test_bad_approved_lines_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        parse_approved_lines(data)


def test_cli_refuses_an_unreadable_approved_lines_file_in_both_languages(logs, tmp_path, capsys):
    bad = tmp_path / "lines.yaml"
    bad.write_text("telework: [203.0.113.0/99]\n")
    import argparse
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["report", "review", "--month", "2026-01", "--logs", str(logs),
                              "--out", str(tmp_path / "r.html"), "--approved-lines", str(bad)])
    assert args.func(args) == commands.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--approved-lines のファイルを読めません" in err and "cannot read the --approved-lines file" in err
    assert "203.0.113.0/99" in err and not (tmp_path / "r.html").exists()
