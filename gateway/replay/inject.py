"""The device side of a replay: runs inside the device's network namespace.

`python -m gateway.replay.inject < PLAN.json > RESULT.json` (the runner starts it with
`ip netns exec DEVICE-NS`), or `inject(plan)` in-process when the caller already is in the
device's namespace.

- TCP streams: one real socket per flow, bound to the device's tunnel address and (when
  free) the recorded source port, the recorded client bytes sent, whatever comes back read
  until the peer closes, resets or stays quiet.
- Packets: written as they are to the tunnel interface through an AF_PACKET socket (the
  interface is a layer-3 tun device, so the frame is the IP packet).
- Everything arriving on the tunnel interface meanwhile is kept for the judge.

scapy's sniffer/sender would do the same; plain AF_PACKET sockets are used because scapy's
layer-2 sockets guess a link layer for tun devices and its sniffer threads add a start-up
delay we would have to wait out on every replay.
"""

from __future__ import annotations

import base64
import errno
import json
import socket
import sys
import threading
import time
from typing import Any

ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
PACKET_OUTGOING = 4
MAX_KEEP = 65536


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class TunnelListener:
    """Keeps every packet arriving on the interface (not those it sends)."""

    def __init__(self, interface: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.1)
        self.received: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            self.received.append({"t": time.time(), "data": _b64(data)})

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        return self.received


def replay_stream(flow: dict[str, Any], connect_timeout: float, idle_timeout: float) -> dict[str, Any]:
    family = socket.AF_INET6 if flow["family"] == 6 else socket.AF_INET
    payload = base64.b64decode(flow["payload"])
    out: dict[str, Any] = {"connect": None, "end": None, "received": "", "local_port": None, "error": None}
    sock = None
    for port in ((flow.get("sport") or 0), 0):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(connect_timeout)
        try:
            sock.bind((flow["src"], port))
            sock.connect((flow["dst"], flow["dport"]))
            break
        except OSError as exc:
            sock.close()
            sock = None
            if port and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                continue  # the recorded port is still in use here (an earlier replay): take any
            out["connect"] = {ConnectionRefusedError: "refused", TimeoutError: "timeout",
                              ConnectionResetError: "reset"}.get(type(exc), "error")
            if isinstance(exc, socket.timeout):
                out["connect"] = "timeout"
            out["error"] = f"{type(exc).__name__}: {exc}"
            return out
    assert sock is not None
    out["connect"] = "ok"
    out["local_port"] = sock.getsockname()[1]
    received = bytearray()
    try:
        sock.sendall(payload)
        sock.settimeout(connect_timeout)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                out["end"] = "eof"
                break
            if len(received) < MAX_KEEP:
                received += chunk[:MAX_KEEP - len(received)]
            sock.settimeout(idle_timeout)
    except socket.timeout:
        out["end"] = "timeout"
    except ConnectionResetError:
        out["end"] = "reset"
    except OSError as exc:
        out["end"] = "error"
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    out["received"] = _b64(bytes(received))
    return out


def send_packets(interface: str, flow: dict[str, Any], gap: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    sent, errors = 0, []
    try:
        for raw in flow["packets"]:
            data = base64.b64decode(raw)
            proto = ETH_P_IPV6 if data and data[0] >> 4 == 6 else ETH_P_IP
            try:
                sock.sendto(data, (interface, proto))
                sent += 1
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc.strerror or exc}")
            if gap:
                time.sleep(gap)
    finally:
        sock.close()
    return {"sent": sent, "errors": errors}


def inject(plan: dict[str, Any]) -> dict[str, Any]:
    interface = plan["interface"]
    listener = TunnelListener(interface)
    started = time.time()
    results: dict[str, Any] = {"streams": {}, "packets": {}}
    try:
        threads = []
        for flow in plan.get("streams", []):
            def run(f=flow):
                results["streams"][f["id"]] = replay_stream(f, plan.get("connect_timeout", 3.0),
                                                            plan.get("idle_timeout", 0.8))
            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
        for flow in plan.get("packets", []):
            results["packets"][flow["id"]] = send_packets(interface, flow, plan.get("gap", 0.002))
        for t in threads:
            t.join(timeout=plan.get("connect_timeout", 3.0) + 30)
        time.sleep(plan.get("settle", 1.5))
    finally:
        received = listener.stop()
    results.update(started=started, finished=time.time(), received=received)
    return results


def main() -> int:
    plan = json.load(sys.stdin)
    json.dump(inject(plan), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
