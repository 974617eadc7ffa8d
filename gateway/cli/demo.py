"""`kanmon demo`: the product working end to end on one machine, without a phone.

Builds the namespace lab (a gateway, one WireGuard device, a fake internet), enrolls the
device, browses an allowed and a blocked site from it, prints what happened with the device
identity the proxy saw, and tears everything down.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from gateway.cli.common import say
from gateway.i18n import Text


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.lab.topology import Lab, LabError, lab_prerequisites

    missing = lab_prerequisites()
    if missing:
        say(Text("デモを実行できません。不足: {m}", "Cannot run the demo; missing: {m}").format(m=", ".join(missing)))
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kanmon-demo-"))
    lab = Lab(workdir, n_devices=0)
    try:
        say(Text("1. 名前空間にゲートウェイ・模擬インターネット (nginx, DNS) を構築します…",
                  "1. Building the gateway and a fake internet (nginx, DNS) in network namespaces…"))
        lab.build()
        say(Text("2. ゲートウェイを起動します (WireGuard + nftables + mitmproxy)…",
                  "2. Starting the gateway (WireGuard + nftables + mitmproxy)…"))
        lab.start_gateway()
        say(Text("3. 端末を登録し、WireGuard トンネルを張ります…", "3. Enrolling one device and bringing its WireGuard tunnel up…"))
        device = lab.add_device(1, device_id="demo-phone")
        lab.wait_for_peer(device)
        print(f"   device={device.device_id} tunnel={device.ipv4} / {device.ipv6}")
        say(Text("4. 端末からアクセスします:", "4. Browsing from the device:"))
        urls = ["http://www.example.test/", "https://www.example.test/", "https://blocked.test/"]
        for url in urls:
            result = device.curl(url)
            code = result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()
            print(f"   {url:32} -> HTTP {code}")
        say(Text("5. ゲートウェイのプロキシログ (端末の識別情報と判定):",
                  "5. The gateway's proxy log (device identity and verdict):"))
        for rec in lab.log_records("proxy"):
            print(f"   {rec['@timestamp']} device={rec.get('device.id')} src={rec.get('source.ip')} "
                  f"{rec.get('http.request.method')} {rec.get('url.full')} -> {rec.get('kanmon.verdict')}"
                  f" rule={rec.get('rule.id') or '-'} status={rec.get('http.response.status_code')}")
        seen = lab.nginx_requests()
        say(Text("6. 模擬インターネット側のサーバが受けた要求: {n} 件 (ブロックした要求は届いていません)",
                  "6. Requests the internet-side server received: {n} (the blocked one never arrived)").format(n=len(seen)))
        for r in seen:
            print(f"   from {r['remote']} {r['scheme']}://{r['host']}{r['uri']} -> {r['status']}")
        ok = len(seen) == 2 and all(r["host"] == "www.example.test" for r in seen)
        return 0 if ok else 1
    except LabError as exc:
        say(Text("デモが失敗しました: {e}", "The demo failed: {e}").format(e=exc))
        if lab.gateway is not None:
            print(lab.gateway.log_text()[-3000:], file=sys.stderr)
        return 1
    finally:
        lab.teardown()
        say(Text("後片付けしました (名前空間・インターフェース・nftables を削除)。",
                  "Cleaned up (namespaces, interfaces and nftables removed)."))


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="build a lab in network namespaces and show the gateway working")
    demo.add_argument("--workdir", help="keep the lab's files here (default: a new temporary directory)")
    demo.set_defaults(func=cmd_demo)
