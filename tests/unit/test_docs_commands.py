"""Every example command of the documentation is run by a test or marked illustrative (issue #19).

How a document is tagged (tests/doccommands.py has the details): a shell block carries, on the
line before its opening fence, `<!-- run: tests/unit/test_docs_commands.py -->` (this file runs
each of its lines literally: they occur in DOC_COMMANDS below), a walkthrough marker (the README
walkthrough runs it) or `<!-- illustrative: why -->`. Every `kanmon …` in prose or in a block is
checked against the real argument parser. A new document (docs/*.md) is read without being
registered here.

DOC_COMMANDS run through the `kanmon` entry point (gateway.cli.main) in a temporary gateway
host: the shipped example configuration with its state directory moved to the test's, the
documentation's placeholders filled in (tests/doccommands.Placeholders), `KANMON_CONFIG` set as
the README's "Operating" section says a gateway host has it. Each entry is a command exactly as a
document writes it: the test fails if no document has it any more.
"""

from __future__ import annotations

import contextlib
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.doccommands import (ROOT, Block, Placeholders, check_synopsis, command_lines, doc_files, fenced_blocks,
                               is_name_only, is_synopsis, kanmon_commands, not_in_test)

# (command as a document writes it, expected exit code). Run in this order.
DOC_COMMANDS: list[tuple[str, int]] = [
    ("kanmon config check /etc/kanmon/kanmon.yaml", 0),                                   # README
    ("kanmon ca init --state-dir /var/lib/kanmon --org 関門市", 0),                          # README
    ("kanmon device add --config C --id phone-12 --owner sato --group staff --issue-cert --out DIR", 0),  # README
    ("kanmon device export-config phone-12 --private-key-file DIR/phone-12.wg.key --qr-png F --mobileconfig F", 0),
    ("kanmon device list --config /etc/kanmon/kanmon.yaml", 0),                            # RUNBOOK
    ("kanmon device show ID", 0),                                                          # RUNBOOK
    ('kanmon device quarantine ID --reason "..."', 0),                                     # RUNBOOK
    ("kanmon device release ID", 0),                                                       # README, RUNBOOK
    ("kanmon registry check --config C", 0),                                               # README
    ("kanmon policy check PATH", 0),                                                       # README
    ("kanmon policy check FILE --expiring-days N", 0),                                     # LANGUAGE.md
    ("kanmon policy test --policy P --device ID --config C URL", 0),                       # README (sign-in)
    ("kanmon lists status --config /etc/kanmon/kanmon.yaml", 0),                           # RUNBOOK
    ("kanmon logs verify --dir <state>/logs", 0),                                          # FIELDS.md
    ("kanmon logs search --dir <state_dir>/logs --stream auth --since 2026-12-05T09:00", 0),  # RUNBOOK
    ("kanmon logs search --dir <state_dir>/logs --stream proxy --verdict block --since <ISO 8601>", 0),
    ("kanmon report incident --device ID --since <ISO 8601> --logs <state_dir>/logs --out incident.html", 0),
    ("kanmon report review --month YYYY-MM --logs DIR --out F.html", 0),                   # README
    ("kanmon logs purge --dir <state>/logs --retention-days N", 0),                        # FIELDS.md
    ("kanmon device revoke ID --reason …", 0),                                             # RUNBOOK
]


def _docs_text() -> dict[Path, str]:
    return {path: path.read_text() for path in doc_files()}


def _parser():
    from gateway.cli import build_parser
    return build_parser([])


# ---------------------------------------------------------------- the tags


def test_every_command_block_is_tagged():
    untagged, reasonless, blocks = [], [], 0
    for path, text in _docs_text().items():
        for block in fenced_blocks(path, text):
            if not block.is_command:
                continue
            blocks += 1
            if block.tag is None:
                untagged.append(block.where)
            elif block.tag == "illustrative" and not block.target:
                reasonless.append(block.where)
            elif block.tag == "walkthrough" and path != ROOT / "README.md":
                untagged.append(f"{block.where} (the walkthrough runs README.md's blocks only)")
    assert blocks >= 8, "the checker found almost no command blocks: is the parsing broken?"
    assert not untagged, ("command blocks without <!-- run: TEST --> or <!-- illustrative: why -->: "
                          + ", ".join(untagged))
    assert not reasonless, "<!-- illustrative --> needs a reason: " + ", ".join(reasonless)


def test_run_blocks_occur_literally_in_their_test():
    problems = []
    for path, text in _docs_text().items():
        for block in fenced_blocks(path, text):
            if block.tag != "run":
                continue
            problems += [f"{block.where}: {line!r} is not run by {block.target}" for line in not_in_test(block)]
    assert not problems, "\n".join(problems)


def test_doc_commands_are_all_in_a_document():
    """This file runs only what a document says: an entry no document has is stale."""
    docs = "\n".join(_docs_text().values()).replace("\\|", "|")
    stale = [cmd for cmd, _ in DOC_COMMANDS if cmd not in docs]
    assert not stale, f"no document has these commands any more: {stale}"


def test_every_kanmon_command_in_the_docs_parses(tmp_path, monkeypatch):
    monkeypatch.setenv("KANMON_CONFIG", str(tmp_path / "kanmon.yaml"))
    parser = _parser()
    from gateway.cli import build_parser
    fill = Placeholders(config=str(tmp_path / "kanmon.yaml"), state=str(tmp_path), policy="policy.yaml",
                        out=str(tmp_path / "out"), eml="message.eml")
    problems, seen = [], {"synopsis": 0, "name": 0, "concrete": 0}
    for path, text in _docs_text().items():
        for line, command in kanmon_commands(path, text):
            where = f"{path.relative_to(ROOT)}:{line}: `{command}`"
            if is_synopsis(command):
                seen["synopsis"] += 1
                if problem := check_synopsis(parser, command):
                    problems.append(f"{where}: {problem}")
            elif is_name_only(parser, command):
                seen["name"] += 1
            else:
                seen["concrete"] += 1
                argv = fill.fill(command)
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                        build_parser(argv).parse_args(argv)
                except SystemExit as exc:
                    if exc.code:
                        problems.append(f"{where}: {err.getvalue().strip().splitlines()[-1]}")
    assert min(seen.values()) >= 5, seen
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checker itself


def test_checker_finds_untagged_blocks_wrong_runs_and_new_documents(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "systemd").mkdir()
    new_doc = tmp_path / "docs" / "CONSOLE.md"
    new_doc.write_text("# Console\n\n```sh\nkanmon console --listen 127.0.0.1:9443\n```\n\n"
                       "<!-- illustrative: starts a server -->\n```sh\nkanmon run\n```\n\n"
                       "<!-- illustrative -->\n```bash\nls\n```\n\n"
                       "<!-- run: tests/unit/test_docs_commands.py -->\n```sh\n"
                       "kanmon config check /etc/kanmon/kanmon.yaml   # why\nkanmon nothing-like-this \\\n  --at-all\n```\n\n"
                       "```yaml\nnot: a command\n```\n\n```\ndevice packet ─► tunnel\n```\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "x.md").write_text("```sh\nuntagged\n```\n")
    assert doc_files(tmp_path) == [new_doc]
    blocks = [b for b in fenced_blocks(new_doc) if b.is_command]
    assert [(b.lang, b.tag, b.target) for b in blocks] == [
        ("sh", None, ""), ("sh", "illustrative", "starts a server"), ("bash", "illustrative", ""),
        ("sh", "run", "tests/unit/test_docs_commands.py")]
    lines = command_lines(blocks[3].body)
    assert lines == ["kanmon config check /etc/kanmon/kanmon.yaml", "kanmon nothing-like-this --at-all"]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text('RUNS = ["kanmon config check /etc/kanmon/kanmon.yaml"]\n')
    run_block = Block(new_doc, 1, "sh", blocks[3].body, "run", "tests/test_x.py")
    assert not_in_test(run_block, tmp_path) == ["kanmon nothing-like-this --at-all"]
    assert not_in_test(Block(new_doc, 1, "sh", "kanmon x", "run", "tests/nope.py"), tmp_path) == [
        "no such test tests/nope.py"]


def test_checker_against_the_parser_catches_wrong_options_and_sub_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("KANMON_CONFIG", str(tmp_path / "kanmon.yaml"))
    parser = _parser()
    assert check_synopsis(parser, "kanmon logs verify/search/purge --dir STATE/logs") is None
    assert "--dri" in check_synopsis(parser, "kanmon logs verify/search --dri X [--json]")
    assert "veriffy" in check_synopsis(parser, "kanmon logs veriffy/search --dir X")
    assert check_synopsis(parser, "kanmon device list/show/revoke --reason lost|stolen|…/suspend [--until]") is None
    assert is_synopsis("kanmon config check [PATH]") and not is_synopsis("kanmon config check /etc/kanmon/kanmon.yaml")
    assert not is_synopsis('kanmon device quarantine ID --reason "..."')
    assert is_name_only(parser, "kanmon policy apply") and not is_name_only(parser, "kanmon device show ID")
    doc = tmp_path / "x.md"
    doc.write_text("Use `kanmon logs search --stream proxy` or\n\n```\nkanmon policy test --policy F [--json]\n"
                   "       [--stage dns|tls] [--nope]\n```\nand `kanmon_addon_errors_total`.\n")
    found = kanmon_commands(doc)
    assert found == [(1, "kanmon logs search --stream proxy"),
                     (4, "kanmon policy test --policy F [--json] [--stage dns|tls] [--nope]")]
    assert "--nope" in check_synopsis(parser, found[1][1])


# ---------------------------------------------------------------- running them


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A gateway host as the docs assume it: the example configuration at /etc/kanmon (moved),
    its state directory moved, `kanmon run` started once (the gateway's WireGuard key and its
    interception CA exist), and a day of logs written through the log store."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from wireguard_tools import WireguardKey

    from gateway.logstore import LogStore

    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    example = (ROOT / "systemd" / "kanmon.yaml.example").read_text()
    config = yaml.safe_load(example.replace("/opt/kanmon", str(ROOT)).replace("/var/lib/kanmon", str(state)))
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    (state / "wg-private.key").write_text(str(WireguardKey.generate()) + "\n")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitmproxy")])
    now = datetime.now(UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    (state / "mitmproxy").mkdir()
    (state / "mitmproxy" / "mitmproxy-ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # a fixed moment inside the month the commands name (YYYY-MM, --since 2026-12-05T09:00 …)
    with LogStore(state / "logs", clock=lambda: datetime(2026, 12, 5, 10, tzinfo=UTC)) as store:
        store.append("auth", {"event.action": "enroll", "event.outcome": "success", "device.id": "phone-12"})
        store.append("proxy", {"device.id": "phone-12", "kanmon.verdict": "block", "rule.id": "webmail",
                               "rule.category": "webmail", "url.full": "https://mail.yahoo.co.jp/",
                               "url.domain": "mail.yahoo.co.jp"})
    monkeypatch.setenv("KANMON_CONFIG", str(cfg))
    monkeypatch.chdir(tmp_path)
    policy = str(ROOT / "policies" / "example.yaml")
    return Placeholders(config=str(cfg), state=str(state), policy=policy, out=str(out), eml="",
                        extra={"PATH": policy}, month="2026-12")


def test_doc_commands_run_as_written(host):
    from gateway.cli import main

    results = []
    for command, expected in DOC_COMMANDS:
        argv = host.fill(command)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
        results.append((command, code, out.getvalue(), err.getvalue()))
        assert code == expected, f"`{command}` ({argv}) exited {code}:\n{out.getvalue()}\n{err.getvalue()}"
    by_command = {c: (o, e) for c, _, o, e in results}
    out_dir = Path(host.out)
    assert (out_dir / "phone-12.png").stat().st_size > 0 and (out_dir / "phone-12.mobileconfig").stat().st_size > 0
    listing = by_command["kanmon device list --config /etc/kanmon/kanmon.yaml"][0]
    assert re.search(r"^phone-12\s+10\.77\.0\.\d+\s+", listing, re.M), listing
    found = by_command["kanmon logs search --dir <state_dir>/logs --stream proxy --verdict block --since <ISO 8601>"][0]
    assert "mail.yahoo.co.jp" in found
    assert (Path.cwd() / "incident.html").read_text().count("phone-12") >= 1
    assert "mail.yahoo.co.jp" in (Path.cwd() / "F.html").read_text()          # the month's blocked domain
    judged = by_command["kanmon policy test --policy P --device ID --config C URL"][0]
    assert "block" in judged and "webmail" in judged, judged


def test_scripts_the_docs_name_exist_with_their_options():
    from tests.doccommands import check_script, script_commands

    problems, seen = [], 0
    for path, text in _docs_text().items():
        for line, command in script_commands(path, text):
            seen += 1
            if problem := check_script(command):
                problems.append(f"{path.relative_to(ROOT)}:{line}: `{command}`: {problem}")
    assert seen >= 5, seen
    assert not problems, "\n".join(problems)
    assert check_script("bench/fuzz.py --minutes N") is None
    assert "no option ['--hours']" in check_script("bench/fuzz.py --hours N")
    assert "no such script" in check_script("bench/nothing.py")
