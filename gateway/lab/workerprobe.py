"""Which inspection worker (issue #22, `proxy.workers`) serves a lab device: the device holds a
TCP connection open and the gateway's socket shows the port (worker i listens on
transparent_port + i) that the nftables hash sent it to. Used by tests/e2e/test_workers_e2e.py
and bench/proxy.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from gateway.lab.topology import WEB4, Lab

# Opens a TCP connection and holds it, so the gateway's socket (and its worker's port) can be seen.
HOLD = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def worker_of_connection(lab: Lab, device, workers: int, base_port: int = 8080,
                         host: str = WEB4, port: int = 80) -> int:
    """The index of the worker that accepted a connection from `device` to host:port (an IPv6
    host: the device's IPv6 connection). A few
    tries: just after a gateway (re)start or a peer change the device's WireGuard session may
    need a new handshake first (seconds, as for a phone)."""
    for attempt in range(3):
        proc = subprocess.Popen(device.ns.cmd(sys.executable, "-c", HOLD, host, str(port), "10"),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if proc.stdout.readline().strip() == "held":
            break
        proc.wait()
    else:
        raise AssertionError(f"{device.device_id} could not open a connection to {host}:{port}")
    try:
        source = f"[{device.ipv6}]" if ":" in host else device.ipv4
        # The device's connect() returns when it has sent its last ACK; that ACK still crosses the
        # tunnel (wireguard-go, slow on a loaded machine) before the gateway's socket is established:
        # look again for a few seconds rather than once.
        deadline = time.monotonic() + 3
        while True:
            out = lab.gw.run("ss", "-Htn", "state", "established", "dst", source).stdout
            ports = {int(line.split()[2].rpartition(":")[2]) for line in out.splitlines() if line.strip()}
            if ports or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(ports) != 1 or not base_port <= min(ports) < base_port + workers:
            raise AssertionError(f"not one worker's port in the gateway's sockets of {source}: {out}")
        return ports.pop() - base_port
    finally:
        proc.kill()
        proc.wait()


def one_device_per_worker(lab: Lab, workers: int, base_port: int = 8080, max_devices: int = 16) -> dict[int, object]:
    """Probe the lab's devices, adding more (addresses are allocated in order, the hash decides)
    until every worker has one; worker index -> device."""
    by_worker: dict[int, object] = {}
    for device in list(lab.devices):
        by_worker.setdefault(worker_of_connection(lab, device, workers, base_port), device)
    index = max((d.index for d in lab.devices), default=0) + 1
    while len(by_worker) < workers and len(lab.devices) < max_devices:
        device = lab.add_device(index)
        lab.wait_for_peer(device)
        by_worker.setdefault(worker_of_connection(lab, device, workers, base_port), device)
        index += 1
    if len(by_worker) < workers:
        raise AssertionError(f"no device hashed to worker(s) {sorted(set(range(workers)) - set(by_worker))}")
    return by_worker
