"""README "First device, step by step", run literally in the namespace lab (issue #19).

The section's marked blocks are read from README.md and executed as written:
`<!-- walkthrough:gateway -->` blocks in the gateway's namespace, `<!-- walkthrough:device -->`
blocks in a phone's namespace (in the folder the operator copied onto it), and the
`<!-- walkthrough:config -->` block's keys are set in the copied example configuration. What the
lab changes, and nothing else:

* paths: `/etc/kanmon`, `/var/lib/kanmon` and `/root` move into the test's directory,
  `/opt/kanmon` is this checkout and `/opt/kanmon/.venv/bin` the running interpreter's;
* the documentation addresses become the lab's (203.0.113.10 -> the gateway's underlay address,
  192.0.2.53 -> the fake internet's resolver, eth0 -> the lab's uplink);
* the configuration also gets the lab's tunnel interface name (wireguard-go's control sockets
  are shared by all namespaces), the fake internet's CA for upstream TLS, and the state
  directory above;
* `systemctl enable --now kanmon` starts the unit's own ExecStart line (checked to be
  `kanmon run --config /etc/kanmon/kanmon.yaml`) in the gateway namespace;
* on the phone, wg-quick uses wireguard-go (no kernel module here) and a `resolvconf` that
  writes the namespace's resolv.conf (the phone's OS does this part).

A README change that breaks a step fails here: a command that exits non-zero, a key the
example configuration lacks, a file the README names that the command did not write, a page
that does not load or is not blocked, a revocation that does not cut the phone off.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.lab.topology import DNS4, UNDERLAY_GW, Lab, wait_until
from tests.e2e.conftest import ARTIFACTS, running_lab

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- walkthrough:(gateway|config|device) -->\s*```(\w+)\n(.*?)```\s*<!-- /walkthrough -->", re.S)


def walkthrough_blocks(text: str) -> list[tuple[str, str]]:
    """[(kind, body)] in README order."""
    return [(kind, body) for kind, _lang, body in BLOCK.findall(text)]


def test_readme_marks_the_walkthrough():
    """The blocks exist and every kind is there (a rename of the markers must not silently
    turn the e2e test below into a no-op)."""
    blocks = walkthrough_blocks(README.read_text())
    kinds = [k for k, _ in blocks]
    assert kinds.count("gateway") >= 3 and kinds.count("config") == 1 and kinds.count("device") == 1, kinds
    assert README.read_text().count("<!-- walkthrough:") == len(blocks), "a marker without a well-formed block"


def _deep_set(base: dict, extra: dict, where: str = "") -> None:
    for key, value in extra.items():
        assert key in base, f"README sets {where}{key}, which systemd/kanmon.yaml.example does not have"
        if isinstance(value, dict):
            assert isinstance(base[key], dict), f"{where}{key} is not a section in the example"
            _deep_set(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


RESOLVCONF = """#!/bin/sh
# The phone's OS part of wg-quick's DNS= line, inside a network namespace: `-a IFACE` reads
# nameserver lines on stdin (ip netns exec bind-mounts the namespace's resolv.conf here).
case "$1" in
  -a) cat > /etc/resolv.conf ;;
  *) cat > /dev/null ;;
esac
"""


def test_readme_walkthrough_runs_literally(tmp_path_factory):
    blocks = walkthrough_blocks(README.read_text())
    lab = Lab(tmp_path_factory.mktemp("walk"), n_devices=0)
    root = lab.workdir / "host"
    etc, state, home = root / "etc-kanmon", lab.state_dir, root / "root"
    home.mkdir(parents=True)
    venv_bin = str(Path(sys.executable).parent)
    with running_lab(lab, "readme-walkthrough", start=False):
        substitutions = [("/opt/kanmon/.venv/bin", venv_bin), ("/opt/kanmon", str(ROOT)), ("/etc/kanmon", str(etc)),
                         ("/var/lib/kanmon", str(state)), ("/root", str(home)),
                         ("203.0.113.10", UNDERLAY_GW), ("192.0.2.53", DNS4)]

        def literal(text: str) -> str:
            for old, new in substitutions:
                text = text.replace(old, new)
            return text

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        exports: list[str] = []
        lab.config_path = etc / "kanmon.yaml"

        def run_gateway_script(script: str) -> str:
            out = subprocess.run(lab.gw.cmd("bash", "-euo", "pipefail", "-c", "\n".join(exports + [script])),
                                 capture_output=True, text=True, env=env, timeout=120, cwd=home)
            assert out.returncode == 0, f"README step failed:\n{script}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
            return out.stdout

        def start_service() -> None:
            unit = (ROOT / "systemd" / "kanmon.service").read_text()
            exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
            assert exec_start[1:] == ["run", "--config", "/etc/kanmon/kanmon.yaml"], exec_start
            lab.start_gateway()          # the same command, with the lab's paths

        outputs: list[str] = []
        phone_dir = None
        for kind, body in blocks:
            body = literal(body)
            if kind == "config":
                config = yaml.safe_load(literal(lab.config_path.read_text()))   # its /opt/kanmon paths
                edits = yaml.safe_load(body.replace("eth0", lab.uplink_interface))
                _deep_set(config, edits)
                # The lab's own deviations (module docstring).
                config["state_dir"] = str(state)
                config["tunnel"]["interface"] = lab.wg_interface
                config["proxy"]["upstream_ca_bundle"] = str(lab.ca.cert_path)
                lab.config_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
                continue
            if kind == "gateway":
                pending: list[str] = []
                for line in body.replace("\\\n", " ").splitlines():
                    if line.startswith("export "):
                        exports.append(line)
                    elif line.strip() == "systemctl enable --now kanmon":
                        if pending:
                            outputs.append(run_gateway_script("\n".join(pending)))
                            pending = []
                        start_service()
                    elif line.strip():
                        pending.append(line)
                if pending:
                    outputs.append(run_gateway_script("\n".join(pending)))
                continue
            # kind == "device": the operator copied /root/phone-12 onto the phone.
            phone = lab.add_device(1, register=False, device_id="phone-12")
            phone.ns.run("ip", "link", "del", phone.wg_interface)       # the lab's own tunnel: README builds it
            phone.ns.run("ip", "route", "flush", "table", "main", "exact", "0.0.0.0/0", check=False)
            out_dirs = [p for p in home.iterdir() if p.is_dir()]
            assert len(out_dirs) == 1, out_dirs
            phone_dir = lab.workdir / "on-the-phone"
            shutil.copytree(out_dirs[0], phone_dir)
            shim = lab.workdir / "phone-bin"
            shim.mkdir()
            (shim / "resolvconf").write_text(RESOLVCONF)
            (shim / "resolvconf").chmod(0o755)
            phone_env = dict(env, PATH=f"{shim}:{env['PATH']}", WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go")
            phone_env.pop("WG_PROCESS_FOREGROUND", None)
            out = subprocess.run(phone.ns.cmd("bash", "-euo", "pipefail", "-c", body), capture_output=True, text=True,
                                 env=phone_env, timeout=120, cwd=phone_dir)
            assert out.returncode == 0, f"README device step failed:\n{body}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
            codes = [line for line in out.stdout.splitlines() if re.fullmatch(r"\d{3}", line.strip())]
            assert codes == ["200", "403"], out.stdout
            assert "ブロック" in out.stdout or "blocked" in out.stdout.lower(), "the block page is bilingual"
            device_stdout = out.stdout

        # -- what the prose around the blocks promises
        text = README.read_text()
        promised = set(re.findall(r"`(phone-12\.[\w.-]+|ca\.cert\.pem)`", text))
        assert promised >= {"phone-12.p12", "phone-12.wg.key", "ca.cert.pem"}
        assert phone_dir is not None
        for name in promised:
            assert (phone_dir / name).exists(), f"README names {name}; `device add --issue-cert` did not write it"
        listing = "\n".join(outputs)
        assert "phone-12.wg.key" in listing                     # the `ls` step showed it
        proxy = lab.log_records("proxy")
        mine = [r for r in proxy if r.get("device.id") == "phone-12"]
        assert any("www.example.jp" in str(r.get("url.full")) and r.get("event.outcome") != "failure" for r in mine), mine
        blocked = [r for r in mine if "mail.yahoo.co.jp" in str(r.get("url.full") or r.get("url.domain"))]
        assert blocked and all(r.get("kanmon.verdict", r.get("event.action")) != "allow" for r in blocked), blocked
        web = lab.nginx_requests()
        assert [r for r in web if r["host"] == "www.example.jp" and r["scheme"] == "https"], web
        assert not [r for r in web if "yahoo" in r["host"]], "the blocked site reached the internet"
        # the revocation (the last gateway block) cut the phone off
        after = subprocess.run(phone.ns.cmd("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "4",
                                            "--cacert", str(phone_dir / "interception-ca.pem"), "https://www.example.jp/"),
                               capture_output=True, text=True, timeout=20)
        assert after.stdout.strip() == "000", after
        auth = lab.log_records("auth")
        assert any(r.get("event.action") == "enrollment" and r.get("device.id") == "phone-12"
                   and r.get("event.outcome") == "success" for r in auth)
        (ARTIFACTS / "e2e" / "readme-walkthrough").mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "e2e" / "readme-walkthrough" / "device-output.txt").write_text(device_stdout)
        subprocess.run(phone.ns.cmd("wg-quick", "down", str(phone_dir / "kanmon.conf")), env=phone_env,
                       capture_output=True, timeout=30)
